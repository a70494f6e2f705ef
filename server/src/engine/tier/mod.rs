//! The sidecar tier: a local engine in front of another Trove server (the
//! upstream), reached through `trove-client`. [`Tier`] implements every
//! store trait by composing two implementations of them, so it knows nothing
//! of either side's storage or of the wire.
//!
//! # What is served from where, per group
//! - **Objects under a verified SHA-256** are immutable: the local copy is
//!   served without asking the upstream. A miss is fetched from the upstream,
//!   streamed to the caller and kept locally at the same time.
//!   `find_missing` asks the local tier first and sends one call to the
//!   upstream carrying only the local misses. Objects under other names
//!   (opaque, unverified) can change under the same name, so they pass
//!   through, like chunk streams.
//! - **Artifacts** are mutable: a read asks the upstream for the value's
//!   metadata (a `Stat`) and serves the local copy only when its SHA-256,
//!   size and content type match; otherwise it reads the upstream through
//!   into the local copy. Never stale, and large values cross the network
//!   once per change.
//! - **Cassettes, cache archives, refs and branch maps** pass through: their
//!   readers want the newest state, which only the upstream knows.
//! - **Writes** go through to the upstream and are acknowledged after it
//!   acknowledged them. The local copy of an object or artifact is written at
//!   the same time and commits only once the upstream acknowledged, so the
//!   local tier never holds what the upstream refused.
//! - **Usage** and the engine lifecycle are the local tier's.
//!
//! While the upstream cannot be reached, locally held verified objects are
//! still served; every other call fails fast with `Unavailable` naming the
//! upstream.

mod passthrough;
mod probe;
mod tee;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use probe::UpstreamState;

use async_trait::async_trait;
use trove_client::TroveClient;
use trove_proto::admin::UsageRow;
use trove_proto::artifacts::{ArtifactInfo, ListedArtifact, PutOptions};
use trove_proto::objects::{ChunkStream, ListedObject, ObjectInfo, StreamInfo};
use trove_proto::types::{now_micros, ByteStream, ListPage, Name, Namespace, Page};
use trove_proto::{ArtifactStore, Error, ObjectStore, Result, UsageStore};

use super::quota::Quotas;
use super::values::check_find_missing;
use super::{Background, Engine, Usage};

/// How long a call waits for a connection to the upstream before failing.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A local engine in front of an upstream Trove server.
pub struct Tier {
    local: Arc<dyn Engine>,
    upstream: TroveClient,
    /// The upstream's address, for messages.
    address: String,
    /// The local engine's quotas: artifact copies are records there (never
    /// evicted), so they are kept only while they hold at most half of
    /// their namespace's quota, leaving the rest to evictable objects.
    quotas: Arc<Quotas>,
    /// What the health checks of the upstream found.
    state: Arc<UpstreamState>,
    /// Deletes made through this tier so far, counted before and after
    /// each: a local copy started before a delete may hold what it deleted,
    /// so it is kept only if no delete ran meanwhile.
    deletes: Arc<AtomicU64>,
}

impl Tier {
    /// Puts `local` in front of `upstream` (reached at `address`); `quotas`
    /// are the local engine's.
    pub fn new(
        local: Arc<dyn Engine>,
        upstream: TroveClient,
        address: &str,
        quotas: Arc<Quotas>,
    ) -> Self {
        Tier {
            local,
            upstream,
            quotas,
            address: address.to_owned(),
            state: Arc::default(),
            deletes: Arc::default(),
        }
    }

    /// The upstream, for one call (counted, by operation); refused at once
    /// while the upstream is known to be unreachable, rather than each call
    /// waiting for a connection that will not come.
    fn calling(&self, call: &'static str) -> Result<&TroveClient> {
        if self.state.down() {
            return Err(Error::Unavailable {
                message: format!(
                    "the upstream {} cannot be reached (its health checks fail: {}); retry \
                     once it is back",
                    self.address,
                    self.state.last_failure()
                ),
            });
        }
        metrics::counter!("trove_upstream_calls_total", "call" => call).increment(1);
        Ok(&self.upstream)
    }

    /// Names the upstream in the errors that come from it rather than from
    /// the request: the upstream being away or slow, refusing or limiting
    /// this server's token, out of room, failing.
    fn upstream_error(&self, err: Error) -> Error {
        let at = &self.address;
        match err {
            // Unreachable, or up but refusing writes for now (a failed
            // fsync there): its own message says which.
            Error::Unavailable { message } => Error::Unavailable {
                message: format!("the upstream {at} is unavailable: {message}"),
            },
            Error::DeadlineExceeded { message } => Error::DeadlineExceeded {
                message: format!("the upstream {at} did not answer in time: {message}"),
            },
            Error::Unauthenticated { message } => Error::Unavailable {
                message: format!(
                    "the upstream {at} refused this server's token (check --upstream-token): \
                     {message}"
                ),
            },
            Error::PermissionDenied { message } => Error::PermissionDenied {
                message: format!(
                    "the upstream {at} does not grant this server's token (--upstream-token) \
                     that: {message}"
                ),
            },
            Error::ResourceExhausted { limit, message } => Error::ResourceExhausted {
                limit,
                message: format!("at the upstream {at}: {message}"),
            },
            Error::Internal { message } => Error::Internal {
                message: format!("the upstream {at} failed: {message}"),
            },
            other => other,
        }
    }

