//! The embedded store: sled for metadata and the smallest values, value
//! packs for values up to the inline limit, blob files for larger ones.
//! [`SledStore`] implements every trait of `trove-proto`.
//!
//! This module never imports tonic: it speaks domain types and
//! [`trove_proto::Error`] only. The gRPC adapters live in `crate::grpc`.
//!
//! # Caveats
//! - Durability: in [`Durability::Strict`] mode (the default) a write returns
//!   only after `fdatasync`/`fsync` returned for every file it depends on and
//!   for the folder of every file it created: its record in the store's own
//!   write-ahead log (`wal`: one `fdatasync` shared by every write waiting at
//!   that moment, in a preallocated segment; it carries packed values'
//!   bytes too), and blob files with their folder before the record that
//!   references them is written. sled is the index, made durable with the
//!   packs by background checkpoints (`durable`); its own
//!   flush (`sync_file_range`) and its timer's `fsync` never count. Strict
//!   reads never report a change whose record is not yet durable. In
//!   [`Durability::Relaxed`] mode writes return before their record's
//!   `fdatasync`; the log writes continuously, so a crash can lose the writes
//!   of the last group in flight (milliseconds, never torn ones).
//! - Writes are not sled transactions but logged overlays, all or nothing,
//!   under the log's lock (see `wal`); their closures never await.
//!
//! # Layout
//! - this file: options, fault hooks, opening, staging and committing values.
//! - `schema`: every tree and every key (which parts make which key).
//! - `keys`: the byte encoding of key parts (dependency-free, fuzzed).
//! - `blob`: staging, publishing and reclaiming blob files.
//! - `packs`: value packs (placing, reading, syncing, compaction).
//! - `read`: opening a value's record and body, streaming it verified.
//! - `wal`: the write-ahead log (group commit, undo on failure, replay).
//! - `durable`: checkpoints (sled's flush, then real fsyncs).
//! - `ids`: unique ids, reserved durably in blocks.
//! - `format`: the data folder's format version (no downgrade misreads).
//! - `usage`: the usage scan and the [`crate::engine::Engine`] lifecycle.
//! - `objects`, `artifacts`, `entries`, `cache`: the trait implementations.
//!
//! The value record it persists, the value checks, the chunk codec and
//! retention planning are shared with the bucket engine from
//! `crate::engine`; this engine never imports the bucket engine.

mod accounting;
mod artifacts;
mod blob;
mod cache;
mod durable;
mod entries;
mod errors;
mod eviction;
mod faults;
mod format;
mod ids;
mod keys;
mod objects;
mod packs;
mod read;
mod schema;
mod usage;
mod wal;

pub use eviction::EvictionPass;
pub use faults::Faults;
pub use packs::{CompactionPass, COMPACTION_INTERVAL_MS, PACK_BYTES};
pub use read::BodyReader;
pub use usage::StoreStats;

pub(crate) use errors::{body_error, io_error, read_error, sled_error, tx_error};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use trove_proto::Error;

use crate::engine::record::{self, Body, ValueRecord};

use blob::{BlobDir, Published};
use durable::{Checkpointer, DurableFlush};
use wal::{LoggedTx, Wal};

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After it is on disk (group-committed fsync).
    #[default]
    Strict,
    /// Before its log record is on disk; a crash can lose the last group
    /// commit in flight (milliseconds of writes, never a torn one).
    Relaxed,
}

/// sled's own default page cache size, kept so that not setting it changes nothing.
pub const DEFAULT_CACHE_BYTES: u64 = 1024 * 1024 * 1024;

/// Tuning of a [`SledStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Values up to this size are stored in sled's records or in value
    /// packs (see `packs`); larger ones in blob files.
    pub inline_limit: usize,
    /// The size at which a value pack is sealed (and may be compacted).
    pub pack_bytes: u64,
    /// How long after start compaction first runs, and how long it waits
    /// before a pass for any freed bytes (enough freed bytes start one at
    /// once).
    pub compaction_interval: std::time::Duration,
    /// Size of the chunks values are read back in.
    pub read_chunk_bytes: usize,
    /// When writes are acknowledged.
    pub durability: Durability,
    /// Bytes of database pages sled may keep in memory; the larger part of a
    /// sled server's resident memory, so it must fit the process's limit.
    pub cache_bytes: u64,
    /// Capacity limits, enforced with each write.
    pub quotas: Arc<crate::engine::quota::Quotas>,
    /// How long an upload to an evicting namespace past its overshoot
    /// ceiling waits for eviction to make room before it is refused.
    pub eviction_wait: std::time::Duration,
    /// Failures to inject at the storage boundary (tests only; `None` in production).
    pub faults: Option<Arc<Faults>>,
}

