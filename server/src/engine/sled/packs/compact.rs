//! Compaction: reclaiming the space of packed values that were deleted,
//! replaced or evicted.
//!
//! A sealed pack whose dead share reaches [`DEAD_PERCENT`] has its live
//! values rewritten at the tail, in logged writes that move each record's
//! pointer only if it still points there (a concurrent overwrite wins).
//! The pack is deleted only once those writes are durable, a checkpoint
//! covers them (so no replay writes into it again, and no start puts back
//! a pointer to it), and a last scan finds no record pointing into it.
//! Readers that found an old pointer read the file they opened, or read
//! the record again.
//!
//! Live bytes per pack come from a scan of the records (packed values keep
//! no reference of their own, see `refs`). A pass runs only after a good
//! share of a pack was freed, in a thread of low priority.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sled::transaction::ConflictableTransactionError;
use sled::IVec;
use trove_proto::Error;

use super::refs;
use super::spill::{self, Spilled};
use super::PackLoc;
use crate::engine::record::{self, Body};
use crate::engine::sled::{durable, io_error, sled_error, SledStore};

/// A sealed pack is compacted once at least this share of it is dead.
pub const DEAD_PERCENT: u64 = 50;
/// Values moved per logged write.
const MOVE_BATCH: usize = 256;
/// Bytes moved per logged write, at most (and one value more): spilled
/// JSON values can be as long as a message, and a write holds the log.
const MOVE_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// How long a pass waits for its moves to become durable.
const DURABLE_WAIT: Duration = Duration::from_secs(60);
/// How often the compaction thread looks for work (at most).
const POLL: Duration = Duration::from_secs(2);
/// Bytes freed that make a pass worth its scan of the references.
const PASS_AFTER_FREED: u64 = super::PACK_BYTES / 4;
/// The default of `StoreOptions::compaction_interval`, in milliseconds
/// (the server's `--compaction-interval-ms`).
pub const COMPACTION_INTERVAL_MS: u64 = 60_000;
/// The default of `StoreOptions::compaction_interval`: any freed bytes
/// make a pass worth it after this long.
pub const COMPACTION_INTERVAL: Duration = Duration::from_millis(COMPACTION_INTERVAL_MS);

/// Values read for moving, gathered into batches of at most [`MOVE_BATCH`]
/// values or about [`MOVE_BATCH_BYTES`] bytes, each moved in one logged
/// write.
struct MoveBatches<T> {
    batch: Vec<T>,
    bytes: usize,
}

impl<T> Default for MoveBatches<T> {
    fn default() -> Self {
        MoveBatches {
            batch: Vec::new(),
            bytes: 0,
        }
    }
}

impl<T> MoveBatches<T> {
    /// Adds a value of `len` bytes; returns the batch once it is full.
    fn push(&mut self, item: T, len: usize) -> Option<Vec<T>> {
        self.batch.push(item);
        self.bytes += len;
        if self.batch.len() < MOVE_BATCH && self.bytes < MOVE_BATCH_BYTES {
            return None;
        }
        self.bytes = 0;
        Some(std::mem::take(&mut self.batch))
    }

    /// What is left once every value was added, if anything.
    fn rest(self) -> Option<Vec<T>> {
        (!self.batch.is_empty()).then_some(self.batch)
    }
}

/// Adds the values and bytes one batch moved to `total`.
fn add(total: &mut (u64, u64), batch: (u64, u64)) {
    total.0 += batch.0;
    total.1 += batch.1;
}

/// What one compaction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionPass {
    /// Packs deleted.
    pub packs_removed: u64,
    /// Values rewritten at the tail.
    pub values_moved: u64,
    /// Bytes those values hold.
    pub bytes_moved: u64,
    /// Bytes of pack files deleted.
    pub bytes_reclaimed: u64,
}