    /// A local copy that cannot be read (damaged, or a failing disk) is not
    /// the caller's problem while the upstream holds the value: the read
    /// goes upstream, and a damaged copy is dropped so it is fetched again.
    async fn local_copy_failed(&self, ns: &Namespace, hash: &Name, err: &Error) {
        tracing::warn!(%hash, error = %err, "local copy unreadable; reading the upstream");
        if matches!(err, Error::DataLoss { .. }) {
            if let Err(err) = self.local.delete_object(ns, hash).await {
                tracing::warn!(%hash, error = %err, "cannot drop a damaged local copy");
            }
        }
    }

    /// Whether a local copy of an artifact of `size` bytes may be kept in
    /// `ns`: always without a quota, else while the namespace's records
    /// (artifacts, cassettes, streams) stay within half of it.
    async fn room_for_artifact_copy(&self, ns: &Namespace, size: u64) -> bool {
        let Some(quota) = self.quotas.namespace(ns.as_str()) else {
            return true;
        };
        match self.local.namespace_usage(Some(ns)).await {
            Ok(rows) => {
                let records: u64 = rows
                    .iter()
                    .filter(|row| row.group != "objects" && row.group != "cache")
                    .map(|row| row.logical_bytes)
                    .sum();
                records.saturating_add(size) <= quota.max_bytes / 2
            }
            Err(_) => false,
        }
    }

    /// A check that no delete ran through this tier since it was made.
    fn no_delete_since(&self) -> impl FnOnce() -> bool + Send + 'static {
        let (deletes, seen) = (
            Arc::clone(&self.deletes),
            self.deletes.load(Ordering::SeqCst),
        );
        move || deletes.load(Ordering::SeqCst) == seen
    }

    /// Runs `delete` (upstream, then local) between two counts of deletes,
    /// so that every local copy in flight meanwhile is dropped.
    async fn deleting<T>(&self, delete: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.deletes.fetch_add(1, Ordering::SeqCst);
        let done = delete.await;
        self.deletes.fetch_add(1, Ordering::SeqCst);
        done
    }

    /// Whether `hash` names content the upstream verified: such an object
    /// can never change, so a local copy of it is always current.
    fn immutable(hash: &Name) -> bool {
        hash.sha256_digest().is_some()
    }

    /// Fetches a verified object from the upstream, keeping a local copy
    /// while the caller reads it.
    async fn object_through(
        &self,
        ns: &Namespace,
        hash: &Name,
    ) -> Result<(ObjectInfo, ByteStream)> {
        let still_current = self.no_delete_since();
        let (info, body) = self
            .calling("get_object")?
            .get_object(ns, hash)
            .await
            .map_err(|e| self.upstream_error(e))?;
        if !info.verified {
            return Ok((info, body));
        }
        let (local, ns, hash) = (Arc::clone(&self.local), ns.clone(), hash.clone());
        let (size, created_at) = (info.size, info.created_at);
        let body = tee::read_through(
            body,
            move |copy| async move {
                let copied = local
                    .put_object_copy(&ns, &hash, Some(size), copy, Box::new(move || created_at))
                    .await;
                if let Err(err) = copied {
                    tracing::debug!(%hash, error = %err, "no local copy kept of an upstream object");
                }
            },
            still_current,
        );
        Ok((info, body))
    }

    /// Reads an artifact from the upstream, keeping a local copy while the
    /// caller reads it.
    async fn artifact_through(
        &self,
        ns: &Namespace,
        key: &Name,
    ) -> Result<(ArtifactInfo, ByteStream)> {
        let still_current = self.no_delete_since();
        let (info, body) = self
            .calling("get_artifact")?
            .get_artifact(ns, key)
            .await
            .map_err(|e| self.upstream_error(e))?;
        if !self.room_for_artifact_copy(ns, info.size).await {
            return Ok((info, body));
        }
        let (local, ns, key) = (Arc::clone(&self.local), ns.clone(), key.clone());
        let options = PutOptions {
            content_type: info.content_type.clone(),
            expected_size: Some(info.size),
        };
        let body = tee::read_through(
            body,
            move |copy| async move {
                if let Err(err) = local.put_artifact(&ns, &key, options, copy).await {
                    tracing::debug!(%key, error = %err, "no local copy kept of an upstream artifact");
                }
            },
            still_current,
        );
        Ok((info, body))
    }
}

