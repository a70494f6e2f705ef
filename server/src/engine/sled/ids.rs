//! Ids that are never handed out twice, across crashes and power cuts.
//!
//! Entry sequence numbers, cassette generations and blob ids are all ids, and
//! an id handed out twice keys a new value exactly like an acknowledged one,
//! which it then overwrites. sled's own `generate_id` cannot promise this
//! here: it persists its counter once per million ids with
//! `sync_file_range`, which a power cut undoes, and its recovery then starts
//! where an earlier run already started (the power-cut tests saw appended
//! entries overwritten that way).
//!
//! So the store reserves ids itself: before any id at or above the current
//! ceiling is handed out, a new ceiling is written to a fresh file, synced,
//! renamed over `ids` and the folder synced. A restart starts at the stored
//! ceiling. Reserving happens once per [`BLOCK`] ids: a millisecond or two of
//! blocking once per million writes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use trove_proto::Error;

use super::io_error;

/// How many ids one durable reservation covers.
pub(super) const BLOCK: u64 = 1 << 20;

/// The file holding the ceiling, in the store's root.
const FILE: &str = "ids";

/// Hands out unique ids; see the module comment.
pub(super) struct Ids {
    next: AtomicU64,
    /// Every id below it may have been handed out by this or an earlier run.
    ceiling: AtomicU64,
    reserving: Mutex<()>,
    path: PathBuf,
}

impl Ids {
    /// Opens the reservation in `root` and reserves the first block. A store
    /// without one yet (created before it existed) starts at `floor()`, which
    /// must lie above every id in use.
    pub(super) fn open(
        root: &Path,
        floor: impl FnOnce() -> Result<u64, Error>,
    ) -> Result<Self, Error> {
        let path = root.join(FILE);
        let start = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| Error::DataLoss {
                message: format!(
                    "the id reservation file {} is unreadable ({:?}); the store cannot tell \
                     which ids are free",
                    path.display(),
                    text.trim()
                ),
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => floor()?,
            Err(err) => return Err(io_error("read the id reservation", &err)),
        };
        let ids = Ids {
            next: AtomicU64::new(start),
            ceiling: AtomicU64::new(start),
            reserving: Mutex::new(()),
            path,
        };
        ids.reserve_past(start)?;
        Ok(ids)
    }

    /// An id never handed out before, by this run or any earlier one.
    pub(super) fn next(&self) -> Result<u64, Error> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if id >= self.ceiling.load(Ordering::Acquire) {
            self.reserve_past(id)?;
        }
        Ok(id)
    }

    /// Makes the ceiling durably exceed `id`. An id whose reservation
    /// failed is never handed out; a later call tries again with a new file.
    fn reserve_past(&self, id: u64) -> Result<(), Error> {
        // The lock guards no data, only the order of reservations: a panic
        // while holding it leaves nothing inconsistent.
        let _one_at_a_time = self
            .reserving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if id < self.ceiling.load(Ordering::Acquire) {
            return Ok(());
        }
        let ceiling = id
            .checked_add(BLOCK)
            .ok_or_else(|| Error::internal("ids exhausted"))?;
        super::durable::replace_file(&self.path, format!("{ceiling}\n").as_bytes())
            .map_err(|e| io_error("reserve ids", &e))?;
        self.ceiling.store(ceiling, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reopened_reservation_starts_above_every_id_handed_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ids = Ids::open(dir.path(), || Ok(5)).expect("open");
        let first: Vec<u64> = (0..10).map(|_| ids.next().expect("id")).collect();
        assert_eq!(first, (5..15).collect::<Vec<_>>());
        drop(ids);
        let floor_unused = || -> Result<u64, Error> { panic!("the stored ceiling wins") };
        let ids = Ids::open(dir.path(), floor_unused).expect("reopen");
        let next = ids.next().expect("id");
        assert!(next >= 15, "id {next} was handed out before");
    }

    #[test]
    fn crossing_the_ceiling_reserves_the_next_block() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ids = Ids::open(dir.path(), || Ok(0)).expect("open");
        ids.next.store(BLOCK + 3, Ordering::Relaxed);
        assert_eq!(ids.next().expect("id"), BLOCK + 3);
        let stored: u64 = std::fs::read_to_string(dir.path().join(FILE))
            .expect("file")
            .trim()
            .parse()
            .expect("number");
        assert!(stored > BLOCK + 3);
        assert!(!dir.path().join("ids.new").exists());
    }

    #[test]
    fn an_unreadable_reservation_is_reported_not_guessed() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(FILE), "garbage").expect("write");
        match Ids::open(dir.path(), || Ok(0)) {
            Err(Error::DataLoss { message }) => assert!(message.contains("ids"), "{message}"),
            Err(other) => panic!("unexpected error {other:?}"),
            Ok(_) => panic!("an unreadable reservation was accepted"),
        }
    }
}
