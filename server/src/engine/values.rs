//! Rules about stored values that hold on every engine: content checked
//! against a SHA-256 name, declared sizes, the find-missing limit, and the
//! wire descriptions (infos) built from a [`ValueRecord`]. Written once here
//! so both engines answer alike.

use std::collections::BTreeMap;

use trove_proto::artifacts::ArtifactInfo;
use trove_proto::cache::{CachedRef, Tier};
use trove_proto::objects::{ObjectInfo, StreamInfo, MAX_FIND_MISSING};
use trove_proto::types::{hex_digest, Name};
use trove_proto::Error;

use super::record::{Body, ValueRecord};

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

/// A branch ref map as both engines store it (JSON).
pub(crate) fn branch_refs_to_json(refs: &BTreeMap<String, i64>) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(refs).map_err(Error::internal)
}

/// Parses a stored branch ref map.
pub(crate) fn parse_branch_refs(bytes: &[u8]) -> Result<BTreeMap<String, i64>, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::DataLoss {
        message: format!("unreadable branch ref map: {e}"),
    })
}

/// How an object upload replaces what is stored under its hash: a new
/// record, or `None` to keep the old one. A verified hash names its
/// content, so an existing verified copy is identical and stays as it is.
pub fn object_record(
    verified: bool,
    now: i64,
    size: u64,
    sha256: [u8; 32],
) -> impl Fn(Option<&ValueRecord>, &Body) -> Option<ValueRecord> + Send + Sync + 'static {
    move |old, body| {
        if verified && old.is_some_and(|o| o.verified) {
            return None;
        }
        Some(ValueRecord {
            verified,
            ..ValueRecord::replacing(old, now, size, size, sha256, body)
        })
    }
}

/// How an artifact upload replaces the stored value: always, keeping the
/// creation time of the value it replaces.
pub fn artifact_record(
    content_type: String,
    now: i64,
    size: u64,
    sha256: [u8; 32],
) -> impl Fn(Option<&ValueRecord>, &Body) -> Option<ValueRecord> + Send + Sync + 'static {
    move |old, body| {
        Some(ValueRecord {
            content_type: content_type.clone(),
            ..ValueRecord::replacing(old, now, size, size, sha256, body)
        })
    }
}

/// An append carries at least one entry.
pub fn check_append(entries: &[trove_proto::entries::NewEntry]) -> Result<(), Error> {
    if entries.is_empty() {
        return Err(Error::invalid("entries", "at least one entry is required"));
    }
    Ok(())
}

/// How a stream upload replaces the stored stream: always. `size` counts
/// the chunks' data; the stored body (`body_len`) adds each chunk's header.
pub fn stream_record(
    chunk_count: u64,
    now: i64,
    size: u64,
    body_len: u64,
    sha256: [u8; 32],
) -> impl Fn(Option<&ValueRecord>, &Body) -> Option<ValueRecord> + Send + Sync + 'static {
    move |old, body| {
        Some(ValueRecord {
            chunk_count,
            ..ValueRecord::replacing(old, now, size, body_len, sha256, body)
        })
    }
}

/// A download's ref: empty is a miss (the tool's contract), anything else
/// must be a valid name.
pub fn check_download_ref(reference: &str) -> Result<(), Error> {
    if !reference.is_empty() {
        Name::new("ref", reference)?;
    }
    Ok(())
}