#[async_trait]
impl ObjectStore for Tier {
    async fn put_object(
        &self,
        ns: &Namespace,
        hash: &Name,
        expected_size: Option<u64>,
        data: ByteStream,
    ) -> Result<ObjectInfo> {
        let upstream = self.calling("put_object")?;
        if !Self::immutable(hash) {
            return upstream
                .put_object(ns, hash, expected_size, data)
                .await
                .map_err(|e| self.upstream_error(e));
        }
        // The local copy keeps the upstream's creation time, learnt from its
        // answer, which comes before the copy's body ends (see `tee`).
        let created_at = Arc::new(OnceLock::new());
        let learnt = Arc::clone(&created_at);
        let (answer, local) = tee::write_through(
            data,
            |body| async move {
                let info = upstream.put_object(ns, hash, expected_size, body).await?;
                let _ = learnt.set(info.created_at);
                Ok(info)
            },
            |body| {
                let created_at = move || created_at.get().copied().unwrap_or_else(now_micros);
                self.local
                    .put_object_copy(ns, hash, expected_size, body, Box::new(created_at))
            },
            self.no_delete_since(),
        )
        .await;
        if let (Ok(_), Err(err)) = (&answer, &local) {
            tracing::debug!(%hash, error = %err, "object stored upstream; no local copy kept");
        }
        answer.map_err(|e| self.upstream_error(e))
    }

