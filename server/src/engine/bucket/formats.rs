//! The record formats the bucket engine writes besides the shared value
//! record ([`crate::engine::record`]): a cassette's head (its runs of
//! entries) and a cache ref record (every suite's archive of one ref). Both
//! are versioned postcard; what a reader finds in them is all it trusts.

use std::collections::BTreeMap;

use bytes::{Buf, Bytes};
use serde::{Deserialize, Serialize};
use trove_proto::entries::NewEntry;
use trove_proto::types::now_micros;
use trove_proto::Error;

use crate::engine::record::{Body, ValueRecord};

pub(super) const HEAD_VERSION: u8 = 1;

/// The state of one cassette.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Head {
    /// First append or replace, microseconds.
    pub(super) created_at: i64,
    /// Arrival number of the next entry.
    pub(super) next_seq: u64,
    /// Batches of entries, in arrival order; together they cover arrival
    /// numbers `runs[0].first_seq..next_seq` without gaps.
    pub(super) runs: Vec<Run>,
    /// Idempotency keys applied to the current content, with their counts.
    pub(super) applied: BTreeMap<String, u64>,
    /// Random id of the write that produced this head.
    pub(super) written_by: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Run {
    /// Random id of the write that added the run: a retry whose first
    /// attempt landed (its reply lost) finds it and does not add it again.
    pub(super) id: u64,
    pub(super) first_seq: u64,
    pub(super) count: u64,
    pub(super) body: Body,
}

pub(super) fn encode_head(head: &Head) -> Result<Vec<u8>, Error> {
    let mut out = vec![HEAD_VERSION];
    out.extend_from_slice(&postcard::to_stdvec(head).map_err(Error::internal)?);
    Ok(out)
}

pub(super) fn decode_head(bytes: &[u8]) -> Result<Head, Error> {
    match bytes.split_first() {
        Some((&HEAD_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| Error::DataLoss {
            message: format!("unreadable cassette head: {e}"),
        }),
        _ => Err(Error::DataLoss {
            message: "cassette head has an unknown format".into(),
        }),
    }
}

/// The blobs a stored head references (for reclaim).
pub(super) fn head_blobs(bytes: &[u8]) -> Result<Vec<u64>, Error> {
    Ok(decode_head(bytes)?.blobs())
}

pub(super) fn encode_frame(entry: &NewEntry) -> Result<Bytes, Error> {
    let len = u32::try_from(entry.json.len())
        .map_err(|_| Error::invalid("entries", "an entry is larger than 4 GiB"))?;
    let mut out = Vec::with_capacity(entry.json.len() + 12);
    out.extend_from_slice(&entry.recorded_at.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&entry.json);
    Ok(out.into())
}

/// Parses a run body into `(recorded_at, seq, json)`, numbering from `first_seq`.
pub(super) fn decode_run(
    mut body: Bytes,
    run: &Run,
    out: &mut Vec<(i64, u64, Bytes)>,
) -> Result<(), Error> {
    let damaged = |what: &str| Error::DataLoss {
        message: format!("cassette run is damaged: {what}"),
    };
    let mut seq = run.first_seq;
    while body.has_remaining() {
        if body.remaining() < 12 {
            return Err(damaged("a frame header is cut short"));
        }
        let recorded_at = body.get_i64();
        let len = body.get_u32() as usize;
        if body.remaining() < len {
            return Err(damaged("an entry is cut short"));
        }
        out.push((recorded_at, seq, body.split_to(len)));
        seq += 1;
    }
    if seq - run.first_seq != run.count {
        return Err(damaged(
            "it holds a different number of entries than its head says",
        ));
    }
    Ok(())
}

/// The head of a new cassette. Arrival numbers start from the clock, so
/// they keep growing when a cassette is deleted and created again.
pub(super) fn new_head() -> Head {
    let now = now_micros();
    Head {
        created_at: now,
        next_seq: u64::try_from(now).unwrap_or(0) << 12,
        runs: Vec::new(),
        applied: BTreeMap::new(),
        written_by: 0,
    }
}

pub(super) const RECORD_VERSION: u8 = 1;

/// Every suite's archive of one ref.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct RefRecord {
    /// Upload time of the ref's last upload, microseconds.
    pub(super) uploaded_at: i64,
    /// Arrival stamp of that upload: breaks ties between equal times.
    pub(super) seq: u64,
    /// Archives by suite. Empty: a tombstone, the ref is being removed.
    pub(super) suites: BTreeMap<String, ValueRecord>,
}

pub(super) fn encode_ref(record: &RefRecord) -> Result<Vec<u8>, Error> {
    let mut out = vec![RECORD_VERSION];
    out.extend_from_slice(&postcard::to_stdvec(record).map_err(Error::internal)?);
    Ok(out)
}

pub(super) fn decode_ref(bytes: &[u8]) -> Result<RefRecord, Error> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| Error::DataLoss {
            message: format!("unreadable cache ref record: {e}"),
        }),
        _ => Err(Error::DataLoss {
            message: "cache ref record has an unknown format".into(),
        }),
    }
}

/// The blobs a stored ref record references (for reclaim).
pub(super) fn ref_record_blobs(bytes: &[u8]) -> Result<Vec<u64>, Error> {
    Ok(decode_ref(bytes)?
        .suites
        .values()
        .filter_map(ValueRecord::blob_id)
        .collect())
}

impl Head {
    /// The blobs this head's runs are stored in.
    pub(super) fn blobs(&self) -> Vec<u64> {
        self.runs
            .iter()
            .filter_map(|run| match run.body {
                Body::Blob(id) => Some(id),
                Body::Inline(_) => None,
            })
            .collect()
    }
}
