//! Checkpoints: making sled itself durable, so that the log segments it
//! covers can be deleted. Writes never wait for this (they wait for the
//! log, see `wal`); a checkpoint runs in the background when a segment is
//! full, every few seconds while writes come in, and at shutdown.
//!
//! sled's own `flush` is not enough. On Linux it ends in `sync_file_range`
//! on its log, which neither flushes the device's write cache nor persists
//! the file's new size. It also writes large log items to files of their
//! own (`blobs/<lsn>` under sled's folder) and never syncs those. So a
//! flush here is:
//!
//! 1. sled's `flush` (writes the log buffers out);
//! 2. `fsync` of every log item file sled created since the last flush, then
//!    of their folder (before the log that points at them);
//! 3. `fdatasync` of sled's log file (data and the size needed to read it).
//!
//! A failed `fsync` is never retried as if it could succeed: the kernel may
//! have dropped the dirty pages it could not write and report the next
//! `fsync` clean (PostgreSQL's "fsyncgate"). After one, every later flush
//! fails too, so no write is acknowledged until the server restarts and
//! reopens the store.
//!
//! Two more sled habits are handled here at open: the segment size of new
//! databases, and its id counter, which it persists without syncing.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::packs::Packs;
use super::sled_error;
use super::wal::Wal;
use trove_proto::Error;

/// Replaces the small file at `path` with `contents`, durably: a fresh
/// file is synced before it is renamed over `path`, and the folder after.
/// A crash leaves the old contents or the new, never a mix.
pub(super) fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let fresh = path.with_extension("new");
    {
        let mut file = File::create(&fresh)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&fresh, path)?;
    let folder = path.parent().unwrap_or_else(|| Path::new("."));
    File::open(folder)?.sync_all()
}

/// Makes everything written to one sled database durable.
#[derive(Debug)]
pub struct DurableFlush {
    db: sled::Db,
    log: File,
    item_dir: PathBuf,
    /// Log item files already synced.
    synced: HashSet<OsString>,
    /// Set by the first failed sync; every later flush fails with it.
    poisoned: Option<String>,
    /// The same, readable without the flush lock (for health).
    refusal: std::sync::Arc<std::sync::OnceLock<String>>,
    /// The value packs, synced before a checkpoint is recorded.
    packs: Option<Arc<Packs>>,
}

impl DurableFlush {
    /// Opens the flush of `db`, whose files are in `sled_dir`, with the
    /// store's value packs.
    pub fn open(db: sled::Db, sled_dir: &Path, packs: Option<Arc<Packs>>) -> std::io::Result<Self> {
        let log = File::open(sled_dir.join("db"))?;
        // sled never syncs its configuration file, and reopening with
        // another segment size than the one it records is refused.
        if let Ok(conf) = File::open(sled_dir.join("conf")) {
            conf.sync_all()?;
        }
        // The log and the item folder exist from here on: make their names
        // durable once.
        File::open(sled_dir)?.sync_all()?;
        Ok(DurableFlush {
            db,
            log,
            item_dir: sled_dir.join("blobs"),
            synced: HashSet::new(),
            poisoned: None,
            refusal: std::sync::Arc::default(),
            packs,
        })
    }

    /// `fdatasync`s the value packs written since their last sync. A
    /// failure poisons every later flush, as a failed sync of sled does.
    pub fn sync_packs(&mut self) -> Result<(), String> {
        if let Some(reason) = &self.poisoned {
            return Err(reason.clone());
        }
        let Some(packs) = &self.packs else {
            return Ok(());
        };
        if let Err(err) = packs.sync() {
            return Err(self.poison(&err));
        }
        Ok(())
    }

    fn poison(&mut self, err: &std::io::Error) -> String {
        let reason = format!(
            "an fsync of the database failed ({err}); writes since the last durable point \
             may be lost and a retry cannot tell: no write is acknowledged until the server \
             is restarted"
        );
        tracing::error!(error = %err, "fsync failed; the store refuses to acknowledge writes until restarted");
        self.poisoned = Some(reason.clone());
        let _ = self.refusal.set(reason.clone());
        reason
    }

    /// Where the reason writes are refused appears, once they are.
    pub fn refusal(&self) -> std::sync::Arc<std::sync::OnceLock<String>> {
        std::sync::Arc::clone(&self.refusal)
    }

    /// Writes sled's buffers out without syncing anything (not a
    /// durability point).
    pub fn write_out(&self) -> Result<(), String> {
        self.db.flush().map(|_| ()).map_err(|e| e.to_string())
    }

    /// Flushes sled and syncs its files. After a failed sync, always fails.
    pub fn flush(&mut self) -> Result<(), String> {
        if let Some(reason) = &self.poisoned {
            return Err(reason.clone());
        }
        self.db.flush().map_err(|e| e.to_string())?;
        if let Err(err) = self.sync_files() {
            return Err(self.poison(&err));
        }
        Ok(())
    }

