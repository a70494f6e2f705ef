//! The physical limit of durable small writes on the disk under the data
//! folder: `pwrite` of a record into a preallocated file, then `fdatasync`,
//! by one writer, and by many writers sharing each flush (group commit: a
//! flush covers every write issued before it started). Trove's durable
//! figures print beside these, so a run shows how far the server is from
//! what the disk allows.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::load::{op, Op};

/// Size of the preallocated file the records go to (written over in turn).
const LOG_BYTES: u64 = 64 * 1024 * 1024;

/// A preallocated file written record after record.
pub struct DiskLog {
    file: Arc<File>,
    next: AtomicU64,
    record: Vec<u8>,
    flushes: SharedFlush,
}

impl DiskLog {
    /// Creates the file in `dir`, fully written (so its blocks exist, as a
    /// write-ahead log's preallocated segment would) and synced.
    pub fn create(dir: &Path, record_bytes: usize) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir).context("create the disk baseline folder")?;
        let path = dir.join("fdatasync-baseline.log");
        let mut file = File::create(&path).context("create the disk baseline file")?;
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..LOG_BYTES / zeros.len() as u64 {
            file.write_all(&zeros).context("preallocate")?;
        }
        file.sync_all().context("sync the preallocated file")?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .context("sync the folder")?;
        let file = Arc::new(file);
        Ok(Arc::new(DiskLog {
            flushes: SharedFlush::start(Arc::clone(&file))?,
            file,
            next: AtomicU64::new(0),
            record: vec![0xA5; record_bytes],
        }))
    }

    fn write_record(&self) -> std::io::Result<()> {
        let len = self.record.len() as u64;
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % (LOG_BYTES / len);
        self.file.write_all_at(&self.record, slot * len)
    }

    /// One record written and `fdatasync`ed per call, each call on its own.
    pub fn own_flush(self: &Arc<Self>) -> Op {
        let log = Arc::clone(self);
        op(move |_| {
            let log = Arc::clone(&log);
            async move {
                let bytes = log.record.len() as u64;
                tokio::task::spawn_blocking(move || {
                    log.write_record()?;
                    log.file.sync_data()
                })
                .await??;
                Ok(bytes)
            }
        })
    }

    /// One record written per call; calls share `fdatasync`s.
    pub fn shared_flush(self: &Arc<Self>) -> Op {
        let log = Arc::clone(self);
        op(move |_| {
            let log = Arc::clone(&log);
            async move {
                let bytes = log.record.len() as u64;
                let writer = Arc::clone(&log);
                tokio::task::spawn_blocking(move || writer.write_record()).await??;
                log.flushes.wait().await?;
                Ok(bytes)
            }
        })
    }
}

/// A thread that runs `fdatasync` back to back while writes wait for one.
struct SharedFlush {
    requests: Arc<(Mutex<(u64, bool)>, Condvar)>,
    done: watch::Receiver<u64>,
}

impl SharedFlush {
    fn start(file: Arc<File>) -> Result<Self> {
        let requests = Arc::new((Mutex::new((0u64, false)), Condvar::new()));
        let (tx, done) = watch::channel(0u64);
        let shared = Arc::clone(&requests);
        std::thread::Builder::new()
            .name("bench-fdatasync".into())
            .spawn(move || {
                let (lock, wake) = &*shared;
                let mut covered = 0u64;
                loop {
                    let target = {
                        let Ok(mut state) = lock.lock() else { return };
                        while state.0 == covered && !state.1 {
                            state = match wake.wait(state) {
                                Ok(state) => state,
                                Err(_) => return,
                            };
                        }
                        if state.1 {
                            return;
                        }
                        state.0
                    };
                    if file.sync_data().is_err() {
                        return;
                    }
                    covered = target;
                    tx.send_replace(covered);
                }
            })
            .context("start the flush thread")?;
        Ok(SharedFlush { requests, done })
    }

    /// Waits for a flush that started after this call.
    async fn wait(&self) -> Result<()> {
        let ticket = {
            let (lock, wake) = &*self.requests;
            let mut state = lock
                .lock()
                .map_err(|_| anyhow::anyhow!("flush lock poisoned"))?;
            state.0 += 1;
            wake.notify_one();
            state.0
        };
        let mut done = self.done.clone();
        done.wait_for(|covered| *covered >= ticket)
            .await
            .context("the flush thread stopped")?;
        Ok(())
    }
}

impl Drop for SharedFlush {
    fn drop(&mut self) {
        let (lock, wake) = &*self.requests;
        if let Ok(mut state) = lock.lock() {
            state.1 = true;
        }
        wake.notify_all();
    }
}
