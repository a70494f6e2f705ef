//! The log's writer thread: group commit, segment rotation, and what
//! happens when a write or `fdatasync` fails.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sled::transaction::Transactional;
use trove_proto::Error;

use super::apply::{image_lsn, ring_key};
use super::segments::{self, Segment, Spare};
use super::{image_head, Failure, Shared, Undo, APPLIED};
use crate::engine::sled::{tx_error, Faults};

/// The writer thread: group commit, segment rotation and failure handling.
pub(super) struct Writer {
    shared: Arc<Shared>,
    segment: Segment,
    spare: Option<std::thread::JoinHandle<std::io::Result<Spare>>>,
}

/// The spare's thread renames a file into the log folder: it must be done
/// before the store is closed, or it could rename over a spare of the next
/// store opened on the same folder.
impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(spare) = self.spare.take() {
            let _ = spare.join();
        }
    }
}

impl Writer {
    pub(super) fn new(shared: Arc<Shared>, segment: Segment) -> Self {
        let mut writer = Writer {
            shared,
            segment,
            spare: None,
        };
        writer.prepare_spare(segments::SEGMENT_BYTES);
        writer
    }

    /// Prepares the next segment's file, already under its name, on a
    /// thread of its own.
    fn prepare_spare(&mut self, bytes: u64) {
        let dir = self.shared.dir.clone();
        let number = self.segment.number + 1;
        self.spare = std::thread::Builder::new()
            .name("trove-log-spare".into())
            .spawn(move || segments::prepare_named(&dir, bytes, number))
            .ok();
    }

    pub(super) fn run(mut self) {
        loop {
            let (group, last) = {
                let Ok(mut state) = self.shared.state.lock() else {
                    return;
                };
                while state.pending.is_empty() && !state.stop {
                    state = match self.shared.wake.wait(state) {
                        Ok(state) => state,
                        Err(_) => return,
                    };
                }
                if state.pending.is_empty() {
                    return;
                }
                (std::mem::take(&mut state.pending), state.issued)
            };
            match self.append(&group) {
                Ok(()) => self.advance(last),
                Err(err) => {
                    if !self.fail(&err) {
                        return;
                    }
                }
            }
        }
    }

    fn append(&mut self, group: &[u8]) -> std::io::Result<()> {
        if let Some(faults) = &self.shared.faults {
            while Faults::on(&faults.stall_log) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Some(err) = faults.log_write_error() {
                return Err(err);
            }
        }
        if !self.segment.fits(group.len()) {
            self.rotate(group.len())?;
        }
        self.segment.append(group)?;
        if let Some(faults) = &self.shared.faults {
            if Faults::on(&faults.fail_flush) {
                return Err(std::io::Error::other("injected fdatasync failure"));
            }
        }
        Ok(())
    }

    /// Moves to a new segment following the last durable LSN.
    fn rotate(&mut self, group_len: usize) -> std::io::Result<()> {
        let needed = segments::size_for(group_len);
        let spare = match self.spare.take().map(|h| h.join()) {
            Some(Ok(Ok(spare))) if needed <= segments::SEGMENT_BYTES => spare,
            _ => segments::prepare(&self.shared.dir, needed)?,
        };
        let base = self.shared.durable.load(Ordering::SeqCst);
        let next = self.segment.number + 1;
        let segment = Segment::install(&self.shared.dir, spare, next, base)?;
        let old = std::mem::replace(&mut self.segment, segment);
        if let Ok(mut sealed) = self.shared.sealed.lock() {
            sealed.push((old.number, base));
        }
        self.prepare_spare(segments::SEGMENT_BYTES);
        Ok(())
    }

    fn advance(&self, last: u64) {
        self.shared.groups.fetch_add(1, Ordering::Relaxed);
        self.shared.durable.store(last, Ordering::SeqCst);
        self.shared.settled.fetch_max(last, Ordering::SeqCst);
        self.shared
            .progress
            .send_modify(|p| p.settled = p.settled.max(last));
        if let Ok(mut state) = self.shared.state.lock() {
            while state.undo.front().is_some_and(|u| u.lsn <= last) {
                state.undo.pop_front();
            }
        }
    }

