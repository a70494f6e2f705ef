//! A buffered cassette writer for HTTP recorders that must never block on I/O.
//!
//! [`CassetteWriter::write`] only queues the entry. A background task sends a
//! cassette's pending entries (sorted by `recorded_at`) as one append when
//! `batch_size` entries are pending or when `batch_timeout` passes without a
//! new write to that cassette (each write restarts the timer). A failed send
//! keeps the entries pending; the next flush retries them and reports the
//! error if they still cannot be stored. Dropping the writer flushes what is
//! pending in the background; [`CassetteWriter::shutdown`] does the same and
//! waits for the outcome.
//!
//! The writer works over any [`EntryStore`]: the remote client or, in tests
//! and embedded use, a store in the same process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use trove_proto::entries::NewEntry;
use trove_proto::types::{Name, Namespace};
use trove_proto::{EntryStore, Error};

/// Settings of a [`CassetteWriter`].
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Namespace the cassettes live in.
    pub namespace: Namespace,
    /// Pending entries of one cassette that trigger a send (default 10).
    pub batch_size: usize,
    /// Quiet time after the last write to a cassette that triggers a send
    /// (default 100 ms).
    pub batch_timeout: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            namespace: Namespace::default(),
            batch_size: 10,
            batch_timeout: Duration::from_millis(100),
        }
    }
}

type Reply = oneshot::Sender<Result<(), Error>>;

enum Command {
    Write(Name, NewEntry),
    Flush(Option<Name>, Reply),
    ReplaceForAllMode(Name, Reply),
    Pending(Name, oneshot::Sender<usize>),
}

/// Queues entries and sends them in batches; see the module docs.
#[derive(Debug)]
pub struct CassetteWriter {
    commands: mpsc::UnboundedSender<Command>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn stopped() -> Error {
    Error::Unavailable {
        message: "the cassette writer has stopped".into(),
    }
}

impl CassetteWriter {
    /// Starts a writer on the current tokio runtime.
    pub fn new<S: EntryStore + ?Sized>(store: Arc<S>, config: WriterConfig) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(store, config, rx));
        CassetteWriter {
            commands,
            task: Some(task),
        }
    }

    /// Queues `entry` for `cassette` and returns at once.
    pub fn write(&self, cassette: &Name, entry: NewEntry) -> Result<(), Error> {
        self.commands
            .send(Command::Write(cassette.clone(), entry))
            .map_err(|_| stopped())
    }

    /// Sends everything pending for `cassette` and waits for the acknowledgement.
    pub async fn flush(&self, cassette: &Name) -> Result<(), Error> {
        self.ask(|reply| Command::Flush(Some(cassette.clone()), reply))
            .await
    }

    /// Sends everything pending for every cassette and waits.
    pub async fn flush_all(&self) -> Result<(), Error> {
        self.ask(|reply| Command::Flush(None, reply)).await
    }

    /// For "record all" mode: does nothing when nothing is pending for
    /// `cassette`; otherwise replaces the stored cassette atomically with the
    /// pending entries.
    pub async fn replace_for_all_mode(&self, cassette: &Name) -> Result<(), Error> {
        self.ask(|reply| Command::ReplaceForAllMode(cassette.clone(), reply))
            .await
    }

    /// Number of entries queued for `cassette` and not yet acknowledged.
    pub async fn pending(&self, cassette: &Name) -> Result<usize, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Pending(cassette.clone(), tx))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Flushes everything and stops the writer.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let result = self.flush_all().await;
        let task = self.task.take();
        drop(self);
        if let Some(task) = task {
            let _ = task.await;
        }
        result
    }

    async fn ask(&self, make: impl FnOnce(Reply) -> Command) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

#[derive(Default)]
struct Pending {
    entries: Vec<NewEntry>,
    deadline: Option<Instant>,
}

