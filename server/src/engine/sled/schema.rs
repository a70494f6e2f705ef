//! The sled engine's schema: every tree it opens and every key it builds or
//! parses, in one file. The byte encoding of key parts lives in [`keys`]
//! (dependency-free, fuzzed); this file says which parts make which key.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `objects` | `namespace, hash` + `o` or `s` | value record (object, or stream body) |
//! | `artifacts` | `namespace, key` | value record |
//! | `blob_refs` | blob id (u64 BE) | empty: the blob is referenced |
//! | `cassettes` | `namespace, cassette` | `[generation u64][created_at i64]` |
//! | `entries` | `generation, recorded_at, seq` | the entry's JSON, or from 8 KiB a pointer into a pack (`packs::spill`) |
//! | `entry_gc` | generation | empty: the generation awaits collection |
//! | `entry_append_keys` | `generation, idempotency key` | count first appended |
//! | `cache_refs` | `tier, ref, suite` | value record of the archive |
//! | `cache_ref_time` | `tier, ref` | `[uploaded_at i64][seq u64]` |
//! | `cache_recency` | `tier, uploaded_at, seq, ref` | empty |
//! | `cache_trees` | `tier, tree_sha` | ref |
//! | `cache_branch_refs` | `namespace, prefix, branch` | JSON map sha -> epoch seconds, or from 8 KiB a pointer into a pack |
//!
//! A tier is `namespace, prefix` + `m` (main) or `p, branch` (a PR branch).

use trove_proto::cache::{CacheScope, Tier};
use trove_proto::entries::EntryCursor;
use trove_proto::types::{Name, Namespace};

use super::keys;

/// Tree of objects and streams.
pub(super) const OBJECTS: &str = "objects";
/// Tree of artifacts.
pub(super) const ARTIFACTS: &str = "artifacts";
/// Tree of referenced blob ids.
pub(super) const BLOB_REFS: &str = "blob_refs";
/// Tree of cassette headers.
pub(super) const CASSETTES: &str = "cassettes";
/// Tree of entries by generation.
pub(super) const ENTRIES: &str = "entries";
/// Tree of generations awaiting collection.
pub(super) const ENTRY_GC: &str = "entry_gc";
/// Tree of applied idempotency keys.
pub(super) const ENTRY_APPEND_KEYS: &str = "entry_append_keys";
/// Tree of cache archives.
pub(super) const CACHE_REFS: &str = "cache_refs";
/// Tree of each cached ref's last upload time.
pub(super) const CACHE_REF_TIME: &str = "cache_ref_time";
/// Tree of cached refs by recency.
pub(super) const CACHE_RECENCY: &str = "cache_recency";
/// Tree of tree-sha pointers.
pub(super) const CACHE_TREES: &str = "cache_trees";
/// Tree of branch ref maps.
pub(super) const CACHE_BRANCH_REFS: &str = "cache_branch_refs";

/// The key prefix of everything of `ns` in a tree keyed by namespace first.
pub(super) fn namespace_key(ns: &Namespace) -> Vec<u8> {
    keys::key(&[ns.as_str().as_bytes()])
}

pub(super) const KIND_OBJECT: u8 = b'o';

pub(super) const KIND_STREAM: u8 = b's';

pub(super) fn object_key(ns: &Namespace, hash: &Name, kind: u8) -> Vec<u8> {
    let mut key = keys::key(&[ns.as_str().as_bytes(), hash.as_bytes()]);
    key.push(kind);
    key
}

pub(super) fn artifact_key(ns: &Namespace, key: &Name) -> Vec<u8> {
    keys::key(&[ns.as_str().as_bytes(), key.as_bytes()])
}

pub(super) fn cassette_key(ns: &Namespace, cassette: &Name) -> Vec<u8> {
    keys::key(&[ns.as_str().as_bytes(), cassette.as_bytes()])
}

pub(super) fn encode_header(gen: u64, created_at: i64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&gen.to_be_bytes());
    out[8..].copy_from_slice(&created_at.to_be_bytes());
    out
}

