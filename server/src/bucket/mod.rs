//! The bucket engine: every operation group on S3-compatible object storage
//! (or GCS, or Azure) through the `object_store` crate, with no state in the
//! server, so any number of servers can share one bucket.
//!
//! The layout (all under the configured root; `{name}` is a name's key text
//! from [`keys`]):
//! - `n/{namespace}/a/{key}!r`: an artifact's value record.
//! - `n/{namespace}/o/{hash}!d` and `!s`: an object's and a stream's records.
//! - `n/{namespace}/c/{cassette}!h`: a cassette's head (its runs of entries).
//! - `n/{namespace}/k/{prefix}!p/...`: the cache (see [`cache`]).
//! - `blobs/{id}`: bodies too large to live inside a record.
//! - `pending/{id}`: markers naming a blob and the record that should own it,
//!   written before the blob and removed once the record is published; what
//!   a crash leaves behind is reclaimed from them (see [`BucketStore::reclaim`]).
//! - `probe/conditional-put`: written at start to check conditional writes.
//!
//! Records are small objects replaced with a conditional write (`If-Match`
//! on the version read, `If-None-Match: *` to create), so concurrent writers
//! through any servers serialise on them and readers never see a torn state:
//! a body is complete before the record that points at it is published.
//!
//! Never imports tonic.

pub mod artifacts;
pub mod blob_cache;
pub mod cache;
pub mod connect;
pub mod entries;
pub mod keys;
pub mod objects;

pub use connect::{connect, StoreUrl};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    ObjectMeta, ObjectStore as Bucket, ObjectStoreExt, PutMode, PutPayload, UpdateVersion,
    WriteMultipart,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trove_proto::types::ByteStream;
use trove_proto::Error;

use crate::store::chunked;
use crate::store::record::{Body, ValueRecord};

/// Settings of the bucket engine.
#[derive(Debug, Clone)]
pub struct BucketOptions {
    /// Bodies up to this size live inside their record.
    pub inline_limit: usize,
    /// Size of the parts a large body is uploaded in (at least 5 MiB for S3).
    pub part_bytes: usize,
    /// Size of the chunks inline bodies are read back in.
    pub read_chunk_bytes: usize,
    /// How old a pending marker must be before [`BucketStore::reclaim`] acts
    /// on it: longer than any write can take, so a live write is never
    /// mistaken for an abandoned one.
    pub reclaim_grace: Duration,
    /// A local folder and a size in bytes for caching blob bodies; `None`
    /// reads every body from the store.
    pub blob_cache: Option<(std::path::PathBuf, u64)>,
}

impl Default for BucketOptions {
    fn default() -> Self {
        BucketOptions {
            inline_limit: 64 * 1024,
            part_bytes: 8 * 1024 * 1024,
            read_chunk_bytes: 1024 * 1024,
            reclaim_grace: Duration::from_secs(3600),
            blob_cache: None,
        }
    }
}

/// Every operation group on an object store; cheap to clone.
#[derive(Clone)]
pub struct BucketStore {
    inner: Arc<Inner>,
}

struct Inner {
    bucket: Arc<dyn Bucket>,
    root: String,
    options: BucketOptions,
    /// Writers of one record in this process take turns here instead of
    /// racing each other through the store: conditional writes that lose
    /// cost round trips, and some stores slow down under such contention.
    /// Writers in other processes still race, and the conditional write
    /// still decides.
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// The last version of some records this process wrote, so the next
    /// write can be a conditional write straight away instead of a read and
    /// a write. A stale entry only costs a failed conditional write.
    known: std::sync::Mutex<HashMap<String, (Bytes, UpdateVersion)>>,
    blob_cache: Option<blob_cache::BlobCache>,
}

const STRIPES: usize = 64;
/// Most records remembered in [`Inner::known`].
const KNOWN_RECORDS: usize = 4096;

impl std::fmt::Debug for BucketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BucketStore({} under {:?})",
            self.inner.bucket, self.inner.root
        )
    }
}

/// What [`BucketStore::reclaim`] found and removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reclaimed {
    /// Pending markers old enough to act on.
    pub markers: u64,
    /// Blobs deleted because no record owned them.
    pub blobs: u64,
}

/// Maps an object store failure to the caller's error: the store being
/// unreachable or failing is retryable, anything else is a bug here.
pub fn bucket_error(what: &str, err: &object_store::Error) -> Error {
    match err {
        object_store::Error::NotFound { .. } => Error::Internal {
            message: format!("{what}: object vanished: {err}"),
        },
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. } => {
            Error::Unavailable {
                message: format!("{what}: the object store failed: {err}"),
            }
        }
        _ => Error::Internal {
            message: format!("{what}: {err}"),
        },
    }
}

