//! Rules about stored values that hold on every engine: content checked
//! against a SHA-256 name, declared sizes, the find-missing limit, and the
//! wire descriptions (infos) built from a [`ValueRecord`]. Written once here
//! so both engines answer alike.

use std::collections::BTreeMap;

use trove_proto::artifacts::ArtifactInfo;
use trove_proto::cache::{check_optional, CachedRef, Tier};
use trove_proto::objects::{ObjectInfo, StreamInfo, MAX_FIND_MISSING};
use trove_proto::types::{hex_digest, Name};
use trove_proto::Error;

use super::record::ValueRecord;

/// The wire description of an object record.
pub(crate) fn object_info(hash: &Name, record: &ValueRecord) -> ObjectInfo {
    ObjectInfo {
        hash: hash.as_str().to_owned(),
        size: record.size,
        sha256: hex_digest(&record.sha256),
        created_at: record.created_at,
        verified: record.verified,
    }
}

/// The wire description of a stream record.
pub(crate) fn stream_info(hash: &Name, record: &ValueRecord) -> StreamInfo {
    StreamInfo {
        hash: hash.as_str().to_owned(),
        chunk_count: record.chunk_count,
        total_bytes: record.size,
        created_at: record.updated_at,
    }
}

/// Checks content against a hash that is a SHA-256 digest; returns whether
/// it was one (the object is then verified). Any other hash is an opaque name.
pub(crate) fn verify_content(hash: &Name, sha256: &[u8; 32]) -> Result<bool, Error> {
    match hash.sha256_digest() {
        Some(expected) if expected != *sha256 => Err(Error::invalid(
            "hash",
            format!(
                "the content's SHA-256 is {}, not {}; nothing was stored",
                hex_digest(sha256),
                hash
            ),
        )),
        Some(_) => Ok(true),
        None => Ok(false),
    }
}

/// Refuses a `find_missing` call over [`MAX_FIND_MISSING`] hashes.
pub(crate) fn check_find_missing(count: usize) -> Result<(), Error> {
    if count > MAX_FIND_MISSING {
        return Err(Error::invalid(
            "hashes",
            format!("{count} hashes given; at most {MAX_FIND_MISSING} per call"),
        ));
    }
    Ok(())
}

/// The wire description of an artifact record.
pub(crate) fn artifact_info(key: &str, record: &ValueRecord) -> ArtifactInfo {
    ArtifactInfo {
        key: key.to_owned(),
        size: record.size,
        sha256: hex_digest(&record.sha256),
        created_at: record.created_at,
        updated_at: record.updated_at,
        content_type: record.content_type.clone(),
    }
}

/// The wire description of one suite's archive of a ref, uploaded at the
/// record's `updated_at`.
pub(crate) fn describe_archive(
    tier: Tier,
    branch: &str,
    reference: &str,
    suite: &str,
    record: &ValueRecord,
) -> CachedRef {
    CachedRef {
        r#ref: reference.to_owned(),
        test_suite_id: suite.to_owned(),
        uploaded_at: record.updated_at,
        size: record.size,
        sha256: hex_digest(&record.sha256),
        tier: tier as i32,
        branch: branch.to_owned(),
    }
}

/// Holds an upload to the size its header announced (when it announced one):
/// more bytes are refused as soon as they arrive, fewer when the body ends.
#[derive(Debug, Clone, Copy)]
pub struct DeclaredSize(Option<u64>);

impl DeclaredSize {
    /// The announced size, if any.
    pub fn new(expected: Option<u64>) -> Self {
        DeclaredSize(expected)
    }

    /// After `received` bytes have arrived.
    pub fn check_progress(self, received: u64) -> Result<(), Error> {
        match self.0 {
            Some(expected) if received > expected => Err(Error::invalid(
                "size",
                format!("the header announced {expected} bytes but more were sent"),
            )),
            _ => Ok(()),
        }
    }

    /// Once the body ended after `received` bytes.
    pub fn check_end(self, received: u64) -> Result<(), Error> {
        match self.0 {
            Some(expected) if received != expected => Err(Error::invalid(
                "size",
                format!(
                    "the header announced {expected} bytes but the stream ended after {received}"
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Most entries accepted in one branch ref map.
pub const MAX_BRANCH_REFS: usize = 100_000;

/// Validates a branch ref map lookup; false when the branch is blank (the
/// map is then empty without looking).
pub(crate) fn branch_refs_lookup(prefix: &str, branch: &str) -> Result<bool, Error> {
    check_optional("prefix", prefix)?;
    check_optional("branch", branch)?;
    Ok(!branch.trim().is_empty())
}

/// Parses a stored branch ref map.
pub(crate) fn parse_branch_refs(bytes: &[u8]) -> Result<BTreeMap<String, i64>, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::DataLoss {
        message: format!("unreadable branch ref map: {e}"),
    })
}

/// Validates a branch ref map write; the JSON to store, or `None` when the
/// call is a no-op (blank or default branch, empty map).
pub(crate) fn branch_refs_to_store(
    prefix: &str,
    branch: &str,
    default_branch: &str,
    refs: &BTreeMap<String, i64>,
) -> Result<Option<Vec<u8>>, Error> {
    check_optional("prefix", prefix)?;
    check_optional("branch", branch)?;
    check_optional("default_branch", default_branch)?;
    if branch.trim().is_empty() || branch == default_branch || refs.is_empty() {
        return Ok(None);
    }
    if refs.len() > MAX_BRANCH_REFS {
        return Err(Error::invalid(
            "refs",
            format!(
                "{} entries; at most {MAX_BRANCH_REFS} per branch",
                refs.len()
            ),
        ));
    }
    for sha in refs.keys() {
        Name::new("refs key", sha.clone())?;
    }
    serde_json::to_vec(refs).map(Some).map_err(Error::internal)
}
