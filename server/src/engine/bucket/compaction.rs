//! Cassette compaction on the bucket engine, and the staging of big
//! replacements as few sorted runs.
//!
//! Compaction keeps a head's runs few and its cost bounded: once a head holds
//! more than [`COMPACT_RUNS`] runs, it merges the newest ones (at most
//! [`MAX_FAN_IN`], taking an older one in only while it is no bigger than
//! twice what is merged so far), so a byte is rewritten a logarithmic number
//! of times and the merge streams. It runs in the background after an
//! append; an append that finds four times as many runs waits for it. Run
//! blobs a swap leaves behind are deleted by reclaim after its grace, so a
//! reader streaming them is never cut short.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::path::Path;
use trove_proto::entries::NewEntryStream;
use trove_proto::Error;

use super::formats::*;
use super::runs;
use super::staging::StagedBody;
use super::{BucketStore, Written};
use crate::engine::record::Body;

/// A head with more runs than this is compacted after an append.
pub(super) const COMPACT_RUNS: usize = 8;
/// Most runs one merge reads at once (compaction, and the staging of a big
/// replacement): what a merge holds is one entry and one chunk per run.
pub(super) const MAX_FAN_IN: usize = 16;

/// The runs `runs[from..]` to merge when a head holds too many: the newest
/// two at least, and each older one while it is at most twice the bytes
/// merged so far. `None` when the head needs no compaction.
fn compaction_plan(runs: &[Run]) -> Option<usize> {
    if runs.len() <= COMPACT_RUNS {
        return None;
    }
    let mut from = runs.len() - 1;
    let mut merged = runs[from].bytes.max(1);
    while from > 0 {
        let older = runs[from - 1].bytes;
        if runs.len() - from >= 2 && older > 2 * merged {
            break;
        }
        from -= 1;
        merged += older.max(1);
    }
    Some(from.max(runs.len().saturating_sub(MAX_FAN_IN)))
}

/// Run blobs a new head no longer references are left to reclaim, under
/// the markers written before the swap, instead of being deleted at once: a
/// reader that opened them before the swap keeps streaming them for up to
/// the reclaim grace (which outlasts any call).
pub(super) fn leave_for_reclaim(old_blobs: Vec<u64>, markers: Vec<u64>) {
    drop((old_blobs, markers));
}