/// The default of [`StoreOptions::eviction_wait`].
pub const DEFAULT_EVICTION_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            inline_limit: 64 * 1024,
            pack_bytes: packs::PACK_BYTES,
            compaction_interval: packs::COMPACTION_INTERVAL,
            read_chunk_bytes: 1024 * 1024,
            durability: Durability::Strict,
            cache_bytes: DEFAULT_CACHE_BYTES,
            quotas: Arc::default(),
            eviction_wait: DEFAULT_EVICTION_WAIT,
            faults: None,
        }
    }
}

struct Inner {
    db: sled::Db,
    objects: sled::Tree,
    artifacts: sled::Tree,
    blob_refs: sled::Tree,
    entry_trees: Arc<entries::EntryTrees>,
    cache: Arc<cache::CacheTrees>,
    usage: accounting::UsageTrees,
    eviction: eviction::Eviction,
    blobs: BlobDir,
    /// Small values' bytes, outside sled (see `packs`).
    packs: Arc<packs::Packs>,
    wal: Wal,
    /// Checkpoints sled; also run at shutdown.
    checkpoints: Arc<std::sync::Mutex<DurableFlush>>,
    _checkpointer: Checkpointer,
    /// Unique ids: entry sequence numbers, generations, blob ids.
    ids: ids::Ids,
    /// Set once an fsync of sled failed: no write is acknowledged from then on.
    write_refusal: Arc<std::sync::OnceLock<String>>,
    options: StoreOptions,
    root: PathBuf,
}

