//! Group commit: many writers wait on one fsync.
//!
//! A writer takes a ticket after its sled write and waits until a flush that
//! started after the ticket was taken has completed. A dedicated thread runs
//! flushes back to back; every flush covers all tickets issued before it
//! began, so N concurrent writers cost about two fsyncs, not N.
//!
//! The thread never runs on the async runtime (a flush blocks for the length
//! of an fsync) and stops when the last handle is dropped.

use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;
use trove_proto::Error;

/// Outcome of the flushes so far.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every ticket up to this one is durable.
    durable: u64,
    /// The flush covering tickets up to this one failed.
    failed: u64,
    /// Why it failed.
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Requests {
    issued: u64,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    requests: Mutex<Requests>,
    wake: Condvar,
}

/// A function that makes everything written so far durable.
pub type FlushFn = Box<dyn Fn() -> Result<(), String> + Send + 'static>;

/// Handle to the flush thread. Cheap to clone; the thread stops when the last
/// clone is dropped.
#[derive(Debug, Clone)]
pub struct Flusher {
    shared: Arc<Shared>,
    progress: watch::Receiver<Progress>,
    _stopper: Arc<StopOnDrop>,
}

#[derive(Debug)]
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Ok(mut requests) = self.0.requests.lock() {
            requests.stop = true;
        }
        self.0.wake.notify_all();
    }
}

impl Flusher {
    /// Starts the flush thread around `flush`.
    pub fn start(flush: FlushFn) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            requests: Mutex::new(Requests::default()),
            wake: Condvar::new(),
        });
        let (tx, rx) = watch::channel(Progress::default());
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("trove-flusher".into())
            .spawn(move || run(&thread_shared, &flush, &tx))?;
        Ok(Flusher {
            _stopper: Arc::new(StopOnDrop(Arc::clone(&shared))),
            shared,
            progress: rx,
        })
    }

    /// Waits until everything written before this call is durable.
    pub async fn wait(&self) -> Result<(), Error> {
        let ticket = {
            let mut requests = self
                .shared
                .requests
                .lock()
                .map_err(|_| Error::internal("flusher lock poisoned"))?;
            requests.issued += 1;
            requests.issued
        };
        self.shared.wake.notify_one();
        let mut progress = self.progress.clone();
        loop {
            {
                let state = progress.borrow_and_update();
                if state.durable >= ticket {
                    return Ok(());
                }
                if state.failed >= ticket {
                    return Err(Error::Unavailable {
                        message: format!(
                            "the write was applied but could not be made durable: {}",
                            state.error.as_deref().unwrap_or("flush failed")
                        ),
                    });
                }
            }
            progress.changed().await.map_err(|_| Error::Unavailable {
                message: "the store is shutting down".into(),
            })?;
        }
    }
}

fn run(shared: &Shared, flush: &FlushFn, progress: &watch::Sender<Progress>) {
    let mut covered = 0u64;
    loop {
        let target = {
            let Ok(mut requests) = shared.requests.lock() else {
                return;
            };
            while requests.issued == covered && !requests.stop {
                requests = match shared.wake.wait(requests) {
                    Ok(guard) => guard,
                    Err(_) => return,
                };
            }
            if requests.issued == covered && requests.stop {
                return;
            }
            requests.issued
        };
        let result = flush();
        covered = target;
        progress.send_modify(|p| match result {
            Ok(()) => p.durable = target,
            Err(err) => {
                tracing::error!(error = %err, "store flush failed");
                p.failed = target;
                p.error = Some(err);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Many concurrent waiters are served by far fewer flushes than waiters.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_waiters_share_flushes() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        let flusher = Flusher::start(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            Ok(())
        }))
        .expect("start");
        let waits: Vec<_> = (0..200)
            .map(|_| {
                let f = flusher.clone();
                tokio::spawn(async move { f.wait().await })
            })
            .collect();
        for w in waits {
            assert!(w.await.expect("join").is_ok());
        }
        let flushes = count.load(Ordering::SeqCst);
        assert!(flushes < 200, "{flushes} flushes for 200 waiters");
    }

    /// A failed flush is reported to the waiters it covered, and later ones recover.
    #[tokio::test]
    async fn failure_reaches_waiters_then_clears() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f2 = Arc::clone(&fail);
        let flusher = Flusher::start(Box::new(move || {
            if f2.load(Ordering::SeqCst) {
                Err("disk on fire".into())
            } else {
                Ok(())
            }
        }))
        .expect("start");
        let err = flusher.wait().await.expect_err("must fail");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        fail.store(false, Ordering::SeqCst);
        assert!(flusher.wait().await.is_ok());
    }
}