impl BucketStore {
    /// Compacts the head at `path` off the caller's path; at most one
    /// compaction per head at a time in this process.
    pub(super) fn compact_in_background(&self, path: Path) {
        let key = path.as_ref().to_owned();
        let started = self
            .inner
            .compacting
            .lock()
            .is_ok_and(|mut busy| busy.insert(key.clone()));
        if !started {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(e) = store.compact(&path).await {
                tracing::warn!(error = %e, "cassette compaction failed; the next append retries");
            }
            if let Ok(mut busy) = store.inner.compacting.lock() {
                busy.remove(&key);
            }
        });
    }

    /// Merges the newest runs of a head (see [`compaction_plan`]), pass
    /// after pass, until it holds at most [`COMPACT_RUNS`]; best effort.
    pub(super) async fn compact(&self, path: &Path) -> Result<(), Error> {
        for _ in 0..8 {
            if !self.compact_once(path).await? {
                break;
            }
        }
        Ok(())
    }

    /// One merge of the newest runs into one, streaming; `true` when it
    /// landed and the head may still need another.
    async fn compact_once(&self, path: &Path) -> Result<bool, Error> {
        let _turn = self.turn(path).await;
        let Some((head, expect)) = self.read_head(path).await? else {
            return Ok(false);
        };
        let Some(from) = compaction_plan(&head.runs) else {
            return Ok(false);
        };
        let merging = head.runs[from..].to_vec();
        let Some(readers) = self.open_runs(&merging).await? else {
            return Ok(false);
        };
        let first_seq = merging[0].first_seq;
        let count: u64 = merging.iter().map(|r| r.count).sum();
        let frames = runs::merge(readers)
            .map(move |entry| {
                let (recorded_at, seq, json) = entry?;
                let mut frame = BytesMut::new();
                runs::push_frame(&mut frame, &(recorded_at, seq - first_seq, json))?;
                Ok(frame.freeze())
            })
            .boxed();
        let mut staged = self.stage(frames, None, path).await?;
        let write_id: u64 = rand::random();
        let mut compacted = head.clone();
        compacted.written_by = write_id;
        compacted.runs.truncate(from);
        compacted
            .merged_runs
            .extend(merging.iter().map(|run| run.id));
        let excess = compacted.merged_runs.len().saturating_sub(MAX_MERGED_RUNS);
        compacted.merged_runs.drain(..excess);
        compacted.runs.push(Run {
            id: write_id,
            first_seq,
            count,
            body: staged.body.clone(),
            sorted: true,
            bytes: staged.len,
        });
        let old_blobs: Vec<u64> = merging
            .iter()
            .filter_map(|run| match run.body {
                Body::Blob(id) => Some(id),
                Body::Inline(_) | Body::Packed { .. } => None,
            })
            .collect();
        let mut markers = Vec::new();
        for blob in &old_blobs {
            markers.push(self.mark_retiring(path, *blob).await?);
        }
        let bytes = encode_head(&compacted)?;
        staged.sending();
        let landed = match self.write(path, bytes.clone(), &expect).await? {
            Written::Done(version) => {
                self.remember(path, bytes.into(), version);
                true
            }
            // Lost, or landed with its reply lost: the stored head says.
            Written::Conflict => {
                self.forget(path);
                self.read_head(path)
                    .await?
                    .is_some_and(|(now, _)| now.written_by == write_id)
            }
        };
        if landed {
            staged.published();
            leave_for_reclaim(old_blobs, markers);
        } else {
            // Someone appended meanwhile; the next append compacts. The
            // merged blob stays with its marker for reclaim.
            self.retire(Vec::new(), markers).await;
        }
        Ok(landed && compacted.runs.len() > COMPACT_RUNS)
    }

    /// Stages a replacement's entries as sorted runs: chunks of at most
    /// [`runs::SORT_CHUNK_BYTES`] sorted in memory, and every
    /// [`MAX_FAN_IN`] runs of one size merged (streaming) into one of the
    /// next, so a replacement of any size leaves few runs and no merge reads
    /// more than [`MAX_FAN_IN`]. Returns each run's body and count, in
    /// arrival order.
    pub(super) async fn stage_sorted_runs(
        &self,
        mut entries: NewEntryStream,
        path: &Path,
    ) -> Result<Vec<(StagedBody, u64)>, Error> {
        // (body, count, level): runs in arrival order.
        let mut staged: Vec<(StagedBody, u64, u32)> = Vec::new();
        let mut chunk: Vec<(i64, Bytes)> = Vec::new();
        let mut chunk_bytes = 0usize;
        loop {
            let next = entries.next().await.transpose()?;
            let full = chunk_bytes >= runs::SORT_CHUNK_BYTES;
            if (next.is_none() || full) && !chunk.is_empty() {
                let count = chunk.len() as u64;
                let body = runs::sorted_body(std::mem::take(&mut chunk))?;
                chunk_bytes = 0;
                let one = futures::stream::once(async move { Ok(body) }).boxed();
                staged.push((self.stage(one, None, path).await?, count, 0));
                while staged.len() >= MAX_FAN_IN {
                    let tail = staged.len() - MAX_FAN_IN;
                    let level = staged[staged.len() - 1].2;
                    if staged[tail..].iter().any(|(_, _, l)| *l != level) {
                        break;
                    }
                    let group: Vec<(StagedBody, u64)> = staged
                        .drain(tail..)
                        .map(|(body, count, _)| (body, count))
                        .collect();
                    let count = group.iter().map(|(_, n)| n).sum();
                    let merged = self.merge_staged(group, path).await?;
                    staged.push((merged, count, level + 1));
                }
            }
            let Some(entry) = next else {
                return Ok(staged
                    .into_iter()
                    .map(|(body, count, _)| (body, count))
                    .collect());
            };
            chunk_bytes += entry.json.len() + 20;
            chunk.push((entry.recorded_at, entry.json));
        }
    }

    /// Merges consecutive staged runs into one staged run; the inputs are
    /// dropped (their blobs deleted) once it is written.
    async fn merge_staged(
        &self,
        group: Vec<(StagedBody, u64)>,
        path: &Path,
    ) -> Result<StagedBody, Error> {
        let mut first_seq = 0;
        let group_runs: Vec<Run> = group
            .iter()
            .map(|(body, count)| {
                let run = Run {
                    id: 0,
                    first_seq,
                    count: *count,
                    body: body.body.clone(),
                    sorted: true,
                    bytes: body.len,
                };
                first_seq += count;
                run
            })
            .collect();
        let readers = self.open_runs(&group_runs).await?.ok_or_else(|| {
            Error::internal("a staged cassette run vanished before it was merged")
        })?;
        let frames = runs::merge(readers)
            .map(|entry| {
                let entry = entry?;
                let mut frame = BytesMut::new();
                runs::push_frame(&mut frame, &entry)?;
                Ok(frame.freeze())
            })
            .boxed();
        let merged = self.stage(frames, None, path).await?;
        drop(group);
        Ok(merged)
    }
}
