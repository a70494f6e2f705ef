//! The record formats the bucket engine writes besides the shared value
//! record ([`crate::engine::record`]): a cassette's head (its runs of
//! entries) and a cache ref record (every suite's archive of one ref). Both
//! are versioned postcard; what a reader finds in them is all it trusts.

use std::collections::BTreeMap;

use bytes::{Buf, Bytes};
use serde::{Deserialize, Serialize};
use trove_proto::types::now_micros;
use trove_proto::Error;

use crate::engine::record::{Body, ValueRecord};

/// Version 2: runs say whether their frames are sorted (with explicit
/// arrival numbers) and how many bytes they hold; idempotency keys are kept
/// in the order they were applied, the newest [`MAX_APPLIED_KEYS`] only.
pub(super) const HEAD_VERSION: u8 = 2;
/// Version 1: runs in arrival order with positional arrival numbers, and
/// every idempotency key ever applied.
const HEAD_V1: u8 = 1;

/// Idempotency keys a head remembers: a retry comes within seconds or
/// minutes of its first attempt, while a long-lived cassette appended with
/// a fresh key each time would otherwise grow its head without bound.
pub(super) const MAX_APPLIED_KEYS: usize = 1024;

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
    /// Idempotency keys applied to the current content, with their counts,
    /// oldest first.
    pub(super) applied: Vec<(String, u64)>,
    /// Random id of the write that produced this head.
    pub(super) written_by: u64,
    /// Ids of the newest runs merged away by compaction: an append whose
    /// reply was lost finds its run here once it was merged.
    pub(super) merged_runs: Vec<u64>,
}

/// Ids of merged runs a head remembers.
pub(super) const MAX_MERGED_RUNS: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Run {
    /// Random id of the write that added the run: a retry whose first
    /// attempt landed (its reply lost) finds it and does not add it again.
    pub(super) id: u64,
    pub(super) first_seq: u64,
    pub(super) count: u64,
    pub(super) body: Body,
    /// Frames carry their arrival number and come in read order (see
    /// [`super::runs`]); otherwise (runs written by version 1) they are in
    /// arrival order, numbered by position.
    pub(super) sorted: bool,
    /// Length of the body (0 when unknown: version 1 blob runs).
    pub(super) bytes: u64,
}

#[derive(Deserialize)]
struct HeadV1 {
    created_at: i64,
    next_seq: u64,
    runs: Vec<RunV1>,
    applied: BTreeMap<String, u64>,
    written_by: u64,
}

#[derive(Deserialize)]
struct RunV1 {
    id: u64,
    first_seq: u64,
    count: u64,
    body: Body,
}

impl Head {
    /// The count an idempotency key was applied with, if it was.
    pub(super) fn applied(&self, key: &str) -> Option<u64> {
        self.applied
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, count)| *count)
    }

    /// Whether the run a write added is in this head, or was merged away.
    pub(super) fn has_run(&self, id: u64) -> bool {
        self.runs.iter().any(|run| run.id == id) || self.merged_runs.contains(&id)
    }

    /// Records `key` as applied, forgetting the oldest keys past the bound.
    pub(super) fn apply(&mut self, key: String, count: u64) {
        self.applied.push((key, count));
        let excess = self.applied.len().saturating_sub(MAX_APPLIED_KEYS);
        self.applied.drain(..excess);
    }
}

pub(super) fn encode_head(head: &Head) -> Result<Vec<u8>, Error> {
    let mut out = vec![HEAD_VERSION];
    out.extend_from_slice(&postcard::to_stdvec(head).map_err(Error::internal)?);
    Ok(out)
}

pub(super) fn decode_head(bytes: &[u8]) -> Result<Head, Error> {
    let unreadable = |e: postcard::Error| Error::DataLoss {
        message: format!("unreadable cassette head: {e}"),
    };
    match bytes.split_first() {
        Some((&HEAD_VERSION, rest)) => postcard::from_bytes(rest).map_err(unreadable),
        Some((&HEAD_V1, rest)) => {
            let old: HeadV1 = postcard::from_bytes(rest).map_err(unreadable)?;
            Ok(Head {
                created_at: old.created_at,
                next_seq: old.next_seq,
                runs: old
                    .runs
                    .into_iter()
                    .map(|run| Run {
                        bytes: match &run.body {
                            Body::Inline(data) => data.len() as u64,
                            Body::Blob(_) | Body::Packed { .. } => 0,
                        },
                        id: run.id,
                        first_seq: run.first_seq,
                        count: run.count,
                        body: run.body,
                        sorted: false,
                    })
                    .collect(),
                applied: old.applied.into_iter().collect(),
                written_by: old.written_by,
                merged_runs: Vec::new(),
            })
        }
        _ => Err(Error::DataLoss {
            message: "cassette head has an unknown format".into(),
        }),
    }
}

/// The blobs a stored head references (for reclaim).
pub(super) fn head_blobs(bytes: &[u8]) -> Result<Vec<u64>, Error> {
    Ok(decode_head(bytes)?.blobs())
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
        applied: Vec::new(),
        written_by: 0,
        merged_runs: Vec::new(),
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
                Body::Inline(_) | Body::Packed { .. } => None,
            })
            .collect()
    }
}
