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
//! # Layout
//! - this file: options, the store handle, opening, error mapping.
//! - `layout`: the key encoding and every path builder.
//! - `records`: conditional record I/O and the backoff between lost races.
//! - `staging`: staging bodies (inline or a blob under a pending marker) and
//!   retiring replaced blobs.
//! - `bodies`: opening, reading, publishing and removing values.
//! - `formats`: the cassette head and cache ref record formats.
//! - `reclaim`: reclaiming abandoned writes, the census, the engine lifecycle.
//! - `probe`: the start-up check that conditional writes are enforced.
//! - `blob_cache`: the optional local cache of blob bodies.
//! - `objects`, `artifacts`, `entries`, `cache`: the trait implementations.
//!
//! Never imports tonic, nor the sled engine.

mod artifacts;
mod blob_cache;
mod bodies;
mod cache;
mod compaction;
mod connect;
mod entries;
mod formats;
mod layout;
mod names;
mod objects;
mod probe;
mod reclaim;
mod records;
mod runs;
mod staging;

pub use connect::{connect, StoreUrl};
pub use reclaim::Reclaimed;
pub use records::{Backoff, Expect, Written};
pub use staging::StagedBody;

use reclaim::referenced_blobs;
use staging::Marker;

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

use crate::engine::chunks::chunked;
use crate::engine::record::{Body, ValueRecord};

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
    known: std::sync::Mutex<KnownRecords>,
    blob_cache: Option<blob_cache::BlobCache>,
    /// Cassette heads being compacted in the background, so an append does
    /// not start a second compaction of the same head.
    compacting: std::sync::Mutex<std::collections::HashSet<String>>,
}

const STRIPES: usize = 64;
/// Most records remembered in [`Inner::known`].
const KNOWN_RECORDS: usize = 4096;
/// Most bytes of records remembered in [`Inner::known`].
const KNOWN_BYTES: usize = 32 * 1024 * 1024;

/// The records this process wrote last, with their versions, so a writer
/// that is the only one can skip reading before its next conditional write.
#[derive(Debug, Default)]
struct KnownRecords {
    records: HashMap<String, (Bytes, UpdateVersion)>,
    /// Bytes held: records and their keys.
    bytes: usize,
}

impl KnownRecords {
    fn forget(&mut self, path: &str) {
        if let Some((bytes, _)) = self.records.remove(path) {
            self.bytes = self.bytes.saturating_sub(bytes.len() + path.len());
        }
    }
}

impl std::fmt::Debug for BucketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BucketStore({} under {:?})",
            self.inner.bucket, self.inner.root
        )
    }
}

/// Maps an object store failure to the caller's error: the store being
/// unreachable or failing is retryable, anything else is a bug here. The
/// store's own words (its URL, bucket, keys, raw response) stay in the
/// server's log under an incident id; the caller gets the id and what to do.
pub fn bucket_error(what: &str, err: &object_store::Error) -> Error {
    let incident = crate::engine::incident(what, err);
    match err {
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. } => {
            Error::Unavailable {
                message: format!(
                    "could not {what}: the object store failed (incident {incident}); retry \
                     with backoff, and give the incident id to the operator if it persists"
                ),
            }
        }
        _ => Error::Internal {
            message: format!(
                "could not {what}: unexpected object store answer (incident {incident}); give \
                 the incident id to the operator"
            ),
        },
    }
}

impl BucketStore {
    /// Opens the engine on `bucket` under `root`, after checking that the
    /// store enforces conditional writes.
    pub async fn open(
        bucket: Arc<dyn Bucket>,
        root: &str,
        options: BucketOptions,
    ) -> Result<Self, Error> {
        if root.len() > layout::MAX_ROOT_BYTES {
            return Err(Error::invalid(
                "store",
                format!(
                    "the prefix inside the bucket is {} bytes long; at most {} leaves every name \
                     room in the store's {}-byte keys. Use a shorter prefix",
                    root.len(),
                    layout::MAX_ROOT_BYTES,
                    layout::MAX_KEY_BYTES
                ),
            ));
        }
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
                known: std::sync::Mutex::new(KnownRecords::default()),
                compacting: std::sync::Mutex::new(std::collections::HashSet::new()),
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
}

#[cfg(test)]
mod tests;
