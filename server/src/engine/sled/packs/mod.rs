//! Value packs: small values in append-only files of the store's own,
//! with sled holding only a pointer to them.
//!
//! Why: sled keeps its log segments until at most half of one is live, and
//! rewrites a whole leaf each time it consolidates one, so values kept
//! inside sled settle near twice their size on disk. A pack holds each
//! value once, back to back.
//!
//! How a value gets here (see `wal`): a logged write reserves room at the
//! active pack's tail ([`Packs::reserve`], under the log's lock), and its
//! log record carries the bytes with their place. Applying the write puts
//! the bytes there (`pwrite`, no sync) before the pointer reaches sled.
//! Packs are synced by checkpoints before the log segments that carry
//! their bytes are deleted, and replay puts every logged value back at its
//! place (writing the same bytes at the same offset twice is harmless). A
//! pointer whose record never became durable is taken out of sled at start
//! with the rest of its write (see `wal::replay`), so no pointer outlives
//! its bytes.
//!
//! Cassette entries and branch maps of 8 KiB or more spill into packs as
//! well (`spill`), so that sled never writes a page near its item limit.
//!
//! Space of values deleted or replaced is reclaimed by compaction
//! (`compact`): a sealed pack that is mostly dead has its live values
//! rewritten at the tail and is deleted once a checkpoint covers the moves.

mod compact;
pub(super) mod refs;
pub(super) mod spill;

pub use compact::{CompactionPass, COMPACTION_INTERVAL, COMPACTION_INTERVAL_MS};

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Values at least this long go to a pack; smaller ones stay inside their
/// record, where a pointer would save nothing.
pub const PACK_MIN_BYTES: usize = 128;

/// The default size at which a pack is sealed. Smaller packs make
/// compaction finer; each one costs an open file while it holds values.
pub const PACK_BYTES: u64 = 64 * 1024 * 1024;

/// Pack files kept open at once: a terabyte of packs is 16,000 files, more
/// than a process may open by default. Others are opened when read.
const OPEN_PACKS: usize = 128;

/// Where one value's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackLoc {
    /// The pack file's number.
    pub pack: u64,
    /// The first byte's offset in it.
    pub offset: u64,
}

impl PackLoc {
    /// The 16-byte form used in log records and reference keys.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.pack.to_be_bytes());
        out[8..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    /// Reads back [`PackLoc::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let pack = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let offset = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(PackLoc { pack, offset })
    }
}

struct Tail {
    pack: u64,
    len: u64,
}

/// The pack files of one store.
pub struct Packs {
    dir: PathBuf,
    /// The size at which a pack is sealed.
    pack_bytes: u64,
    tail: Mutex<Tail>,
    /// Every pack on disk.
    numbers: Mutex<BTreeSet<u64>>,
    /// The packs open now (at most [`OPEN_PACKS`]).
    files: RwLock<HashMap<u64, Arc<File>>>,
    /// Packs written since their last sync.
    dirty: Mutex<BTreeSet<u64>>,
    /// Held through a whole sync, so that a sync that returns has covered
    /// every write made before it was called (even one another sync took
    /// off the dirty set); holds why syncing failed, once it did.
    syncing: Mutex<Option<String>>,
    /// A pack file was created (or removed) since the folder's last sync.
    names_changed: AtomicBool,
    /// Bytes whose last reference went since the last compaction pass
    /// (a hint of when one is worth running; not persisted).
    freed: AtomicU64,
}

impl std::fmt::Debug for Packs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packs")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The file name of pack `number`.
fn file_name(number: u64) -> String {
    format!("{number:016x}.pack")
}

fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".pack")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