pub(super) fn decode_header(bytes: &[u8]) -> Option<(u64, i64)> {
    let (gen, rest) = keys::take_u64(bytes)?;
    let (created, _) = keys::take_u64(rest)?;
    Some((gen, i64::from_be_bytes(created.to_be_bytes())))
}

pub(super) fn entry_key(gen: u64, recorded_at: i64, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(24);
    keys::push_u64(&mut key, gen);
    keys::push_i64(&mut key, recorded_at);
    keys::push_u64(&mut key, seq);
    key
}

pub(super) fn parse_entry_key(key: &[u8]) -> Option<EntryCursor> {
    let (_, rest) = keys::take_u64(key)?;
    let (ts, rest) = keys::take_u64(rest)?;
    let (seq, _) = keys::take_u64(rest)?;
    Some(EntryCursor {
        recorded_at: keys::unflip_sign(ts),
        seq,
    })
}

pub(super) const TIER_MAIN: u8 = b'm';

pub(super) const TIER_PR: u8 = b'p';

/// One tier, as the key prefix of everything in it.
#[derive(Debug, Clone)]
pub(super) struct TierKey {
    pub(super) key: Vec<u8>,
    pub(super) tier: Tier,
    pub(super) branch: String,
}

pub(super) fn scope_prefix(ns: &Namespace, prefix: &str) -> Vec<u8> {
    keys::key(&[ns.as_str().as_bytes(), prefix.as_bytes()])
}

pub(super) fn tier_key(ns: &Namespace, prefix: &str, pr_branch: Option<&str>) -> TierKey {
    let mut key = scope_prefix(ns, prefix);
    match pr_branch {
        None => {
            key.push(TIER_MAIN);
            TierKey {
                key,
                tier: Tier::Main,
                branch: String::new(),
            }
        }
        Some(branch) => {
            key.push(TIER_PR);
            keys::push_part(&mut key, branch.as_bytes());
            TierKey {
                key,
                tier: Tier::Pr,
                branch: branch.to_owned(),
            }
        }
    }
}

pub(super) fn own_tier(scope: &CacheScope) -> TierKey {
    tier_key(&scope.namespace, &scope.prefix, scope.own_branch())
}

pub(super) fn with_parts(base: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut key = base.to_vec();
    for part in parts {
        keys::push_part(&mut key, part);
    }
    key
}

pub(super) fn recency_key(tier: &[u8], uploaded_at: i64, seq: u64, reference: &[u8]) -> Vec<u8> {
    let mut key = tier.to_vec();
    keys::push_i64(&mut key, uploaded_at);
    keys::push_u64(&mut key, seq);
    keys::push_part(&mut key, reference);
    key
}

pub(super) fn encode_time(uploaded_at: i64, seq: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&uploaded_at.to_be_bytes());
    out[8..].copy_from_slice(&seq.to_be_bytes());
    out
}

pub(super) fn decode_time(bytes: &[u8]) -> Option<(i64, u64)> {
    let (ts, rest) = keys::take_u64(bytes)?;
    let (seq, _) = keys::take_u64(rest)?;
    Some((i64::from_be_bytes(ts.to_be_bytes()), seq))
}

/// Parses the part of a recency key after its tier: `(uploaded_at, seq, ref)`.
pub(super) fn parse_recency(suffix: &[u8]) -> Option<(i64, u64, String)> {
    let (ts, rest) = keys::take_u64(suffix)?;
    let (seq, rest) = keys::take_u64(rest)?;
    let (reference, _) = keys::take_part(rest)?;
    Some((
        keys::unflip_sign(ts),
        seq,
        String::from_utf8(reference).ok()?,
    ))
}

/// The key recording that an append with idempotency key `idempotency` was
/// applied to generation `gen` (so collecting the generation collects it).
pub(super) fn append_key(gen: u64, idempotency: &[u8]) -> Vec<u8> {
    let mut key = gen.to_be_bytes().to_vec();
    keys::push_part(&mut key, idempotency);
    key
}