async fn run<S: EntryStore + ?Sized>(
    store: Arc<S>,
    config: WriterConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut pending: BTreeMap<Name, Pending> = BTreeMap::new();
    let batch_size = config.batch_size.max(1);
    loop {
        let next_deadline = pending.values().filter_map(|p| p.deadline).min();
        tokio::select! {
            biased;
            () = sleep_until(next_deadline) => {
                let now = Instant::now();
                let due: Vec<Name> = pending
                    .iter()
                    .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
                    .map(|(name, _)| name.clone())
                    .collect();
                for cassette in due {
                    if let Err(err) = send(&*store, &config, &mut pending, &cassette).await {
                        tracing::warn!(cassette = %cassette, error = %err, "batched append failed; entries stay pending for the next flush");
                    }
                }
            }
            command = commands.recv() => match command {
                Some(Command::Write(cassette, entry)) => {
                    let slot = pending.entry(cassette.clone()).or_default();
                    slot.entries.push(entry);
                    slot.deadline = Some(Instant::now() + config.batch_timeout);
                    if slot.entries.len() >= batch_size {
                        if let Err(err) = send(&*store, &config, &mut pending, &cassette).await {
                            tracing::warn!(cassette = %cassette, error = %err, "batched append failed; entries stay pending for the next flush");
                        }
                    }
                }
                Some(Command::Flush(cassette, reply)) => {
                    let targets: Vec<Name> = match cassette {
                        Some(c) => vec![c],
                        None => pending.keys().cloned().collect(),
                    };
                    let mut result = Ok(());
                    for cassette in targets {
                        if let Err(err) = send(&*store, &config, &mut pending, &cassette).await {
                            result = Err(err);
                        }
                    }
                    let _ = reply.send(result);
                }
                Some(Command::ReplaceForAllMode(cassette, reply)) => {
                    let _ = reply.send(replace(&*store, &config, &mut pending, &cassette).await);
                }
                Some(Command::Pending(cassette, reply)) => {
                    let _ = reply.send(pending.get(&cassette).map_or(0, |p| p.entries.len()));
                }
                None => {
                    // The writer was dropped: flush what is pending, then stop.
                    let names: Vec<Name> = pending.keys().cloned().collect();
                    for cassette in names {
                        if let Err(err) = send(&*store, &config, &mut pending, &cassette).await {
                            tracing::error!(cassette = %cassette, error = %err, "entries lost: the writer was dropped and the final flush failed");
                        }
                    }
                    return;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Takes the pending entries of `cassette` in `recorded_at` order.
fn sorted_pending(pending: &BTreeMap<Name, Pending>, cassette: &Name) -> Vec<NewEntry> {
    let mut entries = pending
        .get(cassette)
        .map(|p| p.entries.clone())
        .unwrap_or_default();
    entries.sort_by_key(|e| e.recorded_at);
    entries
}

async fn send<S: EntryStore + ?Sized>(
    store: &S,
    config: &WriterConfig,
    pending: &mut BTreeMap<Name, Pending>,
    cassette: &Name,
) -> Result<(), Error> {
    let entries = sorted_pending(pending, cassette);
    if entries.is_empty() {
        pending.remove(cassette);
        return Ok(());
    }
    match store
        .append_entries(&config.namespace, cassette, entries)
        .await
    {
        Ok(_) => {
            pending.remove(cassette);
            Ok(())
        }
        Err(err) => {
            // Keep the entries; stop the timer so a dead server is not hammered.
            if let Some(slot) = pending.get_mut(cassette) {
                slot.deadline = None;
            }
            Err(err)
        }
    }
}

async fn replace<S: EntryStore + ?Sized>(
    store: &S,
    config: &WriterConfig,
    pending: &mut BTreeMap<Name, Pending>,
    cassette: &Name,
) -> Result<(), Error> {
    let entries = sorted_pending(pending, cassette);
    if entries.is_empty() {
        return Ok(());
    }
    let body = futures::StreamExt::boxed(futures::stream::iter(entries.into_iter().map(Ok)));
    store
        .replace_entries(&config.namespace, cassette, body)
        .await?;
    pending.remove(cassette);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use trove_proto::entries::{EntryStream, NewEntryStream, ReadOptions};
    use trove_proto::types::{ListPage, Page};

    /// Records every call; fails appends while `down` is set.
    #[derive(Default)]
    struct FakeStore {
        appends: Mutex<Vec<(String, Vec<i64>)>>,
        replaces: Mutex<Vec<(String, Vec<i64>)>>,
        down: AtomicBool,
    }

    fn unavailable() -> Error {
        Error::Unavailable {
            message: "server down".into(),
        }
    }

    #[async_trait::async_trait]
    impl EntryStore for FakeStore {
        async fn append_entries(
            &self,
            _: &Namespace,
            c: &Name,
            entries: Vec<NewEntry>,
        ) -> Result<u64, Error> {
            if self.down.load(Ordering::SeqCst) {
                return Err(unavailable());
            }
            let n = entries.len() as u64;
            let times = entries.iter().map(|e| e.recorded_at).collect();
            self.appends
                .lock()
                .map_err(Error::internal)?
                .push((c.to_string(), times));
            Ok(n)
        }
        async fn read_entries(
            &self,
            _: &Namespace,
            _: &Name,
            _: ReadOptions,
        ) -> Result<EntryStream, Error> {
            Err(Error::Unimplemented {
                operation: "read".into(),
            })
        }
        async fn replace_entries(
            &self,
            _: &Namespace,
            c: &Name,
            entries: NewEntryStream,
        ) -> Result<u64, Error> {
            use futures::StreamExt;
            let entries: Vec<NewEntry> = entries.map(|e| e.expect("entry")).collect().await;
            let times = entries.iter().map(|e| e.recorded_at).collect();
            self.replaces
                .lock()
                .map_err(Error::internal)?
                .push((c.to_string(), times));
            Ok(entries.len() as u64)
        }
        async fn delete_cassette(&self, _: &Namespace, _: &Name) -> Result<bool, Error> {
            Ok(false)
        }
        async fn cassette_exists(&self, _: &Namespace, _: &Name) -> Result<bool, Error> {
            Ok(false)
        }
        async fn ensure_cassette(&self, _: &Namespace, _: &Name) -> Result<(), Error> {
            Ok(())
        }
        async fn list_cassettes(&self, _: &Namespace, _: &ListPage) -> Result<Page<String>, Error> {
            Ok(Page {
                items: vec![],
                next_page_token: None,
            })
        }
    }

    fn entry(ts: i64) -> NewEntry {
        NewEntry::parse(
            "entry",
            bytes::Bytes::from(format!("{{\"recorded_at\":{ts}}}")),
            None,
        )
        .expect("entry")
    }

    fn name(s: &str) -> Name {
        Name::new("cassette", s).expect("name")
    }

    fn appends(store: &FakeStore) -> Vec<(String, Vec<i64>)> {
        store.appends.lock().expect("lock").clone()
    }

    /// The batch_size-th write sends the batch, sorted by recorded_at, with no timer involved.
    #[tokio::test(start_paused = true)]
    async fn batches_by_size() {
        let store = Arc::new(FakeStore::default());
        let writer = CassetteWriter::new(Arc::clone(&store), WriterConfig::default());
        let c = name("c");
        for ts in (1..=9).rev() {
            writer.write(&c, entry(ts)).expect("write");
        }
        assert_eq!(writer.pending(&c).await.expect("pending"), 9);
        assert!(appends(&store).is_empty());
        writer.write(&c, entry(10)).expect("write");
        assert_eq!(writer.pending(&c).await.expect("pending"), 0);
        assert_eq!(appends(&store), vec![("c".into(), (1..=10).collect())]);
    }

    /// A quiet batch_timeout after the last write sends; each write restarts the timer.
    #[tokio::test(start_paused = true)]
    async fn batches_by_timeout_restarted_by_each_write() {
        let store = Arc::new(FakeStore::default());
        let writer = CassetteWriter::new(Arc::clone(&store), WriterConfig::default());
        let c = name("c");
        writer.write(&c, entry(1)).expect("write");
        writer.pending(&c).await.expect("sync");
        tokio::time::advance(Duration::from_millis(99)).await;
        writer.write(&c, entry(2)).expect("write");
        assert_eq!(
            writer.pending(&c).await.expect("pending"),
            2,
            "99 ms is not the timeout"
        );
        tokio::time::advance(Duration::from_millis(99)).await;
        assert_eq!(
            writer.pending(&c).await.expect("pending"),
            2,
            "the second write restarted the timer"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(writer.pending(&c).await.expect("pending"), 0);
        assert_eq!(appends(&store), vec![("c".into(), vec![1, 2])]);
    }

    /// A failed send keeps entries pending; flush reports the error, then succeeds later with nothing lost.
    #[tokio::test(start_paused = true)]
    async fn failed_send_is_reported_and_retried() {
        let store = Arc::new(FakeStore::default());
        let writer = CassetteWriter::new(Arc::clone(&store), WriterConfig::default());
        let c = name("c");
        store.down.store(true, Ordering::SeqCst);
        for ts in 0..12 {
            writer.write(&c, entry(ts)).expect("write");
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(writer.pending(&c).await.expect("pending"), 12);
        assert!(matches!(
            writer.flush(&c).await,
            Err(Error::Unavailable { .. })
        ));
        store.down.store(false, Ordering::SeqCst);
        writer.flush_all().await.expect("flush after recovery");
        let sent: Vec<i64> = appends(&store).into_iter().flat_map(|(_, t)| t).collect();
        assert_eq!(sent, (0..12).collect::<Vec<_>>());
    }

    /// replace_for_all_mode is a no-op with nothing pending, else one Replace of the pending entries.
    #[tokio::test(start_paused = true)]
    async fn replace_for_all_mode_only_when_pending() {
        let store = Arc::new(FakeStore::default());
        let writer = CassetteWriter::new(Arc::clone(&store), WriterConfig::default());
        let c = name("c");
        writer.replace_for_all_mode(&c).await.expect("no-op");
        assert!(store.replaces.lock().expect("lock").is_empty());
        writer.write(&c, entry(2)).expect("write");
        writer.write(&c, entry(1)).expect("write");
        writer.replace_for_all_mode(&c).await.expect("replace");
        assert_eq!(
            *store.replaces.lock().expect("lock"),
            vec![("c".to_string(), vec![1, 2])]
        );
        assert!(appends(&store).is_empty());
        assert_eq!(writer.pending(&c).await.expect("pending"), 0);
    }

    /// Shutting down (or dropping) the writer flushes what is pending.
    #[tokio::test(start_paused = true)]
    async fn shutdown_and_drop_flush() {
        let store = Arc::new(FakeStore::default());
        let writer = CassetteWriter::new(Arc::clone(&store), WriterConfig::default());
        writer.write(&name("a"), entry(1)).expect("write");
        writer.shutdown().await.expect("shutdown");
        assert_eq!(appends(&store), vec![("a".into(), vec![1])]);
        let writer = CassetteWriter::new(Arc::clone(&store), WriterConfig::default());
        writer.write(&name("b"), entry(2)).expect("write");
        let task = writer_task(writer);
        task.await.expect("writer task ends after drop");
        assert_eq!(appends(&store).len(), 2);
    }

    fn writer_task(mut writer: CassetteWriter) -> tokio::task::JoinHandle<()> {
        let task = writer.task.take().expect("task");
        drop(writer);
        task
    }
}