    fn sync_files(&mut self) -> std::io::Result<()> {
        self.sync_items()?;
        self.log.sync_data()
    }

    fn sync_items(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.item_dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err),
        };
        let mut present = HashSet::new();
        let mut created = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_all()?,
                    // Removed by sled meanwhile: nothing to keep.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                }
                created = true;
            }
            present.insert(name);
        }
        if created {
            File::open(&self.item_dir)?.sync_all()?;
        }
        self.synced = present;
        Ok(())
    }
}

/// How often the checkpoint thread looks for work. Between checkpoints it
/// writes sled's buffers out (sled's flush, no fsync) whenever writes came
/// in: sled 0.34 can deadlock when many sealed buffers queue up in its I/O
/// pool while a segment truncation waits behind them, and frequent flushes
/// keep that queue short, as the old flush-per-write design did.
const CHECKPOINT_POLL: Duration = Duration::from_millis(5);
/// The longest the checkpoint thread waits while no write comes in: its
/// wait doubles from [`CHECKPOINT_POLL`] up to this after every look that
/// found nothing new, and falls back at the first write. An idle server
/// then wakes ten times a second instead of two hundred.
const CHECKPOINT_IDLE_POLL: Duration = Duration::from_millis(100);
/// The checkpoint thread's next wait after one of `pause`: short again
/// once writes came in, else twice as long, up to [`CHECKPOINT_IDLE_POLL`].
fn next_pause(pause: Duration, writes_came_in: bool) -> Duration {
    if writes_came_in {
        CHECKPOINT_POLL
    } else {
        (pause * 2).min(CHECKPOINT_IDLE_POLL)
    }
}

/// Sealed log segments (2 MiB each) that wait before a checkpoint covers
/// them. A checkpoint holds writes while sled is flushed and synced (a few
/// milliseconds): doing it once per 32 MiB of log rather than per segment
/// keeps that pause out of all but the slowest 0.1% of calls, for at most
/// 32 MiB more log on disk under heavy writes and as much more to replay
/// after a crash.
const CHECKPOINT_AFTER_SEGMENTS: usize = 16;
/// The longest a durable record waits to be covered by a checkpoint.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

