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

use super::{body_error, sled_error, Faults};
use codec::RedoRef;
use logged::TreeChanges;
use segments::Segment;
use writer::{undo_one, Writer};

/// The key, in the log's own tree, of the last LSN applied to sled.
const APPLIED: &[u8] = b"applied";
/// The key, in the log's own tree, of the values before the last write
/// applied to sled: written before its changes, so that a start that finds
/// it newer than [`APPLIED`] can put back a write that was cut part way.
const UNDO_IMAGE: &[u8] = b"undo";
/// Name of the tree holding [`APPLIED`] and [`UNDO_IMAGE`].
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
    /// Groups written (one `fdatasync` each).
    groups: AtomicU64,
    /// Flushes and syncs sled: run after an undo, before writes resume.
    make_durable: MakeDurable,
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
    /// `recovered`, and the writer thread.
    pub fn start(
        log_tree: sled::Tree,
        dir: PathBuf,
        recovered: &Recovered,
        faults: Option<Arc<Faults>>,
        make_durable: MakeDurable,
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
            groups: AtomicU64::new(0),
            make_durable,
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
        let trees: Vec<sled::Tree> = trees.iter().map(|t| (*t).clone()).collect();
        let tx = LoggedTx::new(&trees);
        let outcome = body(&tx).map_err(body_error);
        let changes = tx.into_changes();
        let log_tree = &self.shared.log_tree;
        let outcome = match outcome {
            Ok(value) if changes.iter().any(|c| !c.is_empty()) => {
                // Encoded before anything is applied: a change set too large
                // for a record is refused without touching sled.
                let mut record = Vec::new();
                match encode_redo(&mut record, lsn, &trees, &changes) {
                    Err(err) => Err(err),
                    Ok(()) => match apply(&trees, &changes, log_tree, lsn) {
                        Ok(()) => Ok((value, Some((record, changes)))),
                        Err(failed) => {
                            if !failed.undone {
                                // sled holds part of this write and its image:
                                // only a restart can take it out again.
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
                let marked = log_tree
                    .insert(APPLIED, &lsn.to_be_bytes()[..])
                    .map(|_| ())
                    .map_err(sled_error);
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

    /// Stops every write from applying changes until the guard is dropped.
    /// A checkpoint holds it so that sled creates no file while it is being
    /// synced: sled writes a large log item to a file of its own without
    /// syncing it, before the log entry that points at it, and a log synced
    /// with a pointer to an item file that was created after the item files
    /// were synced would survive a power cut while the item did not.
    pub fn hold_writes(&self) -> Result<WritesHeld<'_>, Error> {
        Ok(WritesHeld(self.shared.lock()?))
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

/// Writes are held while this lives (see [`Wal::hold_writes`]).
pub struct WritesHeld<'a>(#[allow(dead_code)] MutexGuard<'a, State>);

/// The largest piece of an undo image stored as one sled value: well under
/// a quarter of the smallest sled segment in use (sled writes a larger item
/// to a file of its own that it never syncs).
const IMAGE_PIECE_BYTES: usize = 64 * 1024;

/// The key of piece `index` of the undo image.
fn image_key(index: u32) -> Vec<u8> {
    let mut key = UNDO_IMAGE.to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// Reads back the undo image of a write newer than `applied`: piece 0
/// starts with the number of pieces and the write's LSN. `None` when there
/// is no image, or it belongs to a write the marker covers (its other
/// pieces may have been overwritten since).
pub(super) fn read_image(log_tree: &sled::Tree, applied: u64) -> Result<Option<Vec<u8>>, Error> {
    let Some(first) = log_tree.get(image_key(0)).map_err(sled_error)? else {
        return Ok(None);
    };
    let damaged = || Error::DataLoss {
        message: "the database's image of its last write is incomplete; restore the data \
                  folder from a backup"
            .into(),
    };
    let (count, rest) = first.split_first_chunk::<4>().ok_or_else(damaged)?;
    let (lsn, head) = rest.split_first_chunk::<8>().ok_or_else(damaged)?;
    if u64::from_be_bytes(*lsn) <= applied {
        return Ok(None);
    }
    let mut image = head.to_vec();
    for index in 1..u32::from_be_bytes(*count) {
        let piece = log_tree.get(image_key(index)).map_err(sled_error)?;
        image.extend_from_slice(&piece.ok_or_else(damaged)?);
    }
    Ok(Some(image))
}

/// The key whose removal forgets the undo image (piece 0 names the
/// others).
pub(super) fn image_head() -> Vec<u8> {
    image_key(0)
}

/// Why [`apply`] failed, and whether sled was put back.
#[derive(Debug)]
struct ApplyFailed {
    error: Error,
    undone: bool,
}

/// Applies `changes` to sled between two writes of the log's own tree:
/// first the values before ([`UNDO_IMAGE`], in pieces, piece 0 last), last
/// the applied marker. sled recovers a prefix of its own log, so after a
/// crash either the marker says the whole write is in, or the image is
/// there to take a partial write out again ([`replay`]); a write whose
/// record is durable is then replayed whole. When sled fails part way,
/// what was applied is put back.
fn apply(
    trees: &[sled::Tree],
    changes: &[TreeChanges],
    log_tree: &sled::Tree,
    lsn: u64,
) -> Result<(), ApplyFailed> {
    let failed = |error: Error| ApplyFailed {
        error,
        undone: true,
    };
    let names: Vec<IVec> = trees.iter().map(sled::Tree::name).collect();
    let before = changes.iter().zip(&names).flat_map(|(tree, name)| {
        tree.iter().map(move |(key, change)| RedoRef {
            tree: name,
            key,
            value: change.before.as_deref(),
        })
    });
    let mut image = Vec::new();
    codec::encode(&mut image, lsn, before).map_err(|_| failed(too_large()))?;
    let pieces: Vec<&[u8]> = image.chunks(IMAGE_PIECE_BYTES).collect();
    let count = u32::try_from(pieces.len()).map_err(|_| failed(too_large()))?;
    for (index, piece) in (1..count).zip(&pieces[1..]) {
        log_tree
            .insert(image_key(index), *piece)
            .map_err(|e| failed(sled_error(e)))?;
    }
    let mut first = count.to_be_bytes().to_vec();
    first.extend_from_slice(&lsn.to_be_bytes());
    first.extend_from_slice(pieces.first().copied().unwrap_or_default());
    log_tree
        .insert(image_key(0), first)
        .map_err(|e| failed(sled_error(e)))?;
    let applied = (|| -> Result<(), sled::Error> {
        for (tree, changes) in trees.iter().zip(changes) {
            for (key, change) in changes {
                match &change.after {
                    Some(value) => tree.insert(key, value.clone())?,
                    None => tree.remove(key)?,
                };
            }
        }
        log_tree.insert(APPLIED, &lsn.to_be_bytes()[..])?;
        Ok(())
    })();
    let Err(err) = applied else {
        return Ok(());
    };
    let undo = undo_of(lsn, trees, changes.to_vec());
    match undo_one(log_tree, None, &undo) {
        Ok(()) => Err(failed(sled_error(err))),
        Err(undo_error) => Err(ApplyFailed {
            error: Error::Unavailable {
                message: format!(
                    "the database failed part way through a write ({err}) and putting it back \
                     failed too ({undo_error}); restart the server"
                ),
            },
            undone: false,
        }),
    }
}

fn too_large() -> Error {
    Error::invalid(
        "request",
        "it changes more than 4 GiB at once; send it in smaller parts",
    )
}

/// Encodes the record `lsn` (the values after) into `out`.
fn encode_redo(
    out: &mut Vec<u8>,
    lsn: u64,
    trees: &[sled::Tree],
    changes: &[TreeChanges],
) -> Result<(), Error> {
    let names: Vec<IVec> = trees.iter().map(sled::Tree::name).collect();
    let redo = changes.iter().zip(&names).flat_map(|(tree, name)| {
        tree.iter().map(move |(key, change)| RedoRef {
            tree: name,
            key,
            value: change.after.as_deref(),
        })
    });
    codec::encode(out, lsn, redo).map_err(|_| too_large())
}

/// How to undo the write `lsn`: its values before, per tree that changed.
fn undo_of(lsn: u64, trees: &[sled::Tree], changes: Vec<TreeChanges>) -> Undo {
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
    undo
}

#[cfg(test)]
mod tests;