/// The embedded store. A cheap `Clone` handle; clones share one database.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Opens (creating if needed) the store in `root`, then reclaims staged
    /// uploads and unreferenced blobs left by a crash. Blocking: call from
    /// `spawn_blocking` when on an async runtime.
    pub fn open(root: &Path, options: StoreOptions) -> Result<Self, Error> {
        std::fs::create_dir_all(root).map_err(|e| io_error("create data directory", &e))?;
        format::check_and_record(root)?;
        let db = sled::Config::new()
            .path(root.join("db"))
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(options.cache_bytes)
            .segment_size(durable::sled_segment_size(&root.join("db")))
            .flush_every_ms(Some(durable::SLED_FLUSH_EVERY_MS))
            // sled's own timer stays on: without it sled can stall waiting
            // for a free log segment that only a flush releases, and its
            // segment cleaning runs only on that timer. Its flushes never
            // count as durability (the log does).
            .open()
            .map_err(sled_error)?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_error);
        let objects = tree(schema::OBJECTS)?;
        let artifacts = tree(schema::ARTIFACTS)?;
        let blob_refs = tree(schema::BLOB_REFS)?;
        let log_tree = tree(wal::LOG_TREE)?;
        let packs = Arc::new(
            packs::Packs::open(&root.join("packs"), options.pack_bytes)
                .map_err(|e| io_error("open the value packs", &e))?,
        );
        let checkpoints =
            DurableFlush::open(db.clone(), &root.join("db"), Some(Arc::clone(&packs)))
                .map_err(|e| io_error("open the database files for fsync", &e))?;
        let write_refusal = checkpoints.refusal();
        let checkpoints = Arc::new(std::sync::Mutex::new(checkpoints));
        let log_dir = root.join("log");
        let recovered = wal::recover(&db, &log_tree, &log_dir, Some(&packs), || {
            checkpoints
                .lock()
                .map_err(|_| "the checkpoint lock is poisoned".to_owned())?
                .flush()
        })?;
        // Replay may have changed any tree: open the engines' trees after it.
        let entry_trees = entries::EntryTrees::open(&db)?;
        let cache = cache::CacheTrees::open(&db)?;
        let blobs = BlobDir::open(root).map_err(|e| io_error("open blob folders", &e))?;
        let (files, bytes) = blobs
            .reclaim(|id| blob_refs.contains_key(id.to_be_bytes()).unwrap_or(true))
            .map_err(|e| io_error("reclaim staged files", &e))?;
        if files > 0 {
            tracing::info!(files, bytes, "reclaimed staged and orphaned blob files");
        }
        let ids = ids::Ids::open(root, || durable::legacy_id_floor(&db, &blob_refs))?;
        let undo_flush = Arc::clone(&checkpoints);
        let make_durable: wal::MakeDurable = Box::new(move || {
            undo_flush
                .lock()
                .map_err(|_| "the checkpoint lock is poisoned".to_owned())?
                .flush()
        });
        let wal = Wal::start(
            log_tree,
            log_dir,
            &recovered,
            options.faults.clone(),
            make_durable,
            Some(Arc::clone(&packs)),
        )
        .map_err(|e| io_error("start the log", &e))?;
        let checkpointer = Checkpointer::start(wal.clone(), Arc::clone(&checkpoints))
            .map_err(|e| io_error("start the checkpoint thread", &e))?;
        entry_trees.collect_leftovers(&wal, &packs)?;
        let usage = accounting::UsageTrees::open(&db, root, options.quotas.min_free_disk_bytes)?;
        usage.prepare(&accounting::Sources {
            objects: &objects,
            artifacts: &artifacts,
            cache_refs: &cache.refs,
            cassettes: &entry_trees.cassettes,
            entries: &entry_trees.entries,
        })?;
        let eviction = eviction::Eviction::open(&db)?;
        let store = SledStore {
            inner: Arc::new(Inner {
                db,
                objects,
                artifacts,
                blob_refs,
                entry_trees,
                cache,
                usage,
                eviction,
                blobs,
                packs,
                wal,
                checkpoints,
                _checkpointer: checkpointer,
                ids,
                write_refusal,
                options,
                root: root.to_path_buf(),
            }),
        };
        // Indexing an older store and any eviction backlog run in the
        // background: the server serves meanwhile.
        store.start_eviction();
        store.start_compaction();
        Ok(store)
    }

    /// Makes every applied write durable and checkpoints sled (used at
    /// shutdown, so that the next start has no log to replay).
    pub async fn flush(&self) -> Result<(), Error> {
        self.inner.wal.barrier(self.inner.wal.ticket()).await?;
        let store = self.clone();
        blocking(move || {
            durable::checkpoint(&store.inner.wal, &store.inner.checkpoints)
                .map(|_| ())
                .map_err(|reason| Error::Unavailable {
                    message: format!("the final checkpoint failed: {reason}"),
                })
        })
        .await
    }

    /// Data directory of this store.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Taken when an operation starts, before it reads or writes; see
    /// [`SledStore::durable`] and [`SledStore::visible`].
    fn ticket(&self) -> u64 {
        self.inner.eviction.note_call();
        self.inner.wal.ticket()
    }

    /// Called after an operation's writes: waits until they are durable
    /// (no-op in relaxed mode). Fails when the log failed since `ticket`.
    async fn durable(&self, ticket: u64) -> Result<(), Error> {
        match self.inner.options.durability {
            Durability::Strict => self.inner.wal.barrier(ticket).await,
            Durability::Relaxed => Ok(()),
        }
    }

    /// Called after a read: waits until whatever it saw is durable, so a
    /// strict read never reports a write that a crash could still undo.
    /// Returns at once when no write is waiting for the log.
    async fn visible(&self, ticket: u64) -> Result<(), Error> {
        match self.inner.options.durability {
            Durability::Strict => self.inner.wal.read_barrier(ticket).await,
            Durability::Relaxed => Ok(()),
        }
    }

    /// Runs `body` as one logged write over `trees` (all or nothing), then
    /// the usage counters and the eviction index: the trees after `trees`
    /// are `usage`, `entry_usage`, `lru` and `lru_at`, in that order.
    fn write<T>(
        &self,
        trees: &[&sled::Tree],
        body: impl Fn(&LoggedTx<'_>) -> sled::transaction::ConflictableTransactionResult<T, Error>,
    ) -> Result<T, Error> {
        self.write_logged(trees, body, false)
    }

    /// [`SledStore::write`] for housekeeping that readers need not wait for
    /// (see `Wal::write_quiet`).
    fn write_quiet<T>(
        &self,
        trees: &[&sled::Tree],
        body: impl Fn(&LoggedTx<'_>) -> sled::transaction::ConflictableTransactionResult<T, Error>,
    ) -> Result<T, Error> {
        self.write_logged(trees, body, true)
    }

    fn write_logged<T>(
        &self,
        trees: &[&sled::Tree],
        body: impl Fn(&LoggedTx<'_>) -> sled::transaction::ConflictableTransactionResult<T, Error>,
        quiet: bool,
    ) -> Result<T, Error> {
        if let Some(reason) = self.inner.write_refusal.get() {
            return Err(Error::Unavailable {
                message: reason.clone(),
            });
        }
        let counted = trees.len();
        let usage = &self.inner.usage;
        // Housekeeping frees space (eviction) or writes little: the floor
        // must not stop it.
        if !quiet {
            usage.free.check(0)?;
        }
        let index = &self.inner.eviction;
        let all = [
            trees,
            &[&usage.usage, &usage.entry_usage, &index.lru, &index.lru_at],
        ]
        .concat();
        let past_quota = std::cell::Cell::new(false);
        let logged = |tx: &LoggedTx<'_>| {
            let out = body(tx)?;
            let quotas = &self.inner.options.quotas;
            past_quota.set(accounting::account(tx, counted, quotas)?);
            eviction::track(tx, counted)?;
            Ok(out)
        };
        let out = if quiet {
            self.inner.wal.write_quiet(&all, logged)?
        } else {
            self.inner.wal.write(&all, logged)?
        };
        if past_quota.get() {
            index.wake();
        }
        Ok(out)
    }

    /// Unlinks blobs whose references were removed, once that removal is
    /// durable (always waiting for the flush, even in relaxed mode, so that a
    /// crash can never leave metadata pointing at a deleted file).
    fn retire_blobs(&self, ids: Vec<u64>, ticket: u64) {
        if ids.is_empty() {
            return;
        }
        let store = self.clone();
        let retire = async move {
            if store.inner.wal.barrier(ticket).await.is_ok() {
                for id in ids {
                    store.inner.blobs.remove(id);
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(retire);
            }
            Err(_) => {
                tracing::warn!("no runtime to retire blobs; they will be reclaimed at next start")
            }
        }
    }

    fn next_id(&self) -> Result<u64, Error> {
        self.inner.ids.next()
    }

    /// Writes `make(old)` under `key` together with its blob reference, in one
    /// logged write. `make` returning `None` leaves the key untouched. Returns
    /// the previous record and the one written, if any. Blocking but short.
    fn commit(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        make: impl Fn(Option<&ValueRecord>) -> Option<ValueRecord>,
    ) -> Result<(Option<ValueRecord>, Option<ValueRecord>), Error> {
        use sled::transaction::ConflictableTransactionError;
        self.write(&[tree, &self.inner.blob_refs], |tx| {
            let (t, refs) = (tx.tree(0), tx.tree(1));
            let old = match t.get(key)? {
                Some(bytes) => {
                    Some(record::decode(&bytes).map_err(ConflictableTransactionError::Abort)?)
                }
                None => None,
            };
            let Some(mut new) = make(old.as_ref()) else {
                return Ok((old, None));
            };
            packs::refs::pack_body(tx, &mut new);
            let encoded = record::encode(&new).map_err(ConflictableTransactionError::Abort)?;
            t.insert(key, encoded)?;
            let freed = packs::refs::swap(&refs, key, old.as_ref(), Some(&new))?;
            self.inner.packs.note_freed(freed);
            Ok((old, Some(new)))
        })
    }

    /// Removes `keys` from `tree` and their blob references in one
    /// logged write; returns the records that existed.
    fn remove_all(&self, tree: &sled::Tree, keys: &[Vec<u8>]) -> Result<Vec<ValueRecord>, Error> {
        use sled::transaction::ConflictableTransactionError;
        self.write(&[tree, &self.inner.blob_refs], |tx| {
            let (t, refs) = (tx.tree(0), tx.tree(1));
            let mut removed = Vec::new();
            for key in keys {
                if let Some(bytes) = t.remove(key.as_slice())? {
                    let old =
                        record::decode(&bytes).map_err(ConflictableTransactionError::Abort)?;
                    let freed = packs::refs::swap(&refs, key, Some(&old), None)?;
                    self.inner.packs.note_freed(freed);
                    removed.push(old);
                }
            }
            Ok(removed)
        })
    }

    /// Publishes a staged body and commits `make(old, body)` under `key`;
    /// waits for durability and retires the replaced blob. Returns the
    /// committed (or kept) record.
    ///
    /// Publishing and committing run as one detached task: if the caller is
    /// cancelled (a client reset), the step still ends in a clean state,
    /// either committed or with the published blob removed by its guard.
    async fn publish_and_commit(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        staged: blob::StagedBody,
        make: impl Fn(Option<&ValueRecord>, &Body) -> Option<ValueRecord> + Send + 'static,
    ) -> Result<ValueRecord, Error> {
        let store = self.clone();
        let tree = tree.clone();
        let key = key.to_vec();
        self.publish_with(staged, move |body| {
            let (old, written) = store.commit(&tree, &key, |old| make(old, body))?;
            let retired: Vec<u64> = old
                .as_ref()
                .and_then(ValueRecord::blob_id)
                .into_iter()
                .collect();
            match (written, old) {
                (Some(new), _) => Ok(Committed {
                    value: new,
                    keep_blob: true,
                    retired,
                }),
                // Nothing written: the unused blob is removed by its guard.
                (None, Some(old)) => Ok(Committed {
                    value: old,
                    keep_blob: false,
                    retired: vec![],
                }),
                (None, None) => Err(Error::internal("commit wrote nothing and found nothing")),
            }
        })
        .await
    }

    /// Publishes a staged body, then runs `commit` with it (a logged
    /// write that references the body); keeps the blob only if the
    /// commit says so, retires the blobs it replaced, and waits for
    /// durability. Publish and commit run as one detached task: a cancelled
    /// caller cannot stop it between the two steps.
    async fn publish_with<T: Send + 'static>(
        &self,
        staged: blob::StagedBody,
        commit: impl FnOnce(&Body) -> Result<Committed<T>, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let ticket = self.ticket();
        let store = self.clone();
        let task = tokio::spawn(async move {
            let published = staged
                .publish()
                .await
                .map_err(|e| io_error("publish upload", &e))?;
            let (body, blob) = match published {
                Published::Inline(bytes) => (Body::Inline(bytes), None),
                Published::Blob(blob) => (Body::Blob(blob.id), Some(blob)),
            };
            let committed = commit(&body)?;
            if committed.keep_blob {
                if let Some(blob) = blob {
                    blob.keep();
                }
            }
            store.retire_blobs(committed.retired, ticket);
            Ok::<T, Error>(committed.value)
        });
        let value = task
            .await
            .map_err(|e| Error::internal(format!("commit task failed: {e}")))??;
        self.durable(ticket).await?;
        Ok(value)
    }
}

/// What a commit inside [`SledStore::publish_with`] did.
pub(crate) struct Committed<T> {
    /// The result handed back to the caller.
    pub value: T,
    /// The new body is referenced now: keep its blob file.
    pub keep_blob: bool,
    /// Blob files no longer referenced, to unlink once durable.
    pub retired: Vec<u64>,
}

/// Iterates the keys of `tree` under `namespace_key` whose next part starts
/// with `prefix`, strictly after the part `after` (with any suffix) when given.
pub fn scan_after(
    tree: &sled::Tree,
    namespace_key: &[u8],
    prefix: &str,
    after: Option<&str>,
) -> sled::Iter {
    let mut scan = namespace_key.to_vec();
    keys::push_escaped(&mut scan, prefix.as_bytes());
    let mut start = scan.clone();
    if let Some(after) = after {
        let mut resume = namespace_key.to_vec();
        keys::push_part(&mut resume, after.as_bytes());
        // 0xFF sorts after every suffix a key can carry behind its part
        // (suffixes start with a kind byte, a number or another part).
        resume.push(0xFF);
        if resume > start {
            start = resume;
        }
    }
    match keys::prefix_end(&scan) {
        Some(end) => tree.range(start..end),
        None => tree.range(start..),
    }
}

/// Runs blocking store work (scans, bulk deletes) off the async workers.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::internal(format!("store task failed: {e}")))?
}
