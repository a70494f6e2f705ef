//! The durability point of the embedded store: what a strict write waits
//! for before it is acknowledged.
//!
//! sled's own `flush` is not enough. On Linux it ends in `sync_file_range`
//! on its log, which neither flushes the device's write cache nor persists
//! the file's new size. It also writes large log items to files of their
//! own (`blobs/<lsn>` under sled's folder) and never syncs those. So a
//! flush here is:
//!
//! 1. sled's `flush` (writes the log buffers out);
//! 2. `fdatasync` of sled's log file (data and the size needed to read it);
//! 3. `fsync` of every log item file sled created since the last flush, then
//!    of their folder.
//!
//! A failed `fsync` is never retried as if it could succeed: the kernel may
//! have dropped the dirty pages it could not write and report the next
//! `fsync` clean (PostgreSQL's "fsyncgate"). After one, every later flush
//! fails too, so no write is acknowledged until the server restarts and
//! reopens the store.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

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
}

impl DurableFlush {
    /// Opens the flush of `db`, whose files are in `sled_dir`.
    pub fn open(db: sled::Db, sled_dir: &Path) -> std::io::Result<Self> {
        let log = File::open(sled_dir.join("db"))?;
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
        })
    }

    /// Where the reason writes are refused appears, once they are.
    pub fn refusal(&self) -> std::sync::Arc<std::sync::OnceLock<String>> {
        std::sync::Arc::clone(&self.refusal)
    }

    /// Flushes sled and syncs its files. After a failed sync, always fails.
    pub fn flush(&mut self) -> Result<(), String> {
        if let Some(reason) = &self.poisoned {
            return Err(reason.clone());
        }
        self.db.flush().map_err(|e| e.to_string())?;
        if let Err(err) = self.sync_files() {
            let reason = format!(
                "an fsync of the database failed ({err}); writes since the last durable point \
                 may be lost and a retry cannot tell: no write is acknowledged until the server \
                 is restarted"
            );
            tracing::error!(error = %err, "fsync failed; the store refuses to acknowledge writes until restarted");
            self.poisoned = Some(reason.clone());
            let _ = self.refusal.set(reason.clone());
            return Err(reason);
        }
        Ok(())
    }

    fn sync_files(&mut self) -> std::io::Result<()> {
        self.log.sync_data()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush syncs sled's large log items too: after one, every item file
    /// present is known as synced.
    #[test]
    fn large_items_are_synced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sled_dir = dir.path().join("db");
        let db = sled::Config::new().path(&sled_dir).open().expect("open");
        let mut flush = DurableFlush::open(db.clone(), &sled_dir).expect("flush");
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
