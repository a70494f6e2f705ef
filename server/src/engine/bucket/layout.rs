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

/// Ends every encoded name, before its kind letter.
pub const TERMINATOR: char = '!';
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
        format!("n/{}/{group}/", segmented(&encode(ns.as_str())))
    }

    pub(crate) fn blob_path(&self, id: u64) -> Path {
        self.path(&format!("blobs/{id:016x}"))
    }

    pub(crate) fn marker_path(&self, id: u64) -> Path {
        self.path(&format!("pending/{id:016x}"))
    }

    pub(super) fn artifact_path(&self, ns: &Namespace, key: &str) -> Path {
        self.path(&format!(
            "{}{}",
            Self::ns_dir(ns, 'a'),
            name_key(key, KIND_ARTIFACT)
        ))
    }

    pub(super) fn object_path(&self, ns: &Namespace, hash: &str, kind: char) -> Path {
        self.path(&format!(
            "{}{}",
            Self::ns_dir(ns, 'o'),
            name_key(hash, kind)
        ))
    }

    pub(super) fn head_path(&self, ns: &Namespace, cassette: &str) -> Path {
        self.path(&format!(
            "{}{}",
            Self::ns_dir(ns, 'c'),
            name_key(cassette, KIND_HEAD)
        ))
    }

    pub(super) fn ref_path(&self, tier: &TierDir, reference: &str) -> Path {
        self.path(&format!("{}r/{}", tier.dir, name_key(reference, KIND_REF)))
    }

    pub(super) fn tree_path(&self, tier: &TierDir, tree: &str) -> Path {
        self.path(&format!("{}t/{}", tier.dir, name_key(tree, KIND_TREE)))
    }

    pub(super) fn branch_map_path(&self, ns: &Namespace, prefix: &str, branch: &str) -> Path {
        self.path(&format!(
            "{}br/{}",
            scope_dir(ns, prefix),
            name_key(branch, 'm')
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
}

pub(super) fn scope_dir(ns: &Namespace, prefix: &str) -> String {
    format!("{}{}/", BucketStore::ns_dir(ns, 'k'), name_key(prefix, 'p'))
}

pub(super) fn tier_dir(ns: &Namespace, prefix: &str, pr_branch: Option<&str>) -> TierDir {
    let scope = scope_dir(ns, prefix);
    match pr_branch {
        None => TierDir {
            dir: format!("{scope}m/"),
            tier: Tier::Main,
            branch: String::new(),
        },
        Some(branch) => TierDir {
            dir: format!("{scope}b/{}/", name_key(branch, 'b')),
            tier: Tier::Pr,
            branch: branch.to_owned(),
        },
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