    async fn get_object(&self, ns: &Namespace, hash: &Name) -> Result<(ObjectInfo, ByteStream)> {
        if Self::immutable(hash) {
            match self.local.get_object(ns, hash).await {
                Ok(found) => {
                    metrics::counter!("trove_tier_local_hits_total").increment(1);
                    return Ok(found);
                }
                Err(Error::NotFound { .. }) => {}
                Err(err) => self.local_copy_failed(ns, hash, &err).await,
            }
            metrics::counter!("trove_tier_local_misses_total").increment(1);
            return self.object_through(ns, hash).await;
        }
        self.calling("get_object")?
            .get_object(ns, hash)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn delete_object(&self, ns: &Namespace, hash: &Name) -> Result<bool> {
        let upstream = self.calling("delete_object")?;
        self.deleting(async {
            let existed = upstream
                .delete_object(ns, hash)
                .await
                .map_err(|e| self.upstream_error(e))?;
            self.local.delete_object(ns, hash).await?;
            Ok(existed)
        })
        .await
    }

    async fn stat_object(&self, ns: &Namespace, hash: &Name) -> Result<ObjectInfo> {
        if Self::immutable(hash) {
            match self.local.stat_object(ns, hash).await {
                Ok(info) => return Ok(info),
                Err(Error::NotFound { .. }) => {}
                Err(err) => self.local_copy_failed(ns, hash, &err).await,
            }
        }
        self.calling("stat_object")?
            .stat_object(ns, hash)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn list_objects(&self, ns: &Namespace, page: &ListPage) -> Result<Page<ListedObject>> {
        self.calling("list_objects")?
            .list_objects(ns, page)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn find_missing(&self, ns: &Namespace, hashes: &[Name]) -> Result<Vec<Name>> {
        check_find_missing(hashes.len())?;
        // Only verified hashes may be answered locally; the rest, and the
        // local misses, go upstream in one call.
        let verified: Vec<Name> = hashes
            .iter()
            .filter(|h| Self::immutable(h))
            .cloned()
            .collect();
        let local_misses: HashSet<Name> = if verified.is_empty() {
            HashSet::new()
        } else {
            self.local
                .find_missing(ns, &verified)
                .await?
                .into_iter()
                .collect()
        };
        let ask: Vec<Name> = hashes
            .iter()
            .filter(|h| !Self::immutable(h) || local_misses.contains(*h))
            .cloned()
            .collect();
        if ask.is_empty() {
            return Ok(Vec::new());
        }
        metrics::counter!("trove_upstream_find_missing_hashes_total")
            .increment(u64::try_from(ask.len()).unwrap_or(u64::MAX));
        let missing: HashSet<Name> = self
            .calling("find_missing")?
            .find_missing(ns, &ask)
            .await
            .map_err(|e| self.upstream_error(e))?
            .into_iter()
            .collect();
        Ok(hashes
            .iter()
            .filter(|h| missing.contains(*h))
            .cloned()
            .collect())
    }

    async fn put_stream(
        &self,
        ns: &Namespace,
        hash: &Name,
        chunks: ChunkStream,
    ) -> Result<StreamInfo> {
        self.calling("put_stream")?
            .put_stream(ns, hash, chunks)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn get_stream(&self, ns: &Namespace, hash: &Name) -> Result<(StreamInfo, ChunkStream)> {
        self.calling("get_stream")?
            .get_stream(ns, hash)
            .await
            .map_err(|e| self.upstream_error(e))
    }
}

#[async_trait]
impl ArtifactStore for Tier {
    async fn put_artifact(
        &self,
        ns: &Namespace,
        key: &Name,
        options: PutOptions,
        data: ByteStream,
    ) -> Result<ArtifactInfo> {
        let upstream = self.calling("put_artifact")?;
        let size = options.expected_size.unwrap_or(0);
        if !self.room_for_artifact_copy(ns, size).await {
            return upstream
                .put_artifact(ns, key, options, data)
                .await
                .map_err(|e| self.upstream_error(e));
        }
        let local_options = options.clone();
        let (answer, local) = tee::write_through(
            data,
            |body| upstream.put_artifact(ns, key, options, body),
            |body| self.local.put_artifact(ns, key, local_options, body),
            self.no_delete_since(),
        )
        .await;
        if let (Ok(_), Err(err)) = (&answer, &local) {
            tracing::debug!(%key, error = %err, "artifact stored upstream; no local copy kept");
        }
        answer.map_err(|e| self.upstream_error(e))
    }

    async fn get_artifact(&self, ns: &Namespace, key: &Name) -> Result<(ArtifactInfo, ByteStream)> {
        // Revalidate: the upstream's metadata says which value is current;
        // the local copy is served only when it is that value.
        let (current, local) = tokio::join!(
            self.calling("stat_artifact")?.stat_artifact(ns, key),
            self.local.get_artifact(ns, key)
        );
        let current = match current {
            Ok(current) => current,
            Err(Error::NotFound { kind, key: shown }) => {
                // Deleted upstream (by another tier, say): the local copy
                // only takes room now.
                if local.is_ok() {
                    if let Err(err) = self.local.delete_artifact(ns, key).await {
                        tracing::debug!(%key, error = %err, "stale local artifact copy kept");
                    }
                }
                return Err(Error::NotFound { kind, key: shown });
            }
            Err(err) => return Err(self.upstream_error(err)),
        };
        if let Ok((held, body)) = local {
            if held.sha256 == current.sha256
                && held.size == current.size
                && held.content_type == current.content_type
            {
                metrics::counter!("trove_tier_local_hits_total").increment(1);
                return Ok((current, body));
            }
        }
        metrics::counter!("trove_tier_local_misses_total").increment(1);
        self.artifact_through(ns, key).await
    }

    async fn delete_artifact(&self, ns: &Namespace, key: &Name) -> Result<bool> {
        let upstream = self.calling("delete_artifact")?;
        self.deleting(async {
            let existed = upstream
                .delete_artifact(ns, key)
                .await
                .map_err(|e| self.upstream_error(e))?;
            self.local.delete_artifact(ns, key).await?;
            Ok(existed)
        })
        .await
    }

    async fn stat_artifact(&self, ns: &Namespace, key: &Name) -> Result<ArtifactInfo> {
        self.calling("stat_artifact")?
            .stat_artifact(ns, key)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn list_artifacts(
        &self,
        ns: &Namespace,
        page: &ListPage,
        with_values: bool,
    ) -> Result<Page<ListedArtifact>> {
        self.calling("list_artifacts")?
            .list_artifacts(ns, page, with_values)
            .await
            .map_err(|e| self.upstream_error(e))
    }
}

#[async_trait]
impl UsageStore for Tier {
    async fn namespace_usage(&self, namespace: Option<&Namespace>) -> Result<Vec<UsageRow>> {
        // What this server holds on its own disk: the upstream reports its own.
        self.local.namespace_usage(namespace).await
    }
}

#[async_trait]
impl Engine for Tier {
    fn describe(&self) -> String {
        format!(
            "tier in front of {}; local {}",
            self.address,
            self.local.describe()
        )
    }

    fn start_background(&self) -> Background {
        let mut background = self.local.start_background();
        let (upstream, address, state) = (
            self.upstream.clone(),
            self.address.clone(),
            Arc::clone(&self.state),
        );
        background.spawn(move |stop| probe::watch(upstream, address, state, stop));
        background
    }

    async fn usage(&self) -> Result<Usage, Error> {
        self.local.usage().await
    }

    async fn flush(&self) -> Result<(), Error> {
        self.local.flush().await
    }

    fn write_refusal(&self) -> Option<String> {
        self.local.write_refusal()
    }

    fn upstream(&self) -> Option<(String, bool)> {
        Some((self.address.clone(), self.state.serving()))
    }
}
