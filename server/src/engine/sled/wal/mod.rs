//! The store's write-ahead log: what makes a strict write durable.
//!
//! Every change to the database goes through [`Wal::write`]: under one
//! lock it takes the next sequence number (LSN), runs the sled transaction
//! (recording each key's value before and after, see [`logged`]) together
//! with the "applied through" marker, and queues the record. One writer
//! thread takes every queued record at once, appends them to the current
//! segment with one `write` and waits for one `fdatasync` (group commit);
//! a strict write is acknowledged after that returns. sled is then only
//! the index: it is flushed and synced in the background by a checkpoint,
//! after which the segments it covers are deleted.
//!
//! - **Reads never get ahead of the log.** A change is in sled before its
//!   record is durable, so a strict read takes a [`Wal::ticket`] before
//!   reading and calls [`Wal::barrier`] after: it waits until every LSN
//!   taken so far is *settled* (durable, or undone after a failure). The LSN
//!   is published before the transaction runs, so whatever a read saw is
//!   covered. A write does the same around its changes.
//! - **Tickets.** A failure that undid any LSN at or after an operation's
//!   ticket fails that operation: whatever it wrote or read may have been
//!   undone. (An operation that overlapped a failure without being touched
//!   by it may fail too; that is the safe side.)
//! - **A failed write or `fdatasync` is never retried.** The kernel may
//!   have dropped the pages it could not write and report the next sync
//!   clean. Instead every change not yet durable is undone in sled (newest
//!   first, from the recorded values before), the waiting writes fail, new
//!   writes are refused, and the writer starts a fresh segment whose header
//!   says which LSNs of older segments are void. Writes resume once that
//!   segment exists.
//! - **Recovery** (see [`replay`]): records after sled's applied marker are
//!   applied again in order; a torn tail is reported and cut, never applied.

mod codec;
mod logged;
mod replay;
mod segments;

pub use logged::LoggedTx;
pub use replay::{recover, Recovered};

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use sled::transaction::{ConflictableTransactionResult, Transactional};
use sled::IVec;
use tokio::sync::watch;
use trove_proto::Error;

use super::{tx_error, Faults};
use codec::RedoRef;
use logged::TreeChanges;
use segments::{Segment, Spare};

/// The key, in the log's own tree, of the last LSN applied to sled.
const APPLIED: &[u8] = b"applied";
/// Name of the tree holding [`APPLIED`].
pub const LOG_TREE: &str = "trove_log";

/// The LSN of the last record sled holds (0 for none).
pub fn applied(log_tree: &sled::Tree) -> Result<u64, Error> {
    Ok(log_tree
        .get(APPLIED)
        .map_err(super::sled_error)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0))
}

/// A range of LSNs whose records were undone, and why.
#[derive(Debug, Clone)]
struct Failure {
    from: u64,
    to: u64,
    disk_full: bool,
    reason: String,
}

/// How far the log got; sent to every waiting write.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every LSN up to here is durable or was undone.
    settled: u64,
    /// The latest failures, newest last (a few are kept: a waiter only needs
    /// the ones since it took its LSN).
    failures: Vec<Failure>,
}

/// A change not yet durable: how to undo it.
struct Undo {
    lsn: u64,
    trees: Vec<sled::Tree>,
    before: Vec<Vec<(IVec, Option<IVec>)>>,
}

#[derive(Default)]
struct State {
    /// The last LSN taken (under this lock; mirrored in `Shared::issued`).
    issued: u64,
    /// Encoded records not yet handed to the writer.
    pending: Vec<u8>,
    undo: VecDeque<Undo>,
    /// Why writes are refused right now, if they are.
    refusing: Option<String>,
    /// The refusal lasts until a restart (undoing failed).
    refusing_for_good: bool,
    /// A refused write asks the writer to try a fresh segment at once.
    retry_now: bool,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    issued: AtomicU64,
    /// Every LSN up to here is durable.
    durable: AtomicU64,
    /// Every LSN up to here is durable or was undone.
    settled: AtomicU64,
    progress: watch::Sender<Progress>,
    log_tree: sled::Tree,
    dir: PathBuf,
    faults: Option<Arc<Faults>>,
    /// Segments no longer written to, with the last LSN they may hold.
    sealed: Mutex<Vec<(u64, u64)>>,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>, Error> {
        self.state
            .lock()
            .map_err(|_| Error::internal("the log's lock is poisoned"))
    }
}

