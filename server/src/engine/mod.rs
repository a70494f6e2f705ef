//! Storage engines: the [`Engine`] trait every engine implements, what the
//! engines share, and one folder per engine.
//!
//! An engine is the four `trove-proto` store traits plus its lifecycle: the
//! background work it needs ([`Engine::start_background`], owned by a guard
//! that stops it), what it holds ([`Engine::usage`], for the store gauges)
//! and a last flush on shutdown. The server is wired through this trait
//! alone; [`open`] is the one place that picks an engine from the settings.
//!
//! # Layout
//! - [`record`]: the value record both engines persist (versioned).
//! - [`values`]: content and size checks, info builders, find-missing limits.
//! - [`chunks`]: the stream chunk codec and body chunking.
//! - [`retention`]: the pure function that plans a cache prune.
//! - [`sled`]: the embedded engine (sled plus blob files), the default.
//! - [`bucket`]: the object-storage engine (S3, GCS, Azure).
//! - [`tier`]: a local engine in front of another Trove server (sidecars).
//!
//! Rules: `sled` and `bucket` never import each other; both may use the
//! shared modules; nothing here imports tonic. `.ci/check-layout.sh` checks
//! the import rules.

pub mod bucket;
pub(crate) mod chunks;
pub mod quota;
pub(crate) mod record;
pub(crate) mod retention;
pub mod sled;
pub mod tier;
pub(crate) mod values;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use trove_proto::objects::ObjectInfo;
use trove_proto::types::{ByteStream, Name, Namespace};
use trove_proto::{ArtifactStore, CacheStore, EntryStore, Error, ObjectStore, UsageStore};

use crate::config::Config;

/// Logs an internal failure's full detail (which may name files, buckets or
/// a store's raw answer) with a fresh incident id, inside the call's span,
/// and returns the id: all the caller is told is the id and what to do.
pub fn incident(what: &str, detail: &dyn std::fmt::Display) -> String {
    let id = format!("{:016x}", rand::random::<u64>());
    tracing::error!(incident = %id, what, detail = %detail, "storage failure");
    id
}

/// A storage engine: every operation group, plus what the server needs to
/// run it.
#[async_trait]
pub trait Engine: ObjectStore + ArtifactStore + EntryStore + CacheStore + UsageStore {
    /// One line naming the engine and where its data lives, for logs.
    fn describe(&self) -> String;

    /// Starts the engine's periodic work (reclaiming what interrupted writes
    /// left, for example). It runs until the returned guard is stopped or
    /// dropped.
    fn start_background(&self) -> Background;

    /// What the engine holds. May scan the whole store: call it off the
    /// request path, and rarely.
    async fn usage(&self) -> Result<Usage, Error>;

    /// Makes every acknowledged write durable before the process exits; a
    /// no-op for an engine whose writes are durable when acknowledged.
    async fn flush(&self) -> Result<(), Error>;

    /// Why the engine refuses every write right now (after a failed fsync:
    /// until its log is reopened, or until a restart), if it does; health
    /// reports NOT_SERVING meanwhile.
    fn write_refusal(&self) -> Option<String> {
        None
    }

    /// Stores a copy of an object first stored elsewhere, keeping that
    /// store's creation time: `created_at` is called once the body has ended
    /// cleanly. An engine that cannot keep it stores the object like
    /// `put_object` (with its own clock).
    async fn put_object_copy(
        &self,
        ns: &Namespace,
        hash: &Name,
        expected_size: Option<u64>,
        data: ByteStream,
        created_at: Box<dyn FnOnce() -> i64 + Send>,
    ) -> Result<ObjectInfo, Error> {
        drop(created_at);
        self.put_object(ns, hash, expected_size, data).await
    }

    /// For a tier in front of another server: the upstream's address and
    /// whether its last health check answered SERVING.
    fn upstream(&self) -> Option<(String, bool)> {
        None
    }
}

/// What an engine holds, for the store gauges. A figure an engine cannot
/// know without reading every item is `None` and is not exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Content-addressed objects.
    pub objects: u64,
    /// Chunk streams.
    pub streams: u64,
    /// Artifacts.
    pub artifacts: u64,
    /// Cassettes.
    pub cassettes: u64,
    /// Stored entries (including versions awaiting removal).
    pub entries: Option<u64>,
    /// Cache archives (one per ref and suite on sled; one per ref record on
    /// object storage).
    pub cache_archives: u64,
    /// Payload bytes as callers see them.
    pub logical_bytes: Option<u64>,
    /// Bytes the engine occupies where it stores them (disk or bucket).
    pub disk_bytes: u64,
}

/// The background tasks of an engine. Dropping the guard asks them to stop
/// at their next safe point; [`Background::stop`] also waits for them.
#[derive(Debug, Default)]
pub struct Background {
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    /// Runs `task`, which must return soon after its token is cancelled.
    pub fn spawn<F>(&mut self, task: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks
            .push(tokio::spawn(task(self.cancel.child_token())));
    }

    /// Asks every task to stop and waits until they have.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        for task in std::mem::take(&mut self.tasks) {
            if let Err(err) = task.await {
                tracing::warn!(error = %err, "a background task failed");
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Opens the engine the settings select: sled in `data_dir` by default, or
/// the object store named by `store`; with an upstream, that engine is the
/// local tier in front of it.
pub async fn open(config: &Config) -> anyhow::Result<Arc<dyn Engine>> {
    let local = open_local(config).await?;
    let Some(address) = config.upstream.as_deref() else {
        return Ok(local);
    };
    let upstream = trove_client::TroveClient::connect_lazy_with(
        address,
        &config.upstream_options()?,
        tier::UPSTREAM_CONNECT_TIMEOUT,
    )
    .with_context(|| format!("unusable upstream {address}"))?;
    let quotas = Arc::new(config.quotas());
    Ok(Arc::new(tier::Tier::new(local, upstream, address, quotas)))
}

/// Opens the engine that keeps this server's own data.
async fn open_local(config: &Config) -> anyhow::Result<Arc<dyn Engine>> {
    if config.store.is_empty() {
        let dir = config.data_dir.clone();
        let options = config.store_options();
        let store = tokio::task::spawn_blocking(move || sled::SledStore::open(&dir, options))
            .await
            .context("store task panicked")?
            .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
        return Ok(Arc::new(store));
    }
    if !config.quotas().is_empty() {
        anyhow::bail!(
            "the object-storage engine cannot enforce max_disk_bytes or namespace quotas (it keeps \
             no usage counters, and its replicas share no write path to keep them in); remove \
             them and use the bucket's own quotas and lifecycle rules (expiry), or run on the \
             embedded engine"
        );
    }
    let store = bucket::connect(
        &config.store,
        config.s3_endpoint.as_deref(),
        config.bucket_options(),
    )
    .await
    .with_context(|| format!("cannot open the store {}", config.store))?;
    Ok(Arc::new(store))
}
