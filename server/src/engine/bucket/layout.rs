//! Object keys for the bucket engine: caller names (any UTF-8 but NUL, up to
//! 1 KiB) become object-key text whose byte order is the names' byte order.
//!
//! Every byte maps to a self-delimiting code, and codes sort like the bytes:
//!
//! | bytes | code |
//! |---|---|
//! | `0x00..=0x2F` | `-` and two upper-case hex digits |
//! | `0`..`9` | itself |
//! | `0x3A..=0x40` | `=` and two hex digits |
//! | `A`..`Z` | itself |
//! | `0x5B..=0x60` | `_` and two hex digits |
//! | `a`..`y` | itself |
//! | `z` and `0x7B..=0xFF` | `z` and two hex digits |
//!
//! The introducers sort between the neighbouring plain characters, so the
//! mapping keeps order, and a code is never a prefix of another, so a name
//! prefix maps to a key prefix. Only characters that S3, GCS, Azure and
//! `object_store`'s path rules all take as they are appear in a key.
//!
//! Keys end in [`TERMINATOR`] and a kind letter. `!` sorts below every code,
//! so a name sorts before its extensions (`a` before `a/`), as bytes do.
//!
//! Some stores cap one path segment (SeaweedFS: 255 bytes), so an encoded
//! name is cut into segments of [`SEGMENT_CHARS`] joined by `+/`. `+` sorts
//! between `!` and every code: a stored name that ends exactly at a cut
//! (`S!r`) still lists before the longer names continued under `S+/`, both in
//! a flat listing and in a store that lists folder by folder.
//!
//! # Names too long for a key
//!
//! Stores cap a whole key at [`MAX_KEY_BYTES`], and a 1 KiB name can encode
//! to 3 KiB. So:
//! - A directory component (namespace, cache prefix, branch) whose encoding
//!   is longer than [`MAX_DIR_COMPONENT`] becomes `+` and a hash of the name:
//!   directories are never listed for their names.
//! - A leaf name whose key would not fit its directory's room (less
//!   [`HASH_ROOM`]) is *hashed*: its key is its *group* (the longest run of
//!   whole codes of its encoding that fits, then the first character of the
//!   code that does not: the character itself or a 3-character code's
//!   introducer, which sorts like the byte), the terminator, the kind, `+`
//!   and a hash of the name; a *note* object beside it (the same key and
//!   `n`) holds the full name for listings. Every name of a directory follows
//!   the same threshold, so no readable key can sort inside a group, and any
//!   two names that share the fitting run are both hashed, their groups
//!   ordered by their next byte. Listings read the notes of a group and sort
//!   them by name, so names still come out in byte order.

/// Ends every encoded name, before its kind letter.
pub const TERMINATOR: char = '!';
/// Longest key written, in bytes (S3's limit, the strictest store's).
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest encoded directory component kept readable.
pub const MAX_DIR_COMPONENT: usize = 160;
/// Longest root prefix accepted: three directory components and the root
/// leave a leaf at least 280 bytes of key.
pub const MAX_ROOT_BYTES: usize = 200;
/// Room a hashed leaf needs beyond its group: terminator, kind, `+`, the
/// hash, a segment mark, and the note's letter.
pub const HASH_ROOM: usize = 40;
/// Marks a hashed directory component or leaf.
const HASHED: char = '+';
/// Ends a note's key, after the hashed leaf's key.
const NOTE: char = 'n';
/// Hex digits of a name's hash in a key.
const HASH_HEX: usize = 32;
/// Longest run of encoded characters in one path segment.
pub const SEGMENT_CHARS: usize = 240;
const CONTINUED: &str = "+/";

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The order-preserving encoding of `name`, before segmenting.
pub fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + name.len() / 2);
    for &b in name.as_bytes() {
        let introducer = match b {
            b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'y' => {
                out.push(char::from(b));
                continue;
            }
            0x00..=0x2F => '-',
            0x3A..=0x40 => '=',
            0x5B..=0x60 => '_',
            _ => 'z',
        };
        out.push(introducer);
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xF)]));
    }
    out
}