/// The checkpoint thread; dropping this stops it and waits for it.
#[derive(Debug)]
pub struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Ok(mut stop) = self.stop.0.lock() {
            *stop = true;
        }
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Checkpointer {
    /// Starts checkpointing `flush` for `wal`.
    pub fn start(wal: Wal, flush: Arc<Mutex<DurableFlush>>) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("trove-checkpoint".into())
            .spawn(move || {
                let mut covered = wal.durable_lsn();
                let mut written_out = covered;
                let mut since = Instant::now();
                let mut last_error = String::new();
                let mut pause = CHECKPOINT_POLL;
                loop {
                    let Ok(stopped) = thread_stop.0.lock() else {
                        return;
                    };
                    if *stopped {
                        return;
                    }
                    let Ok((stopped, _)) = thread_stop.1.wait_timeout(stopped, pause)
                    else {
                        return;
                    };
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    let durable = wal.durable_lsn();
                    pause = next_pause(pause, durable > written_out);
                    let due = wal.sealed_segments() >= CHECKPOINT_AFTER_SEGMENTS
                        || (durable > covered && since.elapsed() >= CHECKPOINT_EVERY);
                    if !due {
                        if durable > written_out {
                            written_out = durable;
                            if let Ok(flush) = flush.lock() {
                                let _ = flush.write_out();
                            }
                        }
                        continue;
                    }
                    match checkpoint(&wal, &flush) {
                        Ok(lsn) => covered = lsn,
                        Err(reason) => {
                            if reason != last_error {
                                tracing::warn!(%reason, "checkpoint failed; the log keeps every record until one succeeds");
                                last_error = reason;
                            }
                            continue;
                        }
                    }
                    since = Instant::now();
                }
            })?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

/// Makes sled durable through the log's durable LSN and deletes the
/// segments that covers; returns that LSN.
pub fn checkpoint(wal: &Wal, flush: &Mutex<DurableFlush>) -> Result<u64, String> {
    // Every change up to this LSN is in sled: a record is queued only after
    // its change is applied.
    let mut flush = flush
        .lock()
        .map_err(|_| "the checkpoint lock is poisoned".to_owned())?;
    // Read under the lock, so that checkpoints (the thread's, compaction's,
    // shutdown's) record ever larger LSNs.
    let lsn = wal.durable_lsn();
    // Most of the packs' bytes are synced before writes are held; what
    // was written meanwhile, under the hold.
    flush.sync_packs()?;
    let held = wal.hold_writes().map_err(|e| e.to_string())?;
    // Never past the applied marker: a write sled holds part of (its undo
    // failed) keeps the marker below it, and its image must survive until
    // a restart puts it back.
    let lsn = lsn.min(wal.applied_marker().map_err(|e| e.to_string())?);
    flush.sync_packs()?;
    // After the packs' sync and before sled's: a start that finds this
    // marker finds every packed value through it in place.
    wal.mark_checkpoint(lsn).map_err(|e| e.to_string())?;
    flush.flush()?;
    drop(held);
    wal.release_through(lsn);
    if let Err(err) = wal.forget_images_through(lsn) {
        tracing::warn!(error = %err, "could not remove the images a checkpoint covers; retried at the next one");
    }
    Ok(lsn)
}

/// sled's segment size for new databases. sled writes a log item larger
/// than a quarter segment to a file of its own that it never syncs, and its
/// recovery after a power cut can then find a pointer to an item file it has
/// removed (seen under the power-cut test). No item the engine writes comes
/// near 1 MiB: values of 128 B and more are in packs, JSON values of 8 KiB
/// and more spill into them, undo images are stored in 8 KiB pieces, so a
/// leaf (at most about 17 values and keys of a few KiB) stays under 250
/// KiB. An index page holds up to about 257 separators, each cut where its
/// neighbours differ: only keys that pairwise share kilobytes of prefix
/// (not shared by the whole page) could bring one near 1 MiB. Smaller
/// segments are what keeps sled's own space down: it keeps a segment until
/// at most half of it is live. Databases created with 8 MiB segments keep
/// them (sled refuses to reopen with another size).
pub const SLED_SEGMENT_BYTES: usize = 4 * 1024 * 1024;

/// How often sled's own thread wakes (default 500 ms). Each wake writes
/// out sled's buffers, then moves live pages out of segments at most half
/// live, for up to half the interval, which is the only way sled frees a
/// segment for reuse. At 500 ms, writes at full speed filled segments
/// faster than the wakes freed them: 10^5 puts of 1 KiB left sled's file at
/// 38 to 44 MB; at 30 ms or less it is 29 MB every time (at 50 ms, 29 to
/// 34 MB), and a store's whole folder went from about 1.45x to 1.33x its
/// logical size. The cost is one `fsync` of an unchanged file per wake when
/// idle (about 50 µs each, about 0.4% of one core).
pub const SLED_FLUSH_EVERY_MS: u64 = 20;

/// The segment size to open the database in `sled_dir` with: the one it was
/// created with (sled refuses another), else [`SLED_SEGMENT_BYTES`].
pub(super) fn sled_segment_size(sled_dir: &Path) -> usize {
    std::fs::read_to_string(sled_dir.join("conf"))
        .ok()
        .and_then(|conf| {
            conf.lines()
                .find_map(|line| line.strip_prefix("segment_size: "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(SLED_SEGMENT_BYTES)
}

/// Ids skipped when a store first reserves ids: far more than sled's
/// counter could ever have fallen behind (it resumes 2 million past the
/// last value it persisted).
const LEGACY_ID_MARGIN: u64 = 1 << 40;

/// Where ids start in a store created before ids were reserved durably
/// (see `ids`): above sled's counter and every blob id in use, plus a wide
/// margin, because sled's counter may have been rolled back by a power cut
/// and ids other than blob ids (entry sequences, generations) are not
/// scanned for. The margin costs nothing: ids are 64 bits.
pub(super) fn legacy_id_floor(db: &sled::Db, blob_refs: &sled::Tree) -> Result<u64, Error> {
    let counter = db.generate_id().map_err(sled_error)?;
    let largest = match blob_refs.last().map_err(sled_error)? {
        Some((key, _)) => key
            .as_ref()
            .try_into()
            .ok()
            .map(u64::from_be_bytes)
            .unwrap_or(0),
        None => 0,
    };
    Ok(counter
        .max(largest.saturating_add(1))
        .saturating_add(LEGACY_ID_MARGIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle checkpoint thread backs off to ten wakes a second; the first
    /// write brings it back to its short poll.
    #[test]
    fn the_checkpoint_poll_backs_off_while_idle() {
        let mut pause = CHECKPOINT_POLL;
        let mut waits = Vec::new();
        for _ in 0..8 {
            pause = next_pause(pause, false);
            waits.push(pause.as_millis());
        }
        assert_eq!(waits, [10, 20, 40, 80, 100, 100, 100, 100]);
        assert_eq!(next_pause(pause, true), CHECKPOINT_POLL);
    }

    /// A flush syncs sled's large log items too: after one, every item file
    /// present is known as synced.
    #[test]
    fn large_items_are_synced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sled_dir = dir.path().join("db");
        let db = sled::Config::new().path(&sled_dir).open().expect("open");
        let mut flush = DurableFlush::open(db.clone(), &sled_dir, None).expect("flush");
        // Over a quarter of sled's 512 KiB segments: stored as an item file.
        db.insert(b"big", vec![7u8; 400 * 1024]).expect("insert");
        flush.flush().expect("flush");
        let items: HashSet<OsString> = std::fs::read_dir(sled_dir.join("blobs"))
            .expect("items")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(!items.is_empty(), "sled wrote the value as an item file");
        assert_eq!(flush.synced, items);
        assert!(flush.poisoned.is_none());
    }
}