/// The result of a conditional write.
#[derive(Debug)]
pub enum Written {
    /// Stored; the new version.
    Done(UpdateVersion),
    /// Someone else wrote first; read again and retry.
    Conflict,
}

/// How a record is replaced.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Only if nothing is stored yet.
    Absent,
    /// Only if this version is still the stored one.
    Version(UpdateVersion),
}

/// A body drained from the caller: inline bytes or an uploaded blob, not yet
/// owned by any record. Dropping it unpublished deletes the blob.
pub struct StagedBody {
    /// Where the bytes are.
    pub body: Body,
    /// Length in bytes.
    pub len: u64,
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
    guard: Option<PendingBlob>,
}

impl StagedBody {
    /// Marks the blob as owned by a published record; the pending marker is
    /// removed in the background.
    pub fn published(mut self) {
        if let Some(mut guard) = self.guard.take() {
            guard.owned = true;
        }
    }

    /// Called before a write that publishes this body. From then on the
    /// outcome can be unknown (a timeout, a dropped call, a retried request
    /// that landed), so dropping the body no longer deletes the blob: its
    /// marker stays, and `reclaim` deletes the blob later only if no record
    /// owns it.
    pub fn sending(&mut self) {
        if let Some(guard) = self.guard.as_mut() {
            guard.maybe_owned = true;
        }
    }

    /// Whether `body` is this staged body's blob (a write that landed
    /// although its reply was lost or retried). Inline bodies have no
    /// identity and never match.
    pub fn is_blob(&self, body: &Body) -> bool {
        matches!((&self.body, body), (Body::Blob(a), Body::Blob(b)) if a == b)
    }
}

/// Deletes an unpublished blob and its marker when dropped, and a published
/// blob's marker (only the marker) once it is owned.
struct PendingBlob {
    store: BucketStore,
    id: u64,
    upload: Option<WriteMultipart>,
    owned: bool,
    maybe_owned: bool,
}

impl Drop for PendingBlob {
    fn drop(&mut self) {
        if self.maybe_owned && !self.owned {
            // Perhaps published: leave blob and marker to `reclaim`.
            return;
        }
        let (store, id, owned, upload) =
            (self.store.clone(), self.id, self.owned, self.upload.take());
        let cleanup = async move {
            if let Some(upload) = upload {
                let _ = upload.abort().await;
            }
            if !owned {
                let _ = store.inner.bucket.delete(&store.blob_path(id)).await;
            }
            let _ = store.inner.bucket.delete(&store.marker_path(id)).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(cleanup);
            }
            Err(_) => tracing::warn!(blob = id, "no runtime to clean up a blob; reclaim will"),
        }
    }
}

/// A pending marker: `blob` should end up owned by the record at `owner`,
/// or be deleted.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    owner: String,
    blob: u64,
}

impl BucketStore {
    /// Opens the engine on `bucket` under `root`, after checking that the
    /// store enforces conditional writes.
    pub async fn open(
        bucket: Arc<dyn Bucket>,
        root: &str,
        options: BucketOptions,
    ) -> Result<Self, Error> {
        let blob_cache = match &options.blob_cache {
            Some((dir, bytes)) if *bytes > 0 => Some(
                blob_cache::BlobCache::open(dir, *bytes).map_err(|e| Error::Internal {
                    message: format!("cannot use {} for the blob cache: {e}", dir.display()),
                })?,
            ),
            _ => None,
        };
        let store = BucketStore {
            inner: Arc::new(Inner {
                bucket,
                // The root as `object_store` spells paths (empty segments
                // dropped, awkward characters escaped), so that stripping
                // it from listed paths always works.
                root: Path::from(root).as_ref().to_owned(),
                options,
                stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
                known: std::sync::Mutex::new(HashMap::new()),
                blob_cache,
            }),
        };
        store.probe_conditional_writes().await?;
        Ok(store)
    }

    /// The engine's settings.
    pub fn options(&self) -> &BucketOptions {
        &self.inner.options
    }

    /// The object store underneath.
    pub fn bucket(&self) -> &Arc<dyn Bucket> {
        &self.inner.bucket
    }

    /// The full path of `relative` under the root.
    pub fn path(&self, relative: &str) -> Path {
        if self.inner.root.is_empty() {
            Path::from(relative)
        } else {
            Path::from(format!("{}/{relative}", self.inner.root))
        }
    }