/// Reverses [`encode`]; `None` for text that no name encodes to.
pub fn decode(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'y' => {
                out.push(bytes[i]);
                i += 1;
            }
            b'-' | b'=' | b'_' | b'z' => {
                let hex = encoded.get(i + 1..i + 3)?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                let b = u8::from_str_radix(hex, 16).ok()?;
                // Only the canonical code of each byte is accepted.
                if hex.bytes().any(|c| c.is_ascii_lowercase())
                    || encode_byte_introducer(b) != bytes[i]
                {
                    return None;
                }
                out.push(b);
                i += 3;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

fn encode_byte_introducer(b: u8) -> u8 {
    match b {
        b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'y' => 0,
        0x00..=0x2F => b'-',
        0x3A..=0x40 => b'=',
        0x5B..=0x60 => b'_',
        _ => b'z',
    }
}

/// Cuts an encoded name into path segments of at most [`SEGMENT_CHARS`].
pub fn segmented(encoded: &str) -> String {
    // Encoded text is ASCII, so byte offsets are character offsets.
    let mut out = String::with_capacity(encoded.len() + encoded.len() / SEGMENT_CHARS * 2);
    let mut rest = encoded;
    while rest.len() > SEGMENT_CHARS {
        let (head, tail) = rest.split_at(SEGMENT_CHARS);
        out.push_str(head);
        out.push_str(CONTINUED);
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// The key text of `name` with kind letter `kind`: segmented encoding,
/// terminator, kind.
pub fn name_key(name: &str, kind: char) -> String {
    let mut key = segmented(&encode(name));
    key.push(TERMINATOR);
    key.push(kind);
    key
}

/// The key text every name starting with `prefix` begins with. (A prefix
/// that ends exactly at a cut needs no `+/`: both the name equal to it and its
/// continuations start with the bare segment.)
#[cfg(test)]
pub fn prefix_key(prefix: &str) -> String {
    segmented(&encode(prefix))
}

/// Parses key text made by [`name_key`] back into the name and kind.
pub fn parse_name_key(key: &str) -> Option<(String, char)> {
    let (body, kind) = key.rsplit_once(TERMINATOR)?;
    let mut kind_chars = kind.chars();
    let kind = kind_chars.next()?;
    if kind_chars.next().is_some() {
        return None;
    }
    let name = decode(&body.replace(CONTINUED, ""))?;
    // Only keys the encoder makes: a stray object must not list under a
    // name that maps to another key.
    (name_key(&name, kind) == key).then_some((name, kind))
}

/// The hex hash of a name used in hashed keys.
pub fn name_hash(name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    hex::encode(&digest[..HASH_HEX / 2])
}

/// A directory component for `name`: its encoding, or `+` and its hash when
/// the encoding is longer than [`MAX_DIR_COMPONENT`].
pub fn dir_component(name: &str) -> String {
    let encoded = encode(name);
    if encoded.len() <= MAX_DIR_COMPONENT {
        encoded
    } else {
        format!("{HASHED}{}", name_hash(name))
    }
}

/// Length of `encoded` once segmented.
fn segmented_len(encoded: usize) -> usize {
    encoded + CONTINUED.len() * encoded.saturating_sub(1) / SEGMENT_CHARS
}

/// The codes of an encoding, in order.
fn codes(encoded: &str) -> impl Iterator<Item = &str> {
    let mut rest = encoded;
    std::iter::from_fn(move || {
        let width = match rest.as_bytes().first()? {
            b'-' | b'=' | b'_' | b'z' => 3,
            _ => 1,
        };
        let (code, tail) = rest.split_at(width.min(rest.len()));
        rest = tail;
        Some(code)
    })
}

/// The longest run of whole codes of `encoded` whose segmented length plus
/// `extra` is at most `limit`, and the code after it (if any).
fn fitting_prefix(encoded: &str, limit: usize, extra: usize) -> (&str, Option<&str>) {
    let mut end = 0;
    for code in codes(encoded) {
        if segmented_len(end + code.len()) + extra > limit {
            return (&encoded[..end], Some(code));
        }
        end += code.len();
    }
    (encoded, None)
}

/// The key of leaf `name` with kind `kind` in a directory that leaves `room`
/// bytes of key, and the key of its note when it is hashed.
pub fn leaf_key(room: usize, name: &str, kind: char) -> (String, Option<String>) {
    let plain = name_key(name, kind);
    let limit = room.saturating_sub(HASH_ROOM);
    if plain.len() <= limit {
        return (plain, None);
    }
    let encoded = encode(name);
    let (fits, next) = fitting_prefix(&encoded, limit, TERMINATOR.len_utf8() + 1);
    // The group ends with the first character of the code that did not
    // fit (the character itself, or a 3-character code's introducer): every
    // name that continues the fitting prefix is hashed too, and their groups
    // then sort by that next byte, as the names do.
    let mut group = fits.to_owned();
    if let Some(code) = next {
        group.push_str(&code[..1]);
    }
    let key = format!(
        "{}{TERMINATOR}{kind}{HASHED}{}",
        segmented(&group),
        name_hash(name)
    );
    let note = format!("{key}{NOTE}");
    (key, Some(note))
}

/// What a listed key (relative to its directory) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListedKey {
    /// A readable key: the name and kind.
    Plain(String, char),
    /// A hashed leaf's record or note.
    Hashed {
        /// The key text before the terminator, shared by its group.
        group: String,
        /// The kind letter.
        kind: char,
        /// The name's hash.
        hash: String,
        /// This is the note (holding the name), not the record.
        note: bool,
    },
}

/// Parses a listed key; `None` for text the engine does not write.
pub fn parse_listed(key: &str) -> Option<ListedKey> {
    let (body, tail) = key.rsplit_once(TERMINATOR)?;
    let mut chars = tail.chars();
    let kind = chars.next()?;
    let rest = chars.as_str();
    if rest.is_empty() {
        return parse_name_key(key).map(|(name, kind)| ListedKey::Plain(name, kind));
    }
    let hashed = rest.strip_prefix(HASHED)?;
    let (hash, note) = match hashed.strip_suffix(NOTE) {
        Some(hash) => (hash, true),
        None => (hashed, false),
    };
    let valid =
        hash.len() == HASH_HEX && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    valid.then(|| ListedKey::Hashed {
        group: body.to_owned(),
        kind,
        hash: hash.to_owned(),
        note,
    })
}

/// Whether a full key is a hashed leaf's record (which has a note).
pub fn is_hashed_record(key: &str) -> bool {
    let Some((_, tail)) = key.rsplit_once(TERMINATOR) else {
        return false;
    };
    let mut chars = tail.chars();
    let _kind = chars.next();
    chars
        .as_str()
        .strip_prefix(HASHED)
        .is_some_and(|hash| hash.len() == HASH_HEX && hash.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The kind letter of a record key, readable or hashed.
pub fn kind_of(key: &str) -> Option<char> {
    key.rsplit_once(TERMINATOR)
        .and_then(|(_, tail)| tail.chars().next())
}

/// The note key of a hashed record key.
pub fn note_of(key: &str) -> String {
    format!("{key}{NOTE}")
}

/// The key text to list from for names starting with `prefix`, in a
/// directory that leaves `room` bytes: its key prefix, cut short enough to
/// also be a prefix of every hashed key whose name starts with it.
pub fn list_prefix(room: usize, prefix: &str) -> String {
    let encoded = encode(prefix);
    let limit = room.saturating_sub(HASH_ROOM + 8);
    segmented(fitting_prefix(&encoded, limit, 0).0)
}

/// The key text to list strictly after, for a page that resumes after
/// `name`: its key, or for a hashed name the start of its group (the group
/// is then read whole and filtered by name).
pub fn list_after(room: usize, name: &str, kind: char) -> String {
    match leaf_key(room, name, kind) {
        (key, None) => key,
        (key, Some(_)) => key
            .rsplit_once(TERMINATOR)
            .map(|(group, _)| group.to_owned())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arbitrary_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just('a'),
                Just('z'),
                Just('/'),
                Just('0'),
                Just('!'),
                Just('~'),
                Just('é'),
                Just('\u{1}'),
                any::<char>().prop_filter("no NUL", |c| *c != '\0'),
            ],
            1..600,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        /// Names come back from their keys exactly.
        #[test]
        fn round_trip(name in arbitrary_name()) {
            let key = name_key(&name, 'r');
            prop_assert_eq!(parse_name_key(&key), Some((name, 'r')));
        }

        /// Key order is name order, also across segment cuts.
        #[test]
        fn order_is_kept(a in arbitrary_name(), b in arbitrary_name()) {
            let (ka, kb) = (name_key(&a, 'r'), name_key(&b, 'r'));
            prop_assert_eq!(a.as_bytes().cmp(b.as_bytes()), ka.cmp(&kb));
        }

        /// A name starts with a prefix exactly when its key starts with the prefix's key.
        #[test]
        fn prefixes_match(name in arbitrary_name(), cut in 0usize..600) {
            let cut = (0..=cut.min(name.len())).rev().find(|i| name.is_char_boundary(*i)).unwrap_or(0);
            let prefix = &name[..cut];
            prop_assert!(name_key(&name, 'r').starts_with(&prefix_key(prefix)));
            let other = format!("{prefix}\u{1}");
            prop_assert_eq!(
                name.starts_with(&other),
                name_key(&name, 'r').starts_with(&prefix_key(&other))
            );
        }

        /// With hashed keys too, key order is name order, except inside one
        /// group (which listings sort by name); every key and note fits.
        #[test]
        fn hashed_keys_keep_order_and_fit(a in arbitrary_name(), b in arbitrary_name(), room in 120usize..700) {
            let (ka, na) = leaf_key(room, &a, 'r');
            let (kb, nb) = leaf_key(room, &b, 'r');
            for key in [&ka, &kb].into_iter().chain(na.iter()).chain(nb.iter()) {
                prop_assert!(key.len() <= room, "{} > {room}", key.len());
            }
            let group = |k: &str, hashed: bool| hashed.then(|| k.rsplit_once(TERMINATOR).map(|(g, _)| g.to_owned()));
            let (ga, gb) = (group(&ka, na.is_some()), group(&kb, nb.is_some()));
            if ga.is_none() || ga != gb {
                prop_assert_eq!(a.as_bytes().cmp(b.as_bytes()), ka.cmp(&kb), "{} vs {}", ka, kb);
            }
            let parsed = parse_listed(&ka).expect("parses");
            match parsed {
                ListedKey::Plain(name, kind) => prop_assert_eq!((name, kind), (a.clone(), 'r')),
                ListedKey::Hashed { hash, note, .. } => {
                    prop_assert_eq!(hash, name_hash(&a));
                    prop_assert!(!note);
                    prop_assert!(is_hashed_record(&ka));
                }
            }
        }

        /// Names that share a long stem and differ just past the cut (the
        /// case a group boundary gets wrong) keep their order.
        #[test]
        fn names_differing_past_the_cut_keep_order(
            stem in proptest::collection::vec(prop_oneof![Just('x'), Just('/'), Just('é'), Just('5')], 0..700),
            a in "[x/5é~-]{1,6}",
            b in "[x/5é~-]{1,6}",
            room in 120usize..700,
        ) {
            let stem: String = stem.into_iter().collect();
            let (na, nb) = (format!("{stem}{a}"), format!("{stem}{b}"));
            let (ka, ha) = leaf_key(room, &na, 'r');
            let (kb, hb) = leaf_key(room, &nb, 'r');
            let group = |k: &str, hashed: bool| hashed.then(|| k.rsplit_once(TERMINATOR).map(|(g, _)| g.to_owned()));
            let (ga, gb) = (group(&ka, ha.is_some()), group(&kb, hb.is_some()));
            if ga.is_none() || ga != gb {
                prop_assert_eq!(na.as_bytes().cmp(nb.as_bytes()), ka.cmp(&kb), "{} vs {}", ka, kb);
            }
        }

        /// The listing prefix is a prefix of the key of every name that
        /// starts with the prefix, hashed or not.
        #[test]
        fn list_prefix_covers_hashed_names(name in arbitrary_name(), cut in 0usize..600, room in 120usize..700) {
            let cut = (0..=cut.min(name.len())).rev().find(|i| name.is_char_boundary(*i)).unwrap_or(0);
            let (key, _) = leaf_key(room, &name, 'r');
            let start = list_prefix(room, &name[..cut]);
            prop_assert!(key.starts_with(&start), "{key} does not start with {start}");
        }

        /// Every segment fits the strictest store's limit.
        #[test]
        fn segments_are_short(name in arbitrary_name()) {
            for segment in name_key(&name, 'r').split('/') {
                prop_assert!(segment.len() <= SEGMENT_CHARS + 2);
            }
        }
    }

    /// Only the characters every store takes as they are appear in keys.
    #[test]
    fn keys_use_safe_characters() {
        let all: String = (1u8..=127).map(char::from).chain("é🦀".chars()).collect();
        let key = name_key(&all, 'r');
        assert!(key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-=_!+/".contains(c)));
        assert_eq!(decode("a-2"), None);
        assert_eq!(decode("-41"), None, "A has a plain code");
        assert_eq!(decode("a~"), None);
    }
}

use object_store::path::Path;
use trove_proto::cache::{CacheScope, Tier};
use trove_proto::types::Namespace;

use super::BucketStore;

impl BucketStore {
    /// The relative directory of `group` (`a`, `o`, `c` or `k`) in `ns`.
    pub fn ns_dir(ns: &Namespace, group: char) -> String {
        format!("n/{}/{group}/", dir_component(ns.as_str()))
    }

    pub(crate) fn blob_path(&self, id: u64) -> Path {
        self.path(&format!("blobs/{id:016x}"))
    }

    pub(crate) fn marker_path(&self, id: u64) -> Path {
        self.path(&format!("pending/{id:016x}"))
    }

    /// Bytes of key left for a leaf in relative directory `dir`.
    pub(super) fn room(&self, dir: &str) -> usize {
        let root = if self.inner.root.is_empty() {
            0
        } else {
            self.inner.root.len() + 1
        };
        MAX_KEY_BYTES.saturating_sub(root + dir.len())
    }

    /// The path of leaf `name` of kind `kind` in relative directory `dir`.
    pub(super) fn leaf_path(&self, dir: &str, name: &str, kind: char) -> Path {
        let (key, _) = leaf_key(self.room(dir), name, kind);
        self.path(&format!("{dir}{key}"))
    }

    pub(super) fn artifact_path(&self, ns: &Namespace, key: &str) -> Path {
        self.leaf_path(&Self::ns_dir(ns, 'a'), key, KIND_ARTIFACT)
    }

    pub(super) fn object_path(&self, ns: &Namespace, hash: &str, kind: char) -> Path {
        self.leaf_path(&Self::ns_dir(ns, 'o'), hash, kind)
    }

    pub(super) fn head_path(&self, ns: &Namespace, cassette: &str) -> Path {
        self.leaf_path(&Self::ns_dir(ns, 'c'), cassette, KIND_HEAD)
    }

    pub(super) fn ref_path(&self, tier: &TierDir, reference: &str) -> Path {
        self.leaf_path(&format!("{}r/", tier.dir), reference, KIND_REF)
    }

    pub(super) fn tree_path(&self, tier: &TierDir, tree: &str) -> Path {
        self.leaf_path(&format!("{}t/", tier.dir), tree, KIND_TREE)
    }

    pub(super) fn branch_map_path(&self, ns: &Namespace, prefix: &str, component: &str) -> Path {
        self.path(&format!(
            "{}br/{component}{TERMINATOR}m",
            scope_dir(ns, prefix)
        ))
    }
}

pub(super) const KIND_REF: char = 'c';

pub(super) const KIND_TREE: char = 't';

/// One tier: its directory and how it is reported.
#[derive(Debug, Clone)]
pub(super) struct TierDir {
    pub(super) dir: String,
    pub(super) tier: Tier,
    pub(super) branch: String,
    /// The branch's directory component (empty for the main tier); names
    /// its branch map too.
    pub(super) component: String,
}

pub(super) fn scope_dir(ns: &Namespace, prefix: &str) -> String {
    format!(
        "{}{}{TERMINATOR}p/",
        BucketStore::ns_dir(ns, 'k'),
        dir_component(prefix)
    )
}

pub(super) fn tier_dir(ns: &Namespace, prefix: &str, pr_branch: Option<&str>) -> TierDir {
    let scope = scope_dir(ns, prefix);
    match pr_branch {
        None => TierDir {
            dir: format!("{scope}m/"),
            tier: Tier::Main,
            branch: String::new(),
            component: String::new(),
        },
        Some(branch) => tier_of_component(&scope, dir_component(branch), branch.to_owned()),
    }
}

/// The PR tier whose branch directory component is `component` (as listed),
/// in the scope directory `scope`.
pub(super) fn tier_of_component(scope: &str, component: String, branch: String) -> TierDir {
    TierDir {
        dir: format!("{scope}b/{component}{TERMINATOR}b/"),
        tier: Tier::Pr,
        branch,
        component,
    }
}

pub(super) fn own_tier(scope: &CacheScope) -> TierDir {
    tier_dir(&scope.namespace, &scope.prefix, scope.own_branch())
}

/// Kind letter of an object's record.
pub(super) const KIND_OBJECT: char = 'd';

/// Kind letter of a stream's record.
pub(super) const KIND_STREAM: char = 's';

/// Kind letter of a cassette head.
pub(super) const KIND_HEAD: char = 'h';

pub(super) const KIND_ARTIFACT: char = 'r';
