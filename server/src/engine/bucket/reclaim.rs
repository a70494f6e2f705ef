//! Reclaiming what interrupted writes left: pending markers older than the
//! grace period, and their blobs when no record owns them; the periodic
//! reclaimer, and the size and census of the bucket for gauges and tests.

use super::*;
use crate::engine::{Background, Engine, Usage};

/// How often abandoned writes are looked for.
pub const RECLAIM_PERIOD: Duration = Duration::from_secs(600);

/// What [`BucketStore::reclaim`] found and removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reclaimed {
    /// Pending markers old enough to act on.
    pub markers: u64,
    /// Blobs deleted because no record owned them.
    pub blobs: u64,
}

impl BucketStore {
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
    pub(crate) async fn reclaim_one(&self, location: &Path) -> Result<bool, Error> {
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

    /// What the bucket holds: records counted by the kind letter that ends
    /// their key, and every byte under the root (what the store bills).
    /// Entries and logical bytes would take reading every record: unknown.
    pub async fn census(&self) -> Result<Usage, Error> {
        let root = (!self.inner.root.is_empty()).then(|| Path::from(self.inner.root.as_str()));
        let mut listing = self.inner.bucket.list(root.as_ref());
        let mut usage = Usage::default();
        while let Some(meta) = listing
            .try_next()
            .await
            .map_err(|e| bucket_error("list objects", &e))?
        {
            usage.disk_bytes += meta.size;
            let relative = self.relative(&meta.location);
            if !relative.starts_with("n/") {
                continue;
            }
            let counter = match relative.rsplit_once(layout::TERMINATOR) {
                Some((_, "d")) => &mut usage.objects,
                Some((_, "s")) => &mut usage.streams,
                Some((_, "r")) => &mut usage.artifacts,
                Some((_, "h")) => &mut usage.cassettes,
                Some((_, "c")) => &mut usage.cache_archives,
                _ => continue,
            };
            *counter += 1;
        }
        Ok(usage)
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

pub(crate) fn chrono_duration(duration: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(duration).unwrap_or(chrono::TimeDelta::MAX)
}

/// The blobs a stored record at `owner` (relative path) references.
pub(crate) fn referenced_blobs(owner: &str, bytes: &[u8]) -> Result<Vec<u64>, Error> {
    match super::layout::kind_of(owner) {
        Some('h') => formats::head_blobs(bytes),
        Some('c') => formats::ref_record_blobs(bytes),
        _ => Ok(crate::engine::record::decode(bytes)?
            .blob_id()
            .into_iter()
            .collect()),
    }
}

/// The bucket engine keeps no counters: a bucket reports its own size, and
/// counting here would mean listing the whole bucket on every call.
#[async_trait::async_trait]
impl trove_proto::UsageStore for BucketStore {
    async fn namespace_usage(
        &self,
        _namespace: Option<&trove_proto::types::Namespace>,
    ) -> Result<Vec<trove_proto::admin::UsageRow>, Error> {
        Err(Error::FailedPrecondition {
            message: "the object-storage engine does not count usage per namespace; read the \
                      bucket's own size metrics (or run Trove on its embedded engine for exact \
                      per-namespace figures)"
                .into(),
        })
    }
}

#[async_trait::async_trait]
impl Engine for BucketStore {
    fn describe(&self) -> String {
        format!("{self:?}")
    }

    /// Reclaims at once and then every [`RECLAIM_PERIOD`].
    fn start_background(&self) -> Background {
        let mut background = Background::default();
        let store = self.clone();
        background.spawn(|stop| async move {
            loop {
                match store.reclaim().await {
                    Ok(found) if found.markers > 0 => tracing::info!(
                        markers = found.markers,
                        blobs = found.blobs,
                        "reclaimed abandoned writes"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "reclaim failed; will retry"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RECLAIM_PERIOD) => {}
                }
            }
        });
        background
    }

    async fn usage(&self) -> Result<Usage, Error> {
        self.census().await
    }

    /// Writes are durable in the store when acknowledged: nothing to flush.
    async fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}