    /// `path` relative to the root.
    fn relative<'a>(&self, path: &'a Path) -> &'a str {
        let full = path.as_ref();
        if self.inner.root.is_empty() {
            full
        } else {
            full.strip_prefix(self.inner.root.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    /// The relative directory of `group` (`a`, `o`, `c` or `k`) in `ns`.
    pub fn ns_dir(ns: &trove_proto::types::Namespace, group: char) -> String {
        format!("n/{}/{group}/", keys::segmented(&keys::encode(ns.as_str())))
    }

    fn blob_path(&self, id: u64) -> Path {
        self.path(&format!("blobs/{id:016x}"))
    }

    fn marker_path(&self, id: u64) -> Path {
        self.path(&format!("pending/{id:016x}"))
    }

    /// Refuses to run on a store that silently ignores conditional writes:
    /// atomic publishing depends on them.
    async fn probe_conditional_writes(&self) -> Result<(), Error> {
        let path = self.path("probe/conditional-put");
        let first = self
            .inner
            .bucket
            .put(&path, PutPayload::from_static(b"probe"))
            .await
            .map_err(|e| bucket_error("write the conditional-write probe", &e))?;
        let refuse = |what: &str| Error::FailedPrecondition {
            message: format!(
                "the object store at {} does not enforce {what}; Trove needs it to publish \
                 writes atomically and will not run on this store",
                self.inner.bucket
            ),
        };
        if first.e_tag.is_none() && first.version.is_none() {
            return Err(refuse("object versions (no ETag returned)"));
        }
        let stale = UpdateVersion {
            e_tag: Some("\"00000000000000000000000000000000\"".into()),
            version: None,
        };
        for (mode, what) in [
            (PutMode::Create, "create-if-absent (If-None-Match: *)"),
            (PutMode::Update(stale), "update-if-version (If-Match)"),
        ] {
            // Both writes must be refused: the key exists, the version is stale.
            match self
                .inner
                .bucket
                .put_opts(&path, PutPayload::from_static(b"again"), mode.into())
                .await
            {
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {}
                Ok(_)
                | Err(
                    object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. },
                ) => return Err(refuse(what)),
                Err(e) => return Err(bucket_error(&format!("probe {what}"), &e)),
            }
        }
        match self
            .inner
            .bucket
            .put_opts(
                &path,
                PutPayload::from_static(b"probe"),
                PutMode::Update(first.into()).into(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e @ object_store::Error::Precondition { .. }) => Err(Error::FailedPrecondition {
                message: format!(
                    "the object store at {} refused an update with the version it just returned \
                     ({e}); conditional writes do not work on it",
                    self.inner.bucket
                ),
            }),
            Err(e) => Err(bucket_error("probe update-if-version", &e)),
        }
    }

    /// The version of the record at `path` this process last wrote, if remembered.
    pub fn recall(&self, path: &Path) -> Option<(Bytes, UpdateVersion)> {
        let known = self.inner.known.lock().ok()?;
        known.get(path.as_ref()).cloned()
    }

    /// Remembers the version of the record at `path` just written.
    pub fn remember(&self, path: &Path, bytes: Bytes, version: UpdateVersion) {
        if let Ok(mut known) = self.inner.known.lock() {
            if known.len() >= KNOWN_RECORDS {
                known.clear();
            }
            known.insert(path.as_ref().to_owned(), (bytes, version));
        }
    }

    /// Forgets what was remembered of the record at `path`.
    pub fn forget(&self, path: &Path) {
        if let Ok(mut known) = self.inner.known.lock() {
            known.remove(path.as_ref());
        }
    }

    /// Takes this process's turn to rewrite the record at `path`.
    pub async fn turn(&self, path: &Path) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        path.as_ref().hash(&mut hasher);
        let stripe = usize::try_from(hasher.finish() % STRIPES as u64).unwrap_or(0);
        self.inner.stripes[stripe].lock().await
    }

    /// Reads a small object whole, with its version; `None` when missing.
    pub async fn read(&self, path: &Path) -> Result<Option<(Bytes, UpdateVersion)>, Error> {
        // A store that answers at once (in memory, or a local cache) never
        // returns Pending; counting each request against tokio's budget
        // keeps a busy reader from starving other tasks on its worker.
        tokio::task::consume_budget().await;
        let result = match self.inner.bucket.get(path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(bucket_error("read a record", &e)),
        };
        let version = UpdateVersion {
            e_tag: result.meta.e_tag.clone(),
            version: result.meta.version.clone(),
        };
        match result.bytes().await {
            Ok(bytes) => Ok(Some((bytes, version))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(bucket_error("read a record", &e)),
        }
    }

    /// Whether an object is stored at `path`, without reading it.
    pub async fn exists(&self, path: &Path) -> Result<bool, Error> {
        match self.inner.bucket.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(bucket_error("look up an object", &e)),
        }
    }

    /// Writes a small object if `expect` still holds.
    pub async fn write(
        &self,
        path: &Path,
        bytes: Vec<u8>,
        expect: &Expect,
    ) -> Result<Written, Error> {
        tokio::task::consume_budget().await;
        let mode = match expect {
            Expect::Absent => PutMode::Create,
            Expect::Version(version) => PutMode::Update(version.clone()),
        };
        match self
            .inner
            .bucket
            .put_opts(path, PutPayload::from(bytes), mode.into())
            .await
        {
            Ok(result) => Ok(Written::Done(result.into())),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotFound { .. },
            ) => Ok(Written::Conflict),
            Err(e) => Err(bucket_error("publish a record", &e)),
        }
    }

    /// Writes a small object unconditionally.
    pub async fn overwrite(&self, path: &Path, bytes: Vec<u8>) -> Result<(), Error> {
        self.inner
            .bucket
            .put(path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| bucket_error("write an object", &e))
    }

    /// Deletes an object; a missing one is fine.
    pub async fn remove(&self, path: &Path) -> Result<(), Error> {
        match self.inner.bucket.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(bucket_error("delete an object", &e)),
        }
    }

    /// Objects under the directory `dir` (relative, ending in `/`) whose
    /// path continues with `start`, strictly after `dir` + `after` when
    /// given, in byte order; yields the part of each path after `dir`.
    pub fn list(
        &self,
        dir: &str,
        start: &str,
        after: Option<&str>,
    ) -> BoxStream<'static, Result<(String, ObjectMeta), Error>> {
        let dir_path = self.path(dir.trim_end_matches('/'));
        let full_dir = format!("{}/", dir_path.as_ref());
        let wanted = format!("{full_dir}{start}");
        // Every stored path under `start` is longer than `start` itself, so
        // listing strictly after it skips straight to them.
        let offset = match after {
            Some(after) if after > start => Some(after),
            _ if !start.is_empty() => Some(start),
            _ => None,
        };
        let stream = match offset {
            Some(offset) => {
                let offset = Path::from(format!("{full_dir}{offset}"));
                self.inner.bucket.list_with_offset(Some(&dir_path), &offset)
            }
            None => self.inner.bucket.list(Some(&dir_path)),
        };
        stream
            .map_err(|e| bucket_error("list objects", &e))
            .try_take_while({
                let wanted = wanted.clone();
                move |meta| futures::future::ready(Ok(meta.location.as_ref().starts_with(&wanted)))
            })
            .map_ok(move |meta| {
                let rest = meta
                    .location
                    .as_ref()
                    .strip_prefix(&full_dir)
                    .unwrap_or_default()
                    .to_owned();
                (rest, meta)
            })
            .boxed()
    }

    /// Drains `data`, enforcing `expected_size`: small bodies stay in memory
    /// for inlining, larger ones are uploaded as a blob that `owner` (a
    /// record path, relative) is about to reference.
    pub async fn stage(
        &self,
        mut data: ByteStream,
        expected_size: Option<u64>,
        owner: &Path,
    ) -> Result<StagedBody, Error> {
        let options = &self.inner.options;
        let mut hasher = Sha256::new();
        let mut buffered = BytesMut::new();
        let mut guard: Option<PendingBlob> = None;
        let mut len = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            len += chunk.len() as u64;
            if let Some(expected) = expected_size {
                if len > expected {
                    return Err(Error::invalid(
                        "size",
                        format!("the header announced {expected} bytes but more were sent"),
                    ));
                }
            }
            hasher.update(&chunk);
            match guard.as_mut() {
                Some(pending) => {
                    let upload = pending
                        .upload
                        .as_mut()
                        .ok_or_else(|| Error::internal("blob upload already finished"))?;
                    upload
                        .wait_for_capacity(2)
                        .await
                        .map_err(|e| bucket_error("upload a blob part", &e))?;
                    upload.put(chunk);
                }
                None => {
                    buffered.extend_from_slice(&chunk);
                    if buffered.len() > options.inline_limit {
                        let mut pending = self.start_blob(owner).await?;
                        if let Some(upload) = pending.upload.as_mut() {
                            upload.put(std::mem::take(&mut buffered).freeze());
                        }
                        guard = Some(pending);
                    }
                }
            }
        }
        if let Some(expected) = expected_size {
            if len != expected {
                return Err(Error::invalid(
                    "size",
                    format!(
                        "the header announced {expected} bytes but the stream ended after {len}"
                    ),
                ));
            }
        }
        let sha256: [u8; 32] = hasher.finalize().into();
        let body = match guard.as_mut() {
            Some(pending) => {
                if let Some(upload) = pending.upload.take() {
                    upload
                        .finish()
                        .await
                        .map_err(|e| bucket_error("complete a blob upload", &e))?;
                }
                Body::Blob(pending.id)
            }
            None => Body::Inline(buffered.to_vec()),
        };
        Ok(StagedBody {
            body,
            len,
            sha256,
            guard,
        })
    }

    /// Writes the pending marker, then opens the blob's multipart upload.
    async fn start_blob(&self, owner: &Path) -> Result<PendingBlob, Error> {
        let id: u64 = rand::random();
        let marker = Marker {
            owner: self.relative(owner).to_owned(),
            blob: id,
        };
        let bytes = serde_json::to_vec(&marker).map_err(Error::internal)?;
        self.overwrite(&self.marker_path(id), bytes).await?;
        let mut pending = PendingBlob {
            store: self.clone(),
            id,
            upload: None,
            owned: false,
            maybe_owned: false,
        };
        let upload = self
            .inner
            .bucket
            .put_multipart(&self.blob_path(id))
            .await
            .map_err(|e| bucket_error("start a blob upload", &e))?;
        pending.upload = Some(WriteMultipart::new_with_chunk_size(
            upload,
            self.inner.options.part_bytes,
        ));
        Ok(pending)
    }

    /// Writes a marker saying `blob` may lose its owner at `owner`, before a
    /// write that replaces or removes it; returns the marker's id.
    pub async fn mark_retiring(&self, owner: &Path, blob: u64) -> Result<u64, Error> {
        let marker_id: u64 = rand::random();
        let marker = Marker {
            owner: self.relative(owner).to_owned(),
            blob,
        };
        let bytes = serde_json::to_vec(&marker).map_err(Error::internal)?;
        self.overwrite(&self.marker_path(marker_id), bytes).await?;
        Ok(marker_id)
    }

    /// Deletes blobs no record references any more, then their markers.
    pub async fn retire(&self, blobs: Vec<u64>, markers: Vec<u64>) {
        for id in blobs {
            if let Err(e) = self.remove(&self.blob_path(id)).await {
                tracing::warn!(blob = id, error = %e, "could not delete a retired blob; reclaim will");
                return;
            }
        }
        for id in markers {
            let _ = self.remove(&self.marker_path(id)).await;
        }
    }

    /// Opens a record's body for reading. A blob deleted in the meantime (a
    /// concurrent replace) is `Ok(None)`: read the record again.
    pub async fn open_body(&self, record: &ValueRecord) -> Result<Option<ByteStream>, Error> {
        match &record.body {
            Body::Inline(data) => {
                let pieces: Vec<Result<Bytes, Error>> = chunked(
                    Bytes::from(data.clone()),
                    self.inner.options.read_chunk_bytes,
                )
                .map(Ok)
                .collect();
                Ok(Some(futures::stream::iter(pieces).boxed()))
            }
            Body::Blob(id) => {
                if let Some(cache) = &self.inner.blob_cache {
                    if let Some(stream) = cache.get(*id).await {
                        return Ok(Some(stream));
                    }
                }
                self.open_blob(*id, record.body_len).await
            }
        }
    }

    /// Opens blob `id` (`len` bytes) in the store, keeping a local copy when
    /// a blob cache is configured. `Ok(None)` when the blob is gone.
    async fn open_blob(&self, id: u64, len: u64) -> Result<Option<ByteStream>, Error> {
        match self.inner.bucket.get(&self.blob_path(id)).await {
            Ok(result) => {
                let stream = result
                    .into_stream()
                    .map_err(|e| bucket_error("read a blob", &e))
                    .boxed();
                Ok(Some(match &self.inner.blob_cache {
                    Some(cache) => cache.fill(id, len, stream),
                    None => stream,
                }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(bucket_error("open a blob", &e)),
        }
    }

    /// Reads a whole body (inline or blob) into memory; for bodies known to
    /// be small. `Ok(None)` when the blob is gone.
    pub async fn read_body(&self, record: &ValueRecord) -> Result<Option<Vec<u8>>, Error> {
        match &record.body {
            Body::Inline(data) => Ok(Some(data.clone())),
            Body::Blob(id) => match self.read(&self.blob_path(*id)).await? {
                Some((bytes, _)) => Ok(Some(bytes.to_vec())),
                None => Ok(None),
            },
        }
    }

    /// Publishes `staged` as the record at `path`: `make` turns the current
    /// record (if any) and the new body into the record to store, or `None`
    /// to keep the current one. Retries when another writer got in first, so
    /// concurrent writers apply in some serial order. The blob of a replaced
    /// record is deleted after the replacement is published.
    pub async fn publish_value(
        &self,
        path: &Path,
        staged: StagedBody,
        make: impl Fn(Option<&ValueRecord>, &Body) -> Option<ValueRecord>,
    ) -> Result<ValueRecord, Error> {
        let _turn = self.turn(path).await;
        let mut staged = staged;
        let mut backoff = Backoff::new();
        loop {
            let current = self.read(path).await?;
            let (old, expect) = match &current {
                Some((bytes, version)) => (
                    Some(crate::store::record::decode(bytes)?),
                    Expect::Version(version.clone()),
                ),
                None => (None, Expect::Absent),
            };
            if let Some(old) = old.as_ref().filter(|o| staged.is_blob(&o.body)) {
                // An earlier attempt landed although it looked lost.
                let found = old.clone();
                staged.published();
                return Ok(found);
            }
            let Some(new) = make(old.as_ref(), &staged.body) else {
                // Keeping the current record: the staged blob is dropped.
                return old.ok_or_else(|| Error::internal("nothing to keep"));
            };
            // After an ambiguous failure the record read may already be
            // this very write: its blob is not being replaced.
            let retiring = old
                .as_ref()
                .and_then(ValueRecord::blob_id)
                .filter(|id| !staged.is_blob(&Body::Blob(*id)));
            let marker = match retiring {
                Some(blob) => Some(self.mark_retiring(path, blob).await?),
                None => None,
            };
            let bytes = crate::store::record::encode(&new)?;
            staged.sending();
            match self.write(path, bytes, &expect).await? {
                Written::Done(_) => {
                    staged.published();
                    self.retire(retiring.into_iter().collect(), marker.into_iter().collect())
                        .await;
                    return Ok(new);
                }
                Written::Conflict => {
                    self.retire(Vec::new(), marker.into_iter().collect()).await;
                    backoff.wait("publish a value").await?;
                }
            }
        }
    }

    /// Removes the record at `path` and its blob; returns whether it existed.
    pub async fn remove_value(&self, path: &Path) -> Result<bool, Error> {
        self.forget(path);
        let Some((bytes, _)) = self.read(path).await? else {
            return Ok(false);
        };
        let blobs = referenced_blobs(self.relative(path), &bytes)?;
        let mut markers = Vec::new();
        for blob in &blobs {
            markers.push(self.mark_retiring(path, *blob).await?);
        }
        self.remove(path).await?;
        self.retire(blobs, markers).await;
        Ok(true)
    }

    /// Opens the value at `path`; `NotFound` (of `kind`, `display`) when missing.
    pub async fn open_value(
        &self,
        path: &Path,
        kind: &str,
        display: &str,
    ) -> Result<(ValueRecord, ByteStream), Error> {
        // A concurrent replace can delete the blob between reading the
        // record and opening the blob; the record read again points at the
        // new one.
        for _ in 0..8 {
            let Some((bytes, _)) = self.read(path).await? else {
                return Err(Error::not_found(kind, display));
            };
            let record = crate::store::record::decode(&bytes)?;
            if let Some(stream) = self.open_body(&record).await? {
                return Ok((record, stream));
            }
        }
        Err(Error::Unavailable {
            message: format!("{kind} {display} kept changing while it was opened; retry"),
        })
    }

    /// The record at `path`, decoded; `None` when missing.
    pub async fn read_record(&self, path: &Path) -> Result<Option<ValueRecord>, Error> {
        match self.read(path).await? {
            Some((bytes, _)) => Ok(Some(crate::store::record::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Acts on pending markers older than the grace period: a blob its owner
    /// does not reference is deleted, then the marker. Safe to run from
    /// several servers at once and at any time.
    pub async fn reclaim(&self) -> Result<Reclaimed, Error> {
        let grace = chrono_duration(self.inner.options.reclaim_grace);
        let now = chrono::Utc::now();
        let mut report = Reclaimed::default();
        let markers: Vec<ObjectMeta> = self
            .list("pending/", "", None)
            .map_ok(|(_, meta)| meta)
            .try_collect()
            .await?;
        for meta in markers {
            if now - meta.last_modified < grace {
                continue;
            }
            report.markers += 1;
            // One bad marker or owner must not stop the others.
            match self.reclaim_one(&meta.location).await {
                Ok(deleted) => report.blobs += u64::from(deleted),
                Err(e) => {
                    tracing::warn!(marker = %meta.location, error = %e, "could not reclaim; will retry")
                }
            }
        }
        Ok(report)
    }

    /// Acts on one old marker; returns whether a blob was deleted.
    async fn reclaim_one(&self, location: &Path) -> Result<bool, Error> {
        let Some((bytes, _)) = self.read(location).await? else {
            return Ok(false);
        };
        let Ok(marker) = serde_json::from_slice::<Marker>(&bytes) else {
            tracing::warn!(marker = %location, "unreadable pending marker removed");
            self.remove(location).await?;
            return Ok(false);
        };
        let owner = self.path(&marker.owner);
        let owned = match self.read(&owner).await? {
            Some((record, _)) => referenced_blobs(&marker.owner, &record)?.contains(&marker.blob),
            None => false,
        };
        if !owned {
            self.remove(&self.blob_path(marker.blob)).await?;
        }
        self.remove(location).await?;
        Ok(!owned)
    }

    /// Runs [`BucketStore::reclaim`] now and then every `period`.
    pub fn spawn_reclaimer(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                match store.reclaim().await {
                    Ok(found) if found.markers > 0 => {
                        tracing::info!(
                            markers = found.markers,
                            blobs = found.blobs,
                            "reclaimed abandoned writes"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "reclaim failed; will retry"),
                }
                tokio::time::sleep(period).await;
            }
        })
    }

    /// Bytes stored under the root, everything included.
    pub async fn stored_bytes(&self) -> Result<u64, Error> {
        let root = (!self.inner.root.is_empty()).then(|| Path::from(self.inner.root.as_str()));
        self.inner
            .bucket
            .list(root.as_ref())
            .map_err(|e| bucket_error("list objects", &e))
            .try_fold(0u64, |n, meta| async move { Ok(n + meta.size) })
            .await
    }

    /// Counts pending markers and blobs (for tests and operators).
    pub async fn count_pending_and_blobs(&self) -> Result<(usize, usize), Error> {
        let pending = self
            .list("pending/", "", None)
            .try_fold(0usize, |n, _| async move { Ok(n + 1) })
            .await?;
        let blobs = self
            .list("blobs/", "", None)
            .try_fold(0usize, |n, _| async move { Ok(n + 1) })
            .await?;
        Ok((pending, blobs))
    }
}

/// Jittered, growing pauses between retries of a conditional write that
/// lost a race, with a bound on how long one call keeps trying.
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// A fresh sequence of pauses.
    pub fn new() -> Self {
        Backoff { attempt: 0 }
    }

    /// Waits before the next attempt; `Unavailable` once too many were lost.
    pub async fn wait(&mut self, what: &str) -> Result<(), Error> {
        const ATTEMPTS: u32 = 200;
        self.attempt += 1;
        if self.attempt >= ATTEMPTS {
            return Err(Error::Unavailable {
                message: format!(
                    "could not {what}: {ATTEMPTS} attempts lost to concurrent writers; retry"
                ),
            });
        }
        let ceiling = 1u64 << self.attempt.min(7);
        let micros = rand::random_range(0..ceiling * 500);
        tokio::time::sleep(Duration::from_micros(micros)).await;
        Ok(())
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

fn chrono_duration(duration: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(duration).unwrap_or(chrono::TimeDelta::MAX)
}

/// The blobs a stored record at `owner` (relative path) references.
fn referenced_blobs(owner: &str, bytes: &[u8]) -> Result<Vec<u64>, Error> {
    match owner.chars().last() {
        Some('h') => entries::head_blobs(bytes),
        Some('c') => cache::ref_record_blobs(bytes),
        _ => Ok(crate::store::record::decode(bytes)?
            .blob_id()
            .into_iter()
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use object_store::memory::InMemory;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, PutMultipartOptions,
        PutOptions, PutResult,
    };
    use trove_proto::types::{Name, Namespace};
    use trove_proto::ArtifactStore;

    /// An object store that takes every write as an overwrite, as some
    /// S3-compatible servers silently do with conditional headers.
    #[derive(Debug, Default)]
    struct IgnoresConditions(InMemory);

    impl std::fmt::Display for IgnoresConditions {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("IgnoresConditions")
        }
    }

    #[async_trait]
    impl Bucket for IgnoresConditions {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            _opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.0
                .put_opts(location, payload, PutOptions::default())
                .await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.0.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.0.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.0.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.0.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.0.copy_opts(from, to, options).await
        }
    }

    /// An object store whose next conditional write of a record lands but
    /// reports a precondition failure, as a request retried after a lost
    /// reply does.
    #[derive(Debug, Default)]
    struct LandsThenFails {
        inner: InMemory,
        armed: std::sync::atomic::AtomicBool,
    }

    impl std::fmt::Display for LandsThenFails {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("LandsThenFails")
        }
    }

    #[async_trait]
    impl Bucket for LandsThenFails {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            let conditional = !matches!(opts.mode, PutMode::Overwrite);
            let result = self.inner.put_opts(location, payload, opts).await?;
            let is_record = location.as_ref().starts_with("r/n/");
            if conditional
                && is_record
                && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(object_store::Error::Precondition {
                    path: location.to_string(),
                    source: "the retried request found the first one's write".into(),
                });
            }
            Ok(result)
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A write that landed although it was reported lost is recognised: a
    /// large value keeps its blob, an append is not applied twice.
    #[tokio::test]
    async fn writes_that_landed_unseen_are_not_lost_or_doubled() {
        use trove_proto::entries::{NewEntry, ReadOptions};
        use trove_proto::EntryStore;
        let bucket = Arc::new(LandsThenFails::default());
        let store = BucketStore::open(bucket.clone(), "r", BucketOptions::default())
            .await
            .expect("open");
        let ns = Namespace::default();
        let key = Name::new("key", "big").expect("name");
        let big = Bytes::from(vec![3u8; 300_000]);
        bucket
            .armed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        store
            .put_artifact(
                &ns,
                &key,
                Default::default(),
                futures::stream::iter([Ok(big.clone())]).boxed(),
            )
            .await
            .expect("put");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, stream) = store.get_artifact(&ns, &key).await.expect("get");
        let data: Vec<Bytes> = stream.try_collect().await.expect("read");
        assert_eq!(data.concat(), big.to_vec());
        assert_eq!(
            store.count_pending_and_blobs().await.expect("count"),
            (0, 1)
        );

        let cassette = Name::new("cassette", "c").expect("name");
        let entry = NewEntry::parse("e", Bytes::from_static(br#"{"n":1}"#), None).expect("entry");
        bucket
            .armed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        store
            .append_entries(&ns, &cassette, vec![entry], Default::default())
            .await
            .expect("append");
        let read: Vec<_> = store
            .read_entries(&ns, &cassette, ReadOptions::default())
            .await
            .expect("read")
            .try_collect()
            .await
            .expect("entries");
        assert_eq!(read.len(), 1, "the append landed once");
    }

    /// A store that ignores conditional writes is refused at start, with a
    /// message naming what is missing.
    #[tokio::test]
    async fn refuses_a_store_without_conditional_writes() {
        let store = Arc::new(IgnoresConditions::default());
        let err = BucketStore::open(store, "root", BucketOptions::default())
            .await
            .expect_err("must refuse");
        assert!(matches!(err, Error::FailedPrecondition { .. }), "{err:?}");
        assert!(err.to_string().contains("create-if-absent"), "{err}");
        let ok =
            BucketStore::open(Arc::new(InMemory::new()), "root", BucketOptions::default()).await;
        assert!(ok.is_ok(), "{ok:?}");
    }

    /// What an interrupted write left (a marker and a blob no record owns) is
    /// reclaimed once older than the grace period; owned blobs stay.
    #[tokio::test]
    async fn reclaim_deletes_only_abandoned_blobs() {
        let options = BucketOptions {
            reclaim_grace: Duration::ZERO,
            ..Default::default()
        };
        let store = BucketStore::open(Arc::new(InMemory::new()), "r", options)
            .await
            .expect("open");
        let ns = Namespace::default();
        let key = Name::new("key", "big").expect("name");
        let big = Bytes::from(vec![7u8; 200_000]);
        store
            .put_artifact(
                &ns,
                &key,
                Default::default(),
                futures::stream::iter([Ok(big.clone())]).boxed(),
            )
            .await
            .expect("put");
        // An upload that died after its blob was written, before publishing.
        let owner = store.path("n/x/a/abandoned!r");
        let mut pending = store.start_blob(&owner).await.expect("start");
        let id = pending.id;
        if let Some(upload) = pending.upload.take() {
            let mut upload = upload;
            upload.put(big.clone());
            upload.finish().await.expect("finish");
        }
        pending.owned = true; // as if the process died: nothing cleans up
        std::mem::forget(pending);
        let (markers_before, blobs_before) = store.count_pending_and_blobs().await.expect("count");
        assert_eq!((markers_before, blobs_before), (1, 2));
        let found = store.reclaim().await.expect("reclaim");
        assert_eq!(
            found,
            Reclaimed {
                markers: 1,
                blobs: 1
            }
        );
        assert_eq!(
            store.count_pending_and_blobs().await.expect("count"),
            (0, 1)
        );
        assert!(store
            .read(&store.blob_path(id))
            .await
            .expect("read")
            .is_none());
        let (_, stream) = store.get_artifact(&ns, &key).await.expect("still there");
        let data: Vec<Bytes> = stream.try_collect().await.expect("read");
        assert_eq!(data.concat(), big.to_vec());
    }
}
