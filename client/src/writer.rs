//! A buffered cassette writer for HTTP recorders that must never block on I/O.
//!
//! [`CassetteWriter::write`] only queues the entry. A background task sends a
//! cassette's pending entries (sorted by `recorded_at`) when `batch_size`
//! entries are pending or when `batch_timeout` passes without a new write to
//! that cassette (each write restarts the timer).
//!
//! Sending seals the pending entries into batches of at most
//! [`MAX_BATCH_BYTES`], each with its own idempotency key. A batch that fails
//! for a reason that may pass (the server is down, a reply was lost) stays
//! queued unchanged, so its retry, at the next write trigger or flush, is
//! recognised by the server and never duplicated; the flush that finds it
//! still failing reports the error. A batch the server rejects for good (an
//! entry over the message limit) is dropped and its error is returned by the
//! flush that met it, never swallowed.
//!
//! A cassette put in record-all mode ([`CassetteWriter::record_all`]) is never
//! sent piecemeal: its flush replaces the stored cassette with everything
//! queued, atomically. Dropping the writer flushes what is pending in the
//! background; [`CassetteWriter::shutdown`] does the same and waits.
//!
//! The writer works over any [`EntryStore`]: the remote client or, in tests
//! and embedded use, a store in the same process.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use trove_proto::entries::{AppendOptions, NewEntry};
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

/// Largest batch of entry bytes sent in one append (a single larger entry
/// travels alone).
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

type Reply = oneshot::Sender<Result<(), Error>>;

enum Command {
    Write(Name, NewEntry),
    RecordAll(Name),
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