/// Handle to the log. Cheap to clone; its writer thread stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.stop = true;
        }
        self.0.wake.notify_all();
    }
}

impl Wal {
    /// Starts the log in `dir` after [`recover`]: a fresh segment following
    /// `recovered`, and the writer thread.
    pub fn start(
        log_tree: sled::Tree,
        dir: PathBuf,
        recovered: &Recovered,
        faults: Option<Arc<Faults>>,
    ) -> std::io::Result<Self> {
        let spare = segments::prepare(&dir, segments::SEGMENT_BYTES)?;
        let segment = Segment::install(&dir, spare, recovered.next_segment, recovered.last_lsn)?;
        let (progress, _) = watch::channel(Progress {
            settled: recovered.last_lsn,
            failures: Vec::new(),
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                issued: recovered.last_lsn,
                ..State::default()
            }),
            wake: Condvar::new(),
            issued: AtomicU64::new(recovered.last_lsn),
            durable: AtomicU64::new(recovered.last_lsn),
            settled: AtomicU64::new(recovered.last_lsn),
            progress,
            log_tree,
            dir,
            faults,
            sealed: Mutex::new(Vec::new()),
        });
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("trove-log".into())
            .spawn(move || Writer::new(writer, segment).run())?;
        Ok(Wal {
            _stop: Arc::new(StopOnDrop(Arc::clone(&shared))),
            shared,
        })
    }

    /// Runs `body` as one sled transaction over `trees` (in that order in
    /// [`LoggedTx::tree`]) and queues its record. Returns once the change is
    /// applied, not durable: wait with [`Wal::barrier`]. Blocking but short.
    pub fn write<T>(
        &self,
        trees: &[&sled::Tree],
        body: impl Fn(&LoggedTx<'_>) -> ConflictableTransactionResult<T, Error>,
    ) -> Result<T, Error> {
        let mut state = self.shared.lock()?;
        if let Some(reason) = &state.refusing {
            let message = format!("writes are refused until the log is reopened: {reason}");
            state.retry_now = true;
            drop(state);
            self.shared.wake.notify_all();
            return Err(Error::Unavailable { message });
        }
        let lsn = state.issued + 1;
        // Published before the change is visible, so a reader that sees it
        // waits for this LSN.
        state.issued = lsn;
        self.shared.issued.store(lsn, Ordering::SeqCst);
        let mut all: Vec<sled::Tree> = trees.iter().map(|t| (*t).clone()).collect();
        all.push(self.shared.log_tree.clone());
        let count = trees.len();
        let captured = std::cell::RefCell::new(Vec::new());
        let result = all.as_slice().transaction(|view| {
            let tx = LoggedTx::new(&view[..count]);
            let out = body(&tx)?;
            let changes = tx.into_changes();
            if changes.iter().any(|c| !c.is_empty()) {
                view[count].insert(APPLIED, &lsn.to_be_bytes()[..])?;
            }
            *captured.borrow_mut() = changes;
            Ok(out)
        });
        // Aborted or not, the LSN is taken: an empty record keeps the
        // sequence whole so that waiters on it are released.
        let changes = if result.is_ok() {
            captured.into_inner()
        } else {
            Vec::new()
        };
        queue(&mut state, lsn, &all[..count], changes);
        drop(state);
        self.shared.wake.notify_all();
        result.map_err(tx_error)
    }

    /// Taken before an operation reads or writes; hand it to
    /// [`Wal::barrier`] when the operation is done.
    pub fn ticket(&self) -> u64 {
        self.shared.settled.load(Ordering::SeqCst) + 1
    }

    /// Waits until every change applied so far is settled; fails when a
    /// failure undid any LSN from `ticket` on (the operation's own changes,
    /// or changes it may have seen, may be gone). Returns at once when
    /// nothing is waiting for the log.
    pub async fn barrier(&self, ticket: u64) -> Result<(), Error> {
        let target = self.shared.issued.load(Ordering::SeqCst);
        let mut progress = self.shared.progress.subscribe();
        loop {
            {
                let state = progress.borrow_and_update();
                if let Some(failure) = state
                    .failures
                    .iter()
                    .find(|f| f.to >= ticket && f.from <= target)
                {
                    let message = format!(
                        "the write-ahead log failed while this call was running, so what it \
                         wrote or read may have been undone: {}; retry",
                        failure.reason
                    );
                    return Err(if failure.disk_full {
                        Error::exhausted("disk space", message)
                    } else {
                        Error::Unavailable { message }
                    });
                }
                if state.settled >= target {
                    return Ok(());
                }
            }
            progress.changed().await.map_err(|_| Error::Unavailable {
                message: "the store is shutting down".into(),
            })?;
        }
    }

    /// The last durable LSN.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.durable.load(Ordering::SeqCst)
    }

    /// Why writes are refused right now, if they are.
    pub fn refusal(&self) -> Option<String> {
        self.shared.lock().ok()?.refusing.clone()
    }

    /// Deletes the segments whose every record is at or below `lsn`, which
    /// a checkpoint made durable in sled.
    pub fn release_through(&self, lsn: u64) {
        let Ok(mut sealed) = self.shared.sealed.lock() else {
            return;
        };
        sealed.retain(|&(number, last)| {
            if last > lsn {
                return true;
            }
            let path = segments::path(&self.shared.dir, number);
            match std::fs::remove_file(&path) {
                Ok(()) => false,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
                Err(err) => {
                    tracing::warn!(segment = number, error = %err, "could not delete a log segment; retried at the next checkpoint");
                    true
                }
            }
        });
    }

    /// How many sealed segments wait for a checkpoint.
    pub fn sealed_segments(&self) -> usize {
        self.shared.sealed.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// Encodes the record `lsn` into the pending group and keeps its undo.
fn queue(state: &mut State, lsn: u64, trees: &[sled::Tree], changes: Vec<TreeChanges>) {
    let names: Vec<IVec> = trees.iter().map(sled::Tree::name).collect();
    let redo = changes.iter().zip(&names).flat_map(|(tree, name)| {
        tree.iter().map(move |(key, change)| RedoRef {
            tree: name,
            key,
            value: change.after.as_deref(),
        })
    });
    codec::encode(&mut state.pending, lsn, redo);
    let mut undo = Undo {
        lsn,
        trees: Vec::new(),
        before: Vec::new(),
    };
    for (tree, changes) in trees.iter().zip(changes) {
        if changes.is_empty() {
            continue;
        }
        undo.trees.push(tree.clone());
        undo.before.push(
            changes
                .into_iter()
                .map(|(key, change)| (key, change.before))
                .collect(),
        );
    }
    state.undo.push_back(undo);
}

/// The writer thread: group commit, segment rotation and failure handling.
struct Writer {
    shared: Arc<Shared>,
    segment: Segment,
    spare: Option<std::thread::JoinHandle<std::io::Result<Spare>>>,
}

impl Writer {
    fn new(shared: Arc<Shared>, segment: Segment) -> Self {
        let mut writer = Writer {
            shared,
            segment,
            spare: None,
        };
        writer.prepare_spare(segments::SEGMENT_BYTES);
        writer
    }

    fn prepare_spare(&mut self, bytes: u64) {
        let dir = self.shared.dir.clone();
        self.spare = std::thread::Builder::new()
            .name("trove-log-spare".into())
            .spawn(move || segments::prepare(&dir, bytes))
            .ok();
    }

    fn run(mut self) {
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
                if let Err(error) = undo_one(&self.shared.log_tree, &undo, durable) {
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
            state.refusing = Some(reason.clone());
            state.issued
        };
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
        self.prepare_spare(segments::SEGMENT_BYTES);
        Ok(segment)
    }
}

/// Restores the values `undo` replaced and sets the applied marker back.
fn undo_one(log_tree: &sled::Tree, undo: &Undo, durable: u64) -> Result<(), Error> {
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
        view[count].insert(APPLIED, &durable.to_be_bytes()[..])?;
        Ok::<(), sled::transaction::ConflictableTransactionError<Error>>(())
    });
    result.map_err(tx_error)
}