impl SledStore {
    /// Starts the compaction thread: a first pass a while after start
    /// (what was freed before a restart is not counted; starting is left
    /// to the callers), then one whenever enough space was freed. It holds
    /// the store only while a pass runs.
    pub(in crate::engine::sled) fn start_compaction(&self) {
        let weak = std::sync::Arc::downgrade(&self.inner);
        let interval = self.inner.options.compaction_interval;
        let poll = POLL.min(interval);
        let after_freed = PASS_AFTER_FREED.min(self.inner.options.pack_bytes / 4);
        let spawned = std::thread::Builder::new()
            .name("trove-compact".into())
            .spawn(move || {
                // On Linux the nice value is per thread: this one only.
                if let Err(err) = rustix::process::setpriority_process(None, 10) {
                    tracing::debug!(error = %err, "compaction runs at normal priority");
                }
                let mut freed = 0u64;
                let started = Instant::now();
                let mut last_pass: Option<Instant> = None;
                loop {
                    {
                        let Some(inner) = weak.upgrade() else {
                            return;
                        };
                        freed += inner.packs.take_freed();
                        let due = match last_pass {
                            None => started.elapsed() >= interval,
                            Some(at) => {
                                freed >= after_freed || (freed > 0 && at.elapsed() >= interval)
                            }
                        };
                        if due {
                            let store = SledStore { inner };
                            if let Err(err) = store.compact_packs() {
                                tracing::warn!(error = %err, "compaction pass failed; retried later");
                            }
                            freed = 0;
                            last_pass = Some(Instant::now());
                        }
                    }
                    std::thread::sleep(poll);
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(error = %err, "cannot start the compaction thread; packs are not compacted");
        }
    }

    /// Runs one compaction pass over the sealed packs. Blocking (it waits
    /// for its moves to become durable and runs a checkpoint).
    pub fn compact_packs(&self) -> Result<CompactionPass, Error> {
        let packs = &self.inner.packs;
        let sealed = packs
            .sealed()
            .map_err(|e| io_error("list the value packs", &e))?;
        let mut pass = CompactionPass::default();
        if sealed.is_empty() {
            return Ok(pass);
        }
        let live = self.live_bytes(&BTreeSet::new())?.0;
        let chosen: BTreeMap<u64, u64> = sealed
            .into_iter()
            .filter(|(pack, len)| {
                let live = live.get(pack).copied().unwrap_or(0);
                live.saturating_mul(100) <= len.saturating_mul(100 - DEAD_PERCENT)
            })
            .collect();
        if chosen.is_empty() {
            return Ok(pass);
        }
        let packs_chosen: BTreeSet<u64> = chosen.keys().copied().collect();
        let wal = &self.inner.wal;
        let moving = wal.ticket();
        for tree in self.record_trees() {
            let (values, bytes) = self.move_out(tree, &packs_chosen)?;
            pass.values_moved += values;
            pass.bytes_moved += bytes;
        }
        for tree in self.spill_trees() {
            let (values, bytes) = self.move_spilled_out(tree, &packs_chosen)?;
            pass.values_moved += values;
            pass.bytes_moved += bytes;
        }
        // Durable and not undone: no start puts a pointer back into a
        // chosen pack, and after the checkpoint no replay writes into one.
        wal.barrier_blocking(moving, DURABLE_WAIT)?;
        durable::checkpoint(wal, &self.inner.checkpoints).map_err(|reason| Error::Unavailable {
            message: format!("compaction's checkpoint failed: {reason}"),
        })?;
        // A value that could not be read keeps its pack. So does one whose
        // removal the scan saw but a failed log could still undo: the
        // barrier after the scan fails then.
        let scanning = wal.ticket();
        let still_used = self.live_bytes(&packs_chosen)?.1;
        wal.barrier_blocking(scanning, DURABLE_WAIT)?;
        for (pack, len) in chosen {
            if still_used.contains(&pack) {
                continue;
            }
            packs
                .remove(pack)
                .map_err(|e| io_error("delete a compacted pack", &e))?;
            pass.packs_removed += 1;
            pass.bytes_reclaimed += len;
        }
        packs
            .sync()
            .map_err(|e| io_error("sync the value packs' folder", &e))?;
        metrics::counter!("trove_pack_compactions_total").increment(pass.packs_removed);
        metrics::counter!("trove_pack_reclaimed_bytes_total").increment(pass.bytes_reclaimed);
        metrics::counter!("trove_pack_moved_bytes_total").increment(pass.bytes_moved);
        if pass.packs_removed > 0 {
            tracing::info!(
                packs = pass.packs_removed,
                moved = pass.values_moved,
                reclaimed = pass.bytes_reclaimed,
                "compacted value packs"
            );
        }
        Ok(pass)
    }

    /// Live bytes per pack, from a scan of every record, and which of
    /// `among` any record points into.
    fn live_bytes(
        &self,
        among: &BTreeSet<u64>,
    ) -> Result<(BTreeMap<u64, u64>, BTreeSet<u64>), Error> {
        let mut live = BTreeMap::new();
        let mut used = BTreeSet::new();
        for tree in self.record_trees() {
            for entry in tree.iter().values() {
                let bytes = entry.map_err(sled_error)?;
                let Ok(found) = record::decode(&bytes) else {
                    continue;
                };
                if let Some((loc, len)) = refs::packed(&found) {
                    *live.entry(loc.pack).or_insert(0) += len;
                    if among.contains(&loc.pack) {
                        used.insert(loc.pack);
                    }
                }
            }
        }
        for tree in self.spill_trees() {
            for value in tree.iter().values() {
                let value = value.map_err(sled_error)?;
                if let Some(spilled) = Spilled::decode(&value) {
                    *live.entry(spilled.loc.pack).or_insert(0) += spilled.len;
                    if among.contains(&spilled.loc.pack) {
                        used.insert(spilled.loc.pack);
                    }
                }
            }
        }
        Ok((live, used))
    }

    /// Rewrites at the tail every value of `tree` that lives in one of
    /// `packs`; returns how many values and bytes moved.
    fn move_out(&self, tree: &sled::Tree, packs: &BTreeSet<u64>) -> Result<(u64, u64), Error> {
        let mut moved = (0, 0);
        let mut batches = MoveBatches::default();
        for entry in tree.iter() {
            let (key, value) = entry.map_err(sled_error)?;
            let Ok(found) = record::decode(&value) else {
                continue;
            };
            let Body::Packed { pack, offset, crc } = found.body else {
                continue;
            };
            if !packs.contains(&pack) {
                continue;
            }
            let loc = PackLoc { pack, offset };
            // Read outside the write: bytes at a place never change.
            match self.inner.packs.read(loc, found.body_len, crc) {
                Ok(Some(data)) => {
                    let len = data.len();
                    if let Some(full) = batches.push((key, loc, data, crc), len) {
                        add(&mut moved, self.move_batch(tree, &full)?);
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    // Left where it is (and its pack with it) for an
                    // operator to look at; a read reports it as damaged.
                    tracing::warn!(error = ?err, pack, offset, "a packed value cannot be read; compaction leaves it");
                }
            }
        }
        if let Some(rest) = batches.rest() {
            add(&mut moved, self.move_batch(tree, &rest)?);
        }
        Ok(moved)
    }

    /// Moves the values `batch` of `tree` in one logged write, each only if
    /// its record still points where it was read from.
    pub(super) fn move_batch(
        &self,
        tree: &sled::Tree,
        batch: &[(IVec, PackLoc, Vec<u8>, u32)],
    ) -> Result<(u64, u64), Error> {
        self.write_quiet(&[tree, &self.inner.blob_refs], |tx| {
            tx.set_relocating();
            let (records, blob_refs) = (tx.tree(0), tx.tree(1));
            let (mut values, mut bytes) = (0u64, 0u64);
            for (key, loc, data, crc) in batch {
                let Some(current) = records.get(key)? else {
                    continue;
                };
                let old = record::decode(&current).map_err(ConflictableTransactionError::Abort)?;
                // Only the moved value's own place counts: a record
                // replaced meanwhile keeps its new value.
                let unchanged = old.body
                    == Body::Packed {
                        pack: loc.pack,
                        offset: loc.offset,
                        crc: *crc,
                    };
                if !unchanged {
                    continue;
                }
                let mut new = old.clone();
                new.body = Body::Inline(data.clone());
                refs::pack_body(tx, &mut new);
                let encoded = record::encode(&new).map_err(ConflictableTransactionError::Abort)?;
                records.insert(key, encoded)?;
                refs::swap(&blob_refs, key, Some(&old), Some(&new))?;
                values += 1;
                bytes += data.len() as u64;
            }
            Ok((values, bytes))
        })
    }

    /// Rewrites at the tail every spilled JSON value of `tree` that lives
    /// in one of `packs`; returns how many values and bytes moved.
    fn move_spilled_out(
        &self,
        tree: &sled::Tree,
        packs: &BTreeSet<u64>,
    ) -> Result<(u64, u64), Error> {
        let mut moved = (0, 0);
        let mut batches = MoveBatches::default();
        for item in tree.iter() {
            let (key, value) = item.map_err(sled_error)?;
            if let Some(spilled) = Spilled::decode(&value).filter(|s| packs.contains(&s.loc.pack)) {
                match self.inner.packs.read(spilled.loc, spilled.len, spilled.crc) {
                    Ok(Some(data)) => {
                        let len = data.len();
                        if let Some(full) = batches.push((key, spilled, data), len) {
                            add(&mut moved, self.move_spilled_batch(tree, &full)?);
                        }
                    }
                    Ok(None) => {}
                    Err(err) => {
                        let (pack, offset) = (spilled.loc.pack, spilled.loc.offset);
                        tracing::warn!(error = ?err, pack, offset, "a spilled value cannot be read; compaction leaves it");
                    }
                }
            }
        }
        if let Some(rest) = batches.rest() {
            add(&mut moved, self.move_spilled_batch(tree, &rest)?);
        }
        Ok(moved)
    }

    /// Moves the spilled values `batch` of `tree` in one logged write, each
    /// only if its key still holds the pointer read.
    pub(super) fn move_spilled_batch(
        &self,
        tree: &sled::Tree,
        batch: &[(IVec, Spilled, Vec<u8>)],
    ) -> Result<(u64, u64), Error> {
        self.write_quiet(&[tree], |tx| {
            tx.set_relocating();
            let values = tx.tree(0);
            let (mut moved, mut bytes) = (0u64, 0u64);
            for (key, spilled, data) in batch {
                let current = values.get(key)?;
                if current.as_deref().and_then(Spilled::decode) != Some(*spilled) {
                    continue;
                }
                values.insert(key, spill::store(tx, data))?;
                moved += 1;
                bytes += data.len() as u64;
            }
            Ok((moved, bytes))
        })
    }

    /// The trees whose values are JSON that may have spilled into packs.
    fn spill_trees(&self) -> [&sled::Tree; 2] {
        [
            &self.inner.entry_trees.entries,
            &self.inner.cache.branch_refs,
        ]
    }

    /// The trees whose records may point into packs.
    fn record_trees(&self) -> [&sled::Tree; 3] {
        [
            &self.inner.objects,
            &self.inner.artifacts,
            &self.inner.cache.refs,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch is full at `MOVE_BATCH` values or `MOVE_BATCH_BYTES` bytes,
    /// whichever comes first; what is left comes out at the end.
    #[test]
    fn batches_fill_by_count_or_by_bytes() {
        let mut batches = MoveBatches::default();
        for i in 0..MOVE_BATCH - 1 {
            assert!(batches.push(i, 1).is_none());
        }
        assert_eq!(
            batches.push(MOVE_BATCH, 1).map(|b| b.len()),
            Some(MOVE_BATCH)
        );
        assert!(batches.push(0, MOVE_BATCH_BYTES / 2).is_none());
        assert_eq!(
            batches.push(1, MOVE_BATCH_BYTES / 2).map(|b| b.len()),
            Some(2)
        );
        assert!(batches.push(2, 10).is_none());
        assert_eq!(batches.rest(), Some(vec![2]));
        assert_eq!(MoveBatches::<u8>::default().rest(), None);
    }
}