    /// Puts `cassette` in record-all mode: nothing is sent for it until a
    /// flush (or [`CassetteWriter::replace_for_all_mode`]) replaces the stored
    /// cassette with everything queued.
    pub fn record_all(&self, cassette: &Name) -> Result<(), Error> {
        self.commands
            .send(Command::RecordAll(cassette.clone()))
            .map_err(|_| stopped())
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

/// Entries sealed into one append, with the key that makes its retry safe.
struct Batch {
    key: Name,
    entries: Vec<NewEntry>,
}

#[derive(Default)]
struct Pending {
    /// Written, not yet sealed.
    open: Vec<NewEntry>,
    /// Sealed, sent (maybe) but not acknowledged; retried unchanged.
    sealed: VecDeque<Batch>,
    deadline: Option<Instant>,
    record_all: bool,
}

impl Pending {
    fn len(&self) -> usize {
        self.open.len() + self.sealed.iter().map(|b| b.entries.len()).sum::<usize>()
    }
}

/// Makes idempotency keys unique to this writer.
struct KeyMaker {
    prefix: String,
    next: u64,
}

impl KeyMaker {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded randomly per process; mixing in the time and
        // pid keeps writers in different processes apart.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        hasher.write_u32(std::process::id());
        KeyMaker {
            prefix: format!("writer-{:016x}", hasher.finish()),
            next: 0,
        }
    }

    fn make(&mut self) -> Result<Name, Error> {
        self.next += 1;
        Name::new("idempotency_key", format!("{}-{}", self.prefix, self.next))
    }
}

/// Errors a retry cannot fix: the batch is dropped and the error reported.
fn is_permanent(err: &Error) -> bool {
    matches!(
        err,
        Error::InvalidArgument { .. } | Error::ResourceExhausted { .. }
    )
}

async fn run<S: EntryStore + ?Sized>(
    store: Arc<S>,
    config: WriterConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut pending: BTreeMap<Name, Pending> = BTreeMap::new();
    let mut keys = KeyMaker::new();
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
                    if let Err(err) = send(&*store, &config, &mut keys, &mut pending, &cassette).await {
                        tracing::warn!(cassette = %cassette, error = %err, "batched append failed; entries stay pending for the next flush");
                    }
                }
            }
            command = commands.recv() => match command {
                Some(Command::Write(cassette, entry)) => {
                    let slot = pending.entry(cassette.clone()).or_default();
                    slot.open.push(entry);
                    if slot.record_all {
                        continue;
                    }
                    slot.deadline = Some(Instant::now() + config.batch_timeout);
                    if slot.open.len() >= batch_size {
                        if let Err(err) = send(&*store, &config, &mut keys, &mut pending, &cassette).await {
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
                        if let Err(err) = send(&*store, &config, &mut keys, &mut pending, &cassette).await {
                            result = Err(err);
                        }
                    }
                    let _ = reply.send(result);
                }
                Some(Command::RecordAll(cassette)) => {
                    let slot = pending.entry(cassette).or_default();
                    slot.record_all = true;
                    slot.deadline = None;
                }
                Some(Command::ReplaceForAllMode(cassette, reply)) => {
                    let _ = reply.send(replace(&*store, &config, &mut pending, &cassette).await);
                }
                Some(Command::Pending(cassette, reply)) => {
                    let _ = reply.send(pending.get(&cassette).map_or(0, Pending::len));
                }
                None => {
                    // The writer was dropped: flush what is pending, then stop.
                    let names: Vec<Name> = pending.keys().cloned().collect();
                    for cassette in names {
                        if let Err(err) = send(&*store, &config, &mut keys, &mut pending, &cassette).await {
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

/// Sends what is queued for `cassette`: a record-all cassette is replaced,
/// any other has its entries sealed into batches and appended in order.
async fn send<S: EntryStore + ?Sized>(
    store: &S,
    config: &WriterConfig,
    keys: &mut KeyMaker,
    pending: &mut BTreeMap<Name, Pending>,
    cassette: &Name,
) -> Result<(), Error> {
    let Some(slot) = pending.get_mut(cassette) else {
        return Ok(());
    };
    if slot.record_all {
        return replace(store, config, pending, cassette).await;
    }
    slot.deadline = None;
    let mut open = std::mem::take(&mut slot.open);
    open.sort_by_key(|e| e.recorded_at);
    let mut current = Vec::new();
    let mut bytes = 0usize;
    for entry in open {
        if !current.is_empty() && bytes + entry.json.len() > MAX_BATCH_BYTES {
            slot.sealed.push_back(Batch {
                key: keys.make()?,
                entries: std::mem::take(&mut current),
            });
            bytes = 0;
        }
        bytes += entry.json.len();
        current.push(entry);
    }
    if !current.is_empty() {
        slot.sealed.push_back(Batch {
            key: keys.make()?,
            entries: current,
        });
    }
    let mut rejected = None;
    while let Some(batch) = slot.sealed.front() {
        let options = AppendOptions {
            idempotency_key: Some(batch.key.clone()),
        };
        match store
            .append_entries(&config.namespace, cassette, batch.entries.clone(), options)
            .await
        {
            Ok(_) => {
                slot.sealed.pop_front();
            }
            Err(err) if is_permanent(&err) => {
                let Some(refused) = slot.sealed.pop_front() else {
                    break;
                };
                if refused.entries.len() > 1 {
                    // Appends are all or nothing, so nothing of it was stored:
                    // retry entry by entry so only the offending one is lost.
                    for entry in refused.entries.into_iter().rev() {
                        slot.sealed.push_front(Batch {
                            key: keys.make()?,
                            entries: vec![entry],
                        });
                    }
                    continue;
                }
                tracing::error!(cassette = %cassette, error = %err, "the server refused an entry; it is dropped");
                rejected = Some(err);
            }
            Err(err) => return Err(err),
        }
    }
    if slot.len() == 0 {
        pending.remove(cassette);
    }
    rejected.map_or(Ok(()), Err)
}

async fn replace<S: EntryStore + ?Sized>(
    store: &S,
    config: &WriterConfig,
    pending: &mut BTreeMap<Name, Pending>,
    cassette: &Name,
) -> Result<(), Error> {
    let Some(slot) = pending.get(cassette) else {
        return Ok(());
    };
    let mut entries: Vec<NewEntry> = slot
        .sealed
        .iter()
        .flat_map(|b| b.entries.iter().cloned())
        .collect();
    entries.extend(slot.open.iter().cloned());
    if entries.is_empty() {
        return Ok(());
    }
    entries.sort_by_key(|e| e.recorded_at);
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
        keys: Mutex<std::collections::HashSet<String>>,
        down: AtomicBool,
        lose_reply_once: AtomicBool,
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
            options: AppendOptions,
        ) -> Result<u64, Error> {
            if self.down.load(Ordering::SeqCst) {
                return Err(unavailable());
            }
            if entries.iter().any(|e| e.json.len() > 1000) {
                return Err(Error::exhausted("max_message_bytes (1000)", "too big"));
            }
            let key = options
                .idempotency_key
                .map(|k| k.to_string())
                .unwrap_or_default();
            if !self.keys.lock().map_err(Error::internal)?.insert(key) {
                return Ok(entries.len() as u64);
            }
            let n = entries.len() as u64;
            let times = entries.iter().map(|e| e.recorded_at).collect();
            self.appends
                .lock()
                .map_err(Error::internal)?
                .push((c.to_string(), times));
            if self.lose_reply_once.swap(false, Ordering::SeqCst) {
                return Err(unavailable());
            }
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

    /// A batch whose reply was lost is retried with the same key and stored once.
    #[tokio::test(start_paused = true)]
    async fn lost_reply_is_not_duplicated() {
        let store = Arc::new(FakeStore::default());
        let writer = CassetteWriter::new(Arc::clone(&store), WriterConfig::default());
        let c = name("c");
        store.lose_reply_once.store(true, Ordering::SeqCst);
        writer.write(&c, entry(1)).expect("write");
        assert!(
            writer.flush(&c).await.is_err(),
            "the lost reply is reported"
        );
        writer.write(&c, entry(2)).expect("write");
        writer.flush(&c).await.expect("retry");
        let sent: Vec<i64> = appends(&store).into_iter().flat_map(|(_, t)| t).collect();
        assert_eq!(
            sent,
            vec![1, 2],
            "entry 1 stored once (its retry was deduplicated), entry 2 in its own batch"
        );
    }

    /// An entry the server refuses for good is dropped and reported; its batch mates are stored.
    #[tokio::test(start_paused = true)]
    async fn refused_entry_is_reported_and_batch_mates_survive() {
        let store = Arc::new(FakeStore::default());
        let writer = CassetteWriter::new(Arc::clone(&store), WriterConfig::default());
        let c = name("c");
        writer.write(&c, entry(1)).expect("write");
        let huge = format!("{{\"recorded_at\":2,\"pad\":\"{}\"}}", "x".repeat(2000));
        writer
            .write(
                &c,
                NewEntry::parse("entry", huge.into(), None).expect("entry"),
            )
            .expect("write");
        writer.write(&c, entry(3)).expect("write");
        let err = writer.flush(&c).await.expect_err("the refusal is reported");
        assert!(matches!(err, Error::ResourceExhausted { .. }), "{err:?}");
        let sent: Vec<i64> = appends(&store).into_iter().flat_map(|(_, t)| t).collect();
        assert_eq!(sent, vec![1, 3]);
        assert_eq!(writer.pending(&c).await.expect("pending"), 0);
    }

    /// In record-all mode nothing is appended; the flush replaces the cassette with everything written.
    #[tokio::test(start_paused = true)]
    async fn record_all_mode_replaces_with_everything() {
        let store = Arc::new(FakeStore::default());
        let writer = CassetteWriter::new(Arc::clone(&store), WriterConfig::default());
        let c = name("c");
        writer.record_all(&c).expect("record all");
        for ts in (0..25).rev() {
            writer.write(&c, entry(ts)).expect("write");
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(writer.pending(&c).await.expect("pending"), 25);
        assert!(
            appends(&store).is_empty(),
            "nothing is sent piecemeal in record-all mode"
        );
        writer.replace_for_all_mode(&c).await.expect("replace");
        assert_eq!(
            *store.replaces.lock().expect("lock"),
            vec![("c".to_string(), (0..25).collect::<Vec<_>>())]
        );
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
