//! The store's write-ahead log: what makes a strict write durable.
//!
//! Every change to the database goes through [`Wal::write`]: under one
//! lock it takes the next sequence number (LSN), runs the write's body
//! against an overlay (recording each key's value before and after, see
//! [`logged`]), applies the overlay to sled between an image of the values
//! before and the "applied through" marker, and queues the record. One writer
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
//!   is published before the change is applied, so whatever a read saw is
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
//! - **Recovery** (see [`replay`]): a write sled holds only part of is
//!   taken out; records after sled's applied marker are applied again in
//!   order; a torn tail is reported and cut, never applied.
//! - **Readers** see a write's keys change one after another within
//!   microseconds, not at one instant: every read path already reads key by
//!   key (sled's scans were never atomic with its transactions), and writes
//!   never overlap each other.

mod apply;
mod codec;
mod logged;
mod replay;
mod segments;
mod writer;

pub use logged::{LoggedTree, LoggedTx};
pub use replay::{recover, Recovered};

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sled::transaction::ConflictableTransactionResult;
use sled::IVec;
use tokio::sync::watch;
use trove_proto::Error;

use super::packs::Packs;
use super::{body_error, sled_error, Faults};
#[cfg(test)]
use apply::image_key;
use apply::{apply, encode_redo, undo_of, IMAGE_RING_SLOTS};
pub(super) use apply::{image_head, read_legacy_image};
use segments::Segment;
use writer::Writer;

/// The key, in the log's own tree, of the last LSN applied to sled.
const APPLIED: &[u8] = b"applied";
/// The prefix, in the log's own tree, of the images of the values before
/// each write (by LSN, then piece): written before its changes, and kept
/// until a checkpoint covers the write, so that a start can put back a
/// write that was cut part way, or whose record never became durable.
const IMAGES: &[u8] = b"img:";
/// The prefix, in the log's own tree, of the ring of image slots (see
/// `apply::IMAGE_RING_SLOTS`).
const IMAGE_RING: &[u8] = b"ring:";
/// The key older versions kept a single image under.
const UNDO_IMAGE: &[u8] = b"undo";
/// The key, in the log's own tree, of the last LSN a checkpoint covered:
/// packs were synced through it, and the log holds every record after it.
const CHECKPOINTED: &[u8] = b"checkpointed";
/// Name of the tree holding [`APPLIED`], [`CHECKPOINTED`] and the images.
pub const LOG_TREE: &str = "trove_log";

/// The LSN of the last record sled holds (0 for none).
pub fn applied(log_tree: &sled::Tree) -> Result<u64, Error> {
    read_lsn(log_tree, APPLIED)
}

/// The LSN of the last checkpoint (0 for none).
pub fn checkpointed(log_tree: &sled::Tree) -> Result<u64, Error> {
    read_lsn(log_tree, CHECKPOINTED)
}

fn read_lsn(log_tree: &sled::Tree, key: &[u8]) -> Result<u64, Error> {
    Ok(log_tree
        .get(key)
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

impl Progress {
    /// Whether every LSN through `target` is settled; an error when a
    /// failure undid any LSN from `ticket` on (what the caller wrote or read
    /// may be gone).
    fn settled_for(&self, ticket: u64, target: u64) -> Result<bool, Error> {
        if let Some(failure) = self
            .failures
            .iter()
            .find(|f| f.to >= ticket && f.from <= target)
        {
            let message = format!(
                "the write-ahead log failed while this call was running, so what it wrote or \
                 read may have been undone: {}; retry",
                failure.reason
            );
            return Err(if failure.disk_full {
                Error::exhausted("disk space", message)
            } else {
                Error::Unavailable { message }
            });
        }
        Ok(self.settled >= target)
    }
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
    /// The last LSN of a write that readers wait for (see [`Wal::write_quiet`]).
    issued_for_readers: AtomicU64,
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
    /// Groups written (one `fdatasync` each).
    groups: AtomicU64,
    /// Flushes and syncs sled: run after an undo, before writes resume.
    make_durable: MakeDurable,
    /// Where values bound for packs go; `None` keeps them in their records.
    packs: Option<Arc<Packs>>,
}

/// Flushes sled and syncs its files; the reason when that failed.
pub type MakeDurable = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

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

/// Stops the writer when the last handle goes, and waits for it: it writes
/// what is pending first, and the database is closed when this returns.
struct StopOnDrop {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stop = true;
        }
        self.shared.wake.notify_all();
        if let Some(writer) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = writer.join();
        }
    }
}