impl Packs {
    /// Opens (creating if needed) the packs in `dir`, sealed once they
    /// reach `pack_bytes`. New values go after the end of the
    /// highest-numbered pack.
    pub fn open(dir: &Path, pack_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let packs = Packs {
            dir: dir.to_path_buf(),
            pack_bytes: pack_bytes.max(1),
            tail: Mutex::new(Tail { pack: 1, len: 0 }),
            numbers: Mutex::new(BTreeSet::new()),
            files: RwLock::new(HashMap::new()),
            dirty: Mutex::new(BTreeSet::new()),
            syncing: Mutex::new(None),
            names_changed: AtomicBool::new(true),
            freed: AtomicU64::new(0),
        };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Some(number) = entry.file_name().to_str().and_then(parse_name) else {
                continue;
            };
            packs.lock_numbers().insert(number);
        }
        packs.find_tail()?;
        Ok(packs)
    }

    /// Puts the tail after the end of the highest-numbered pack (again
    /// after replay, which may have written past it).
    pub fn find_tail(&self) -> std::io::Result<()> {
        let last = self.lock_numbers().last().copied();
        let file = match last {
            Some(number) => self.file(number)?.map(|file| (number, file)),
            None => None,
        };
        let tail = match file {
            Some((pack, file)) => Tail {
                pack,
                len: file.metadata()?.len(),
            },
            None => Tail { pack: 1, len: 0 },
        };
        *self.lock_tail() = tail;
        Ok(())
    }

    fn lock_tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_numbers(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.numbers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_files(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<File>>> {
        self.files.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_files_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<File>>> {
        self.files.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `len` bytes at the tail, sealing the active pack first
    /// when they would take it past its size. Called under the log's lock,
    /// so places are handed out in log order.
    pub fn reserve(&self, len: u64) -> PackLoc {
        let mut tail = self.lock_tail();
        if tail.len > 0 && tail.len.saturating_add(len) > self.pack_bytes {
            tail.pack += 1;
            tail.len = 0;
        }
        let loc = PackLoc {
            pack: tail.pack,
            offset: tail.len,
        };
        tail.len = tail.len.saturating_add(len);
        loc
    }

    /// The pack new values go to.
    pub fn active(&self) -> u64 {
        self.lock_tail().pack
    }

    /// Writes `bytes` at `loc`, creating the pack when it is new.
    pub fn write_at(&self, loc: PackLoc, bytes: &[u8]) -> std::io::Result<()> {
        let file = match self.file(loc.pack)? {
            Some(file) => file,
            None => self.create(loc.pack)?,
        };
        file.write_all_at(bytes, loc.offset)?;
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(loc.pack);
        Ok(())
    }

    fn create(&self, number: u64) -> std::io::Result<Arc<File>> {
        let mut numbers = self.lock_numbers();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.dir.join(file_name(number)))?,
        );
        if numbers.insert(number) {
            self.names_changed.store(true, Ordering::SeqCst);
        }
        drop(numbers);
        self.keep_open(number, Arc::clone(&file));
        Ok(file)
    }

    /// Pack `number`, opened if it is not open; `None` when it is gone.
    fn file(&self, number: u64) -> std::io::Result<Option<Arc<File>>> {
        if let Some(file) = self.lock_files().get(&number) {
            return Ok(Some(Arc::clone(file)));
        }
        if !self.lock_numbers().contains(&number) {
            return Ok(None);
        }
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(file_name(number)));
        match opened {
            Ok(file) => {
                let file = Arc::new(file);
                self.keep_open(number, Arc::clone(&file));
                Ok(Some(file))
            }
            // Removed by compaction meanwhile.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Keeps `file` open, closing another pack when too many are: never
    /// the active one, nor one with writes not yet synced (a sync must not
    /// have to open a file). Lock order: files, then numbers, then dirty.
    fn keep_open(&self, number: u64, file: Arc<File>) {
        let active = self.active();
        let mut files = self.lock_files_mut();
        // Removed while it was being opened: the handle must not keep the
        // deleted file's space.
        if !self.lock_numbers().contains(&number) {
            return;
        }
        if files.len() >= OPEN_PACKS {
            let dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            let closed = files
                .keys()
                .copied()
                .find(|other| *other != active && *other != number && !dirty.contains(other));
            drop(dirty);
            if let Some(closed) = closed {
                files.remove(&closed);
            }
        }
        files.insert(number, file);
    }

    /// Reads `len` bytes at `loc` and checks them against `crc`. `Ok(None)`
    /// when the pack is gone (compacted since the pointer was read: read
    /// the record again); an error names what is wrong.
    pub fn read(&self, loc: PackLoc, len: u64, crc: u32) -> Result<Option<Vec<u8>>, ReadError> {
        let Some(file) = self.file(loc.pack).map_err(ReadError::Io)? else {
            return Ok(None);
        };
        // Checked before allocating: a damaged record may name any length.
        let file_len = file.metadata().map_err(ReadError::Io)?.len();
        if loc.offset.saturating_add(len) > file_len {
            return Err(ReadError::Damaged {
                reason: format!(
                    "pack {} ends at byte {file_len}, before the {len} bytes at {}",
                    loc.pack, loc.offset
                ),
            });
        }
        let len = usize::try_from(len).map_err(|_| ReadError::Damaged {
            reason: format!("a length of {len} bytes does not fit in memory"),
        })?;
        let mut bytes = vec![0u8; len];
        match file.read_exact_at(&mut bytes, loc.offset) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ReadError::Damaged {
                    reason: format!(
                        "pack {} ends before byte {} of the value at {}",
                        loc.pack, len, loc.offset
                    ),
                })
            }
            Err(err) => return Err(ReadError::Io(err)),
        }
        if crc32fast::hash(&bytes) != crc {
            return Err(ReadError::Damaged {
                reason: format!(
                    "the {len} bytes at {} of pack {} fail their checksum",
                    loc.offset, loc.pack
                ),
            });
        }
        Ok(Some(bytes))
    }

    /// `fdatasync`s every pack written since its last sync, and the folder
    /// when a pack was created or removed. A failed sync is never retried
    /// as if it could succeed (the kernel may have dropped the pages it
    /// could not write): it and every later sync fail, until a restart.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut failed = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = failed.as_ref() {
            return Err(std::io::Error::other(reason.clone()));
        }
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        let mut fail = |err: std::io::Error| {
            *failed = Some(format!(
                "an fsync of the value packs failed ({err}); their unsynced bytes may be lost"
            ));
            Err(err)
        };
        for number in &dirty {
            let file = match self.file(*number) {
                Ok(Some(file)) => file,
                Ok(None) => continue,
                Err(err) => return fail(err),
            };
            if let Err(err) = file.sync_data() {
                return fail(err);
            }
        }
        if self.names_changed.swap(false, Ordering::SeqCst) {
            if let Err(err) = File::open(&self.dir).and_then(|dir| dir.sync_all()) {
                return fail(err);
            }
        }
        Ok(())
    }

    /// Every pack below the active one (no value goes there any more),
    /// with its size in bytes.
    pub fn sealed(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let numbers: Vec<u64> = self.lock_numbers().iter().copied().collect();
        // Read after listing: a pack created meanwhile is above it.
        let active = self.active();
        let mut sealed = Vec::new();
        for number in numbers.into_iter().filter(|number| *number < active) {
            match std::fs::metadata(self.dir.join(file_name(number))) {
                Ok(meta) => sealed.push((number, meta.len())),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        Ok(sealed)
    }

    /// Deletes pack `number`, unless values still go there. Readers that
    /// opened it keep reading it.
    pub fn remove(&self, number: u64) -> std::io::Result<()> {
        if number >= self.active() {
            return Err(std::io::Error::other(format!(
                "pack {number} is the active pack; it is never deleted"
            )));
        }
        {
            let mut files = self.lock_files_mut();
            self.lock_numbers().remove(&number);
            files.remove(&number);
        }
        match std::fs::remove_file(self.dir.join(file_name(number))) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        self.names_changed.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Bytes of every pack file (dead values included, until compaction).
    pub fn disk_bytes(&self) -> u64 {
        let numbers: Vec<u64> = self.lock_numbers().iter().copied().collect();
        numbers
            .into_iter()
            .filter_map(|number| std::fs::metadata(self.dir.join(file_name(number))).ok())
            .map(|meta| meta.len())
            .sum()
    }

    /// Notes that `bytes` of packed values lost their last reference.
    pub fn note_freed(&self, bytes: u64) {
        self.freed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Takes the bytes freed since the last call.
    pub fn take_freed(&self) -> u64 {
        self.freed.swap(0, Ordering::Relaxed)
    }
}

/// Why a packed value could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The bytes are not what the pointer says.
    Damaged {
        /// What was found.
        reason: String,
    },
    /// Reading failed.
    Io(std::io::Error),
}

#[cfg(test)]
mod spill_tests;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod tests;
