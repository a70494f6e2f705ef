//! The value record both engines persist for every value (object, stream,
//! artifact, cache archive; on object storage also inside cassette heads and
//! cache ref records), and its versioned binary encoding.
//!
//! This is a storage format: sled keeps it in its trees and the bucket
//! engine in objects, so a change here changes both engines' data. Add
//! fields only behind a new version byte, and keep every older version
//! readable.

use serde::{Deserialize, Serialize};
use trove_proto::Error;

/// Where a value's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Stored inside this record (small values). Encoded as one byte
    /// string: postcard's format for it equals a `Vec<u8>`'s, so records
    /// written before stay readable, but decoding is a copy instead of a
    /// visit per byte (which showed up in the small-get profile).
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Stored in blob file `id`.
    Blob(u64),
    /// Stored in the sled engine's value pack `pack` at byte `offset`
    /// (`body_len` bytes whose CRC-32 is `crc`). Added after the others so
    /// that their encoding is unchanged.
    Packed {
        /// The pack file's number.
        pack: u64,
        /// Where the bytes start in it.
        offset: u64,
        /// CRC-32 of the bytes, checked on every read.
        crc: u32,
    },
}

/// Metadata (and, for small values, the bytes) of one stored value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueRecord {
    /// First write of this key, microseconds since the epoch.
    pub created_at: i64,
    /// Write of the current value, microseconds since the epoch.
    pub updated_at: i64,
    /// Length of the payload the caller sees (for a stream: the sum of its
    /// chunks' data lengths).
    pub size: u64,
    /// Length of the stored body.
    pub body_len: u64,
    /// SHA-256 of the stored body.
    pub sha256: [u8; 32],
    /// Media type (artifacts).
    pub content_type: String,
    /// The key is a SHA-256 that was checked against the content (objects).
    pub verified: bool,
    /// Number of chunks (streams).
    pub chunk_count: u64,
    /// Arrival sequence that orders writes made in the same microsecond.
    pub seq: u64,
    /// Where the bytes are.
    pub body: Body,
}

impl ValueRecord {
    /// The record of a body written at `at` (microseconds) that replaces
    /// `old`, keeping its first-write time: a plain value, neither verified,
    /// typed nor chunked (set those fields on the result).
    pub fn replacing(
        old: Option<&ValueRecord>,
        at: i64,
        size: u64,
        body_len: u64,
        sha256: [u8; 32],
        body: &Body,
    ) -> Self {
        ValueRecord {
            created_at: old.map_or(at, |o| o.created_at),
            updated_at: at,
            size,
            body_len,
            sha256,
            content_type: String::new(),
            verified: false,
            chunk_count: 0,
            seq: 0,
            body: body.clone(),
        }
    }

    /// The blob file this record references, if any.
    pub fn blob_id(&self) -> Option<u64> {
        match self.body {
            Body::Blob(id) => Some(id),
            Body::Inline(_) | Body::Packed { .. } => None,
        }
    }
}

const RECORD_VERSION: u8 = 1;

/// Encodes a record with a leading format version.
pub fn encode(record: &ValueRecord) -> Result<Vec<u8>, Error> {
    let mut out = vec![RECORD_VERSION];
    let body = postcard::to_stdvec(record).map_err(Error::internal)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a record written by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<ValueRecord, Error> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| Error::DataLoss {
            message: format!("unreadable value record: {e}"),
        }),
        Some((v, _)) => Err(Error::DataLoss {
            message: format!("value record has unknown format version {v}"),
        }),
        None => Err(Error::DataLoss {
            message: "empty value record".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records survive encoding, and damaged bytes are DataLoss, not a panic.
    #[test]
    fn record_round_trip_and_damage() {
        let record = ValueRecord {
            created_at: -1,
            updated_at: 2,
            size: 3,
            body_len: 3,
            sha256: [7; 32],
            content_type: "text/plain".into(),
            verified: true,
            chunk_count: 0,
            seq: 9,
            body: Body::Inline(b"abc".to_vec()),
        };
        let bytes = encode(&record).expect("encode");
        assert_eq!(decode(&bytes).ok(), Some(record));
        assert!(matches!(decode(&bytes[..5]), Err(Error::DataLoss { .. })));
        assert!(matches!(decode(&[9, 1]), Err(Error::DataLoss { .. })));
        assert!(matches!(decode(&[]), Err(Error::DataLoss { .. })));
    }

    /// The byte-string encoding of inline values is the one records were
    /// first written with (a plain `Vec<u8>`), so existing stores still open.
    #[test]
    fn inline_encoding_matches_the_original_format() {
        #[derive(Serialize)]
        enum OriginalBody {
            Inline(Vec<u8>),
        }
        let value = (0..=255u8).collect::<Vec<u8>>();
        let original = postcard::to_stdvec(&OriginalBody::Inline(value.clone())).expect("encode");
        let current = postcard::to_stdvec(&Body::Inline(value)).expect("encode");
        assert_eq!(original, current);
    }
}