impl Wal {
    /// Starts the log in `dir` after [`recover`]: a fresh segment following
    /// `recovered`, and the writer thread. Values bound for packs go to
    /// `packs` (when `None`, they stay in their records).
    pub fn start(
        log_tree: sled::Tree,
        dir: PathBuf,
        recovered: &Recovered,
        faults: Option<Arc<Faults>>,
        make_durable: MakeDurable,
        packs: Option<Arc<Packs>>,
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
            issued_for_readers: AtomicU64::new(recovered.last_lsn),
            durable: AtomicU64::new(recovered.last_lsn),
            settled: AtomicU64::new(recovered.last_lsn),
            progress,
            log_tree,
            dir,
            faults,
            sealed: Mutex::new(Vec::new()),
            groups: AtomicU64::new(0),
            make_durable,
            packs,
        });
        let writer = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("trove-log".into())
            .spawn(move || Writer::new(writer, segment).run())?;
        Ok(Wal {
            _stop: Arc::new(StopOnDrop {
                shared: Arc::clone(&shared),
                writer: Mutex::new(Some(writer)),
            }),
            shared,
        })
    }

    /// Runs `body` over `trees` (in that order in [`LoggedTx::tree`]),
    /// applies what it changed to sled and queues its record. Returns once
    /// the change is applied, not durable: wait with [`Wal::barrier`].
    /// Blocking but short. An error from `body` changes nothing.
    pub fn write<T>(
        &self,
        trees: &[&sled::Tree],
        body: impl Fn(&LoggedTx<'_>) -> ConflictableTransactionResult<T, Error>,
    ) -> Result<T, Error> {
        self.write_logged(trees, body, false)
    }

    /// Like [`Wal::write`], for housekeeping (eviction, recording uses)
    /// that readers need not wait for: a read that sees it before it is
    /// durable can only see a cache value gone that a crash brings back.
    /// [`Wal::barrier`] still covers it, so a blob it unreferenced is
    /// unlinked only once it is durable.
    pub fn write_quiet<T>(
        &self,
        trees: &[&sled::Tree],
        body: impl Fn(&LoggedTx<'_>) -> ConflictableTransactionResult<T, Error>,
    ) -> Result<T, Error> {
        self.write_logged(trees, body, true)
    }

    fn write_logged<T>(
        &self,
        trees: &[&sled::Tree],
        body: impl Fn(&LoggedTx<'_>) -> ConflictableTransactionResult<T, Error>,
        quiet: bool,
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
        if !quiet {
            self.shared.issued_for_readers.store(lsn, Ordering::SeqCst);
        }
        let trees: Vec<sled::Tree> = trees.iter().map(|t| (*t).clone()).collect();
        let packs = self.shared.packs.as_deref();
        let tx = LoggedTx::new(&trees, packs);
        let outcome = body(&tx).map_err(body_error);
        // The slot's last image belongs to a write this much older, which
        // no start needs once it is settled.
        let ring_slot_free =
            self.shared.settled.load(Ordering::SeqCst) >= lsn.saturating_sub(IMAGE_RING_SLOTS);
        let (changes, packed) = tx.into_changes();
        let log_tree = &self.shared.log_tree;
        let mut partly_applied = false;
        let outcome = match outcome {
            Ok(value) if changes.iter().any(|c| !c.is_empty()) => {
                // Encoded before anything is applied: a change set too large
                // for a record is refused without touching sled.
                let mut record = Vec::new();
                match encode_redo(&mut record, lsn, &trees, &changes, &packed) {
                    Err(err) => Err(err),
                    Ok(()) => match apply(
                        &trees,
                        &changes,
                        &packed,
                        packs,
                        log_tree,
                        lsn,
                        ring_slot_free,
                    ) {
                        Ok(()) => Ok((value, Some((record, changes)))),
                        Err(failed) => {
                            if !failed.undone {
                                // sled holds part of this write and its image:
                                // only a restart can take it out again.
                                partly_applied = true;
                                state.refusing = Some(format!(
                                    "a write failed part way in the database and could not be \
                                     undone ({}); restart the server",
                                    failed.error
                                ));
                                state.refusing_for_good = true;
                            }
                            Err(failed.error)
                        }
                    },
                }
            }
            Ok(value) => Ok((value, None)),
            Err(err) => Err(err),
        };
        let queued = match outcome {
            Ok((value, Some((record, changes)))) => {
                state.pending.extend_from_slice(&record);
                state.undo.push_back(undo_of(lsn, &trees, changes));
                Ok(value)
            }
            // Failed, refused or empty, the LSN is taken: an empty record
            // keeps the sequence whole so that waiters on it are released,
            // and the marker covers it so that a checkpoint may release the
            // segment that holds it.
            other => {
                // Except over a write sled holds part of: the marker stays
                // below it, so that the next start puts it back from its
                // image (and replays this empty record after).
                let marked = if partly_applied {
                    Ok(())
                } else {
                    log_tree
                        .insert(APPLIED, &lsn.to_be_bytes()[..])
                        .map(|_| ())
                        .map_err(sled_error)
                };
                codec::encode(&mut state.pending, lsn, std::iter::empty())
                    .map_err(|_| Error::internal("an empty log record does not fit"))?;
                state.undo.push_back(undo_of(lsn, &[], Vec::new()));
                marked.and(other.map(|(value, _)| value))
            }
        };
        drop(state);
        self.shared.wake.notify_all();
        queued
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
        self.settle(ticket, target).await
    }

    /// [`Wal::barrier`] for a read: waits for every change applied so far
    /// except quiet ones (see [`Wal::write_quiet`]).
    pub async fn read_barrier(&self, ticket: u64) -> Result<(), Error> {
        let target = self.shared.issued_for_readers.load(Ordering::SeqCst);
        self.settle(ticket, target).await
    }

    async fn settle(&self, ticket: u64, target: u64) -> Result<(), Error> {
        let mut progress = self.shared.progress.subscribe();
        loop {
            if progress.borrow_and_update().settled_for(ticket, target)? {
                return Ok(());
            }
            progress.changed().await.map_err(|_| Error::Unavailable {
                message: "the store is shutting down".into(),
            })?;
        }
    }

    /// [`Wal::barrier`] for a thread outside the runtime: polls until
    /// every change applied so far is settled, at most `timeout`.
    pub fn barrier_blocking(&self, ticket: u64, timeout: std::time::Duration) -> Result<(), Error> {
        let target = self.shared.issued.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + timeout;
        while !self.shared.progress.borrow().settled_for(ticket, target)? {
            if std::time::Instant::now() > deadline {
                return Err(Error::Unavailable {
                    message: "the log did not settle in time; retry".into(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(())
    }

    /// The last durable LSN.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.durable.load(Ordering::SeqCst)
    }

    /// Why writes are refused right now, if they are.
    pub fn refusal(&self) -> Option<String> {
        self.shared.lock().ok()?.refusing.clone()
    }

    /// Stops every write from applying changes until the guard is dropped.
    /// A checkpoint holds it so that sled creates no file while it is being
    /// synced: sled writes a large log item to a file of its own without
    /// syncing it, before the log entry that points at it, and a log synced
    /// with a pointer to an item file that was created after the item files
    /// were synced would survive a power cut while the item did not.
    pub fn hold_writes(&self) -> Result<WritesHeld<'_>, Error> {
        Ok(WritesHeld(self.shared.lock()?))
    }

    /// Records, under held writes and before sled is flushed, that a
    /// checkpoint covers `lsn`: the packs were synced through it.
    pub fn mark_checkpoint(&self, lsn: u64) -> Result<(), Error> {
        self.shared
            .log_tree
            .insert(CHECKPOINTED, &lsn.to_be_bytes()[..])
            .map(|_| ())
            .map_err(sled_error)
    }

    /// The LSN of the last write sled holds whole (see [`applied`]).
    pub fn applied_marker(&self) -> Result<u64, Error> {
        applied(&self.shared.log_tree)
    }

    /// Removes the images kept under keys of their own of writes at or
    /// below `lsn`, which a checkpoint covers: no start will need to put
    /// them back. (Ring slots stay until a later write takes them.)
    pub fn forget_images_through(&self, lsn: u64) -> Result<(), Error> {
        forget_images(&self.shared.log_tree, lsn)
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

    /// Groups written so far, each one `write` and one `fdatasync`.
    #[cfg(test)]
    pub fn groups(&self) -> u64 {
        self.shared.groups.load(Ordering::Relaxed)
    }

    /// How many sealed segments wait for a checkpoint.
    pub fn sealed_segments(&self) -> usize {
        self.shared.sealed.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// Every image key in `log_tree` (ring slots and keys of their own), in
/// the order [`forget_all_images`] removes them: newest write first, and
/// of a write in pieces piece 0 first.
fn image_keys_newest_first(log_tree: &sled::Tree) -> Result<Vec<IVec>, Error> {
    let mut keys: Vec<(u64, u32, IVec)> = Vec::new();
    for item in log_tree.scan_prefix(IMAGES) {
        let (key, _) = item.map_err(sled_error)?;
        // A key that does not parse names no write: removed first.
        let (lsn, index) = apply::parse_image_key(&key).unwrap_or((u64::MAX, 0));
        keys.push((lsn, index, key));
    }
    for item in log_tree.scan_prefix(IMAGE_RING) {
        let (key, slot) = item.map_err(sled_error)?;
        keys.push((apply::image_lsn(&slot).unwrap_or(u64::MAX), 0, key));
    }
    keys.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(keys.into_iter().map(|(_, _, key)| key).collect())
}

/// Removes every image at the end of recovery (none is needed any more,
/// and LSNs above the durable end are issued again), newest write first:
/// sled keeps a prefix of its operations, so a crash part way leaves the
/// images of the oldest writes, and putting those back again yields the
/// same state. Removed oldest first, a crash could leave only a newer
/// write's image, and putting that back would restore a value an older
/// undurable write had written.
fn forget_all_images(log_tree: &sled::Tree) -> Result<(), Error> {
    for key in image_keys_newest_first(log_tree)? {
        log_tree.remove(key).map_err(sled_error)?;
    }
    Ok(())
}

/// Removes the images of writes at or below `lsn` (which a checkpoint
/// covers: no start needs them) kept under keys of their own; ring slots
/// are overwritten instead.
fn forget_images(log_tree: &sled::Tree, lsn: u64) -> Result<(), Error> {
    let end = apply::image_key(lsn.saturating_add(1), 0);
    for key in log_tree.range(IMAGES.to_vec()..end).keys() {
        log_tree
            .remove(key.map_err(sled_error)?)
            .map_err(sled_error)?;
    }
    Ok(())
}

/// Writes are held while this lives (see [`Wal::hold_writes`]).
pub struct WritesHeld<'a>(#[allow(dead_code)] MutexGuard<'a, State>);

#[cfg(test)]
mod tests;