    /// Undoes everything not durable, refuses writes, and reopens the log
    /// on a fresh segment. Returns false when the store is stopping.
    fn fail(&mut self, err: &std::io::Error) -> bool {
        let durable = self.shared.durable.load(Ordering::SeqCst);
        let reason = format!("the log's write or fdatasync failed ({err})");
        tracing::error!(error = %err, "log write failed; undoing the writes not yet durable and reopening the log on a fresh segment");
        let voided = {
            let Ok(mut state) = self.shared.state.lock() else {
                return false;
            };
            while let Some(undo) = state.undo.pop_back() {
                if let Err(error) = undo_one(&self.shared.log_tree, Some(durable), &undo) {
                    // The store can no longer be trusted to match the log:
                    // stay refusing until a restart replays it.
                    tracing::error!(%error, "could not undo a write that was not made durable");
                    state.refusing = Some(format!(
                        "{reason}, and undoing the writes not yet durable failed ({error}); \
                         restart the server"
                    ));
                    state.refusing_for_good = true;
                    state.pending.clear();
                    let voided = state.issued;
                    drop(state);
                    self.report_failure(durable, voided, err, reason);
                    return true;
                }
            }
            state.pending.clear();
            // A refusal until restart keeps its message.
            if !state.refusing_for_good {
                state.refusing = Some(reason.clone());
            }
            state.issued
        };
        // The undo must be on disk before new records follow the durable
        // ones: sled may already hold the undone writes in its own files,
        // and a power cut would bring them back.
        if let Err(why) = (self.shared.make_durable)() {
            tracing::error!(error = %why, "could not make the undo durable");
            if let Ok(mut state) = self.shared.state.lock() {
                state.refusing = Some(format!(
                    "{reason}, and making the undo durable failed ({why}); restart the server"
                ));
                state.refusing_for_good = true;
            }
            self.report_failure(durable, voided, err, reason);
            return true;
        }
        self.report_failure(durable, voided, err, reason);
        self.reopen(durable)
    }

    fn report_failure(&self, durable: u64, voided: u64, err: &std::io::Error, reason: String) {
        self.shared.settled.fetch_max(voided, Ordering::SeqCst);
        self.shared.progress.send_modify(|p| {
            p.settled = p.settled.max(voided);
            p.failures.push(Failure {
                from: durable + 1,
                to: voided,
                disk_full: err.kind() == std::io::ErrorKind::StorageFull,
                reason,
            });
            if p.failures.len() > 16 {
                p.failures.remove(0);
            }
        });
    }

    /// Tries, with growing pauses (or at once when a write asks), to start a
    /// fresh segment; writes resume when it exists.
    fn reopen(&mut self, durable: u64) -> bool {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.fresh_segment(durable) {
                Ok(segment) => {
                    let old = std::mem::replace(&mut self.segment, segment);
                    if let Ok(mut sealed) = self.shared.sealed.lock() {
                        sealed.push((old.number, durable));
                    }
                    self.prepare_spare(segments::SEGMENT_BYTES);
                    let Ok(mut state) = self.shared.state.lock() else {
                        return false;
                    };
                    if state.refusing_for_good {
                        return !state.stop;
                    }
                    state.refusing = None;
                    tracing::info!(
                        segment = self.segment.number,
                        "log reopened on a fresh segment; writes resume"
                    );
                    return !state.stop;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not start a fresh log segment; retrying");
                    let Ok(mut state) = self.shared.state.lock() else {
                        return false;
                    };
                    if !state.retry_now && !state.stop {
                        state = match self.shared.wake.wait_timeout(state, pause) {
                            Ok((state, _)) => state,
                            Err(_) => return false,
                        };
                    }
                    if state.stop {
                        return false;
                    }
                    state.retry_now = false;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn fresh_segment(&mut self, durable: u64) -> std::io::Result<Segment> {
        if let Some(faults) = &self.shared.faults {
            if let Some(err) = faults.log_write_error() {
                return Err(err);
            }
            if Faults::on(&faults.fail_flush) {
                return Err(std::io::Error::other("injected fdatasync failure"));
            }
        }
        // A spare prepared before the failure may hold pages the kernel
        // could not write: start from a new file.
        if let Some(handle) = self.spare.take() {
            let _ = handle.join();
        }
        let spare = segments::prepare(&self.shared.dir, segments::SEGMENT_BYTES)?;
        let segment = Segment::install(&self.shared.dir, spare, self.segment.number + 1, durable)?;
        segment.sync_header()?;
        Ok(segment)
    }
}

/// Restores the values `undo` replaced and, when `marker` is given, sets
/// the applied marker in that tree back to that LSN.
pub(super) fn undo_one(
    log_tree: &sled::Tree,
    marker: Option<u64>,
    undo: &Undo,
) -> Result<(), Error> {
    let mut all = undo.trees.clone();
    all.push(log_tree.clone());
    let count = undo.trees.len();
    let result = all.as_slice().transaction(|view| {
        for (tree, before) in view[..count].iter().zip(&undo.before) {
            for (key, value) in before {
                match value {
                    Some(value) => tree.insert(key.clone(), value.clone())?,
                    None => tree.remove(key.clone())?,
                };
            }
        }
        if let Some(lsn) = marker {
            view[count].insert(APPLIED, &lsn.to_be_bytes()[..])?;
        }
        // The image of an undone write must not be put back at the next
        // start, over what later writes leave. An undo with no trees stands
        // for a write that changed nothing, whose failed apply already
        // took its image out, or that sled holds part of: that one's image
        // must stay for the restart that puts it back.
        if count > 0 {
            view[count].remove(image_head(undo.lsn))?;
            let slot = ring_key(undo.lsn);
            if view[count].get(&slot)?.as_deref().and_then(image_lsn) == Some(undo.lsn) {
                view[count].remove(slot)?;
            }
        }
        Ok::<(), sled::transaction::ConflictableTransactionError<Error>>(())
    });
    result.map_err(tx_error)
}
