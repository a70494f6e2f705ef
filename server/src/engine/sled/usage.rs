//! What the sled engine holds (the usage scan behind the store gauges and
//! the blob census tests use) and its [`Engine`] lifecycle: no background
//! work of its own beyond the flusher, and a last flush on shutdown.

use async_trait::async_trait;
use trove_proto::Error;

use super::{blocking, io_error, sled_error, SledStore};
use crate::engine::record;
use crate::engine::{Background, Engine, Usage};

/// Figures about what a store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Staged (uncommitted) upload files present right now.
    pub staged_files: u64,
    /// Published blob files.
    pub blob_files: u64,
    /// Blob files referenced by metadata.
    pub referenced_blobs: u64,
    /// Keys in every tree of the database together: zero for a store that
    /// holds nothing at all.
    pub keys: u64,
}

impl SledStore {
    /// Counts staged files and blobs, for tests and operators.
    pub fn stats(&self) -> Result<StoreStats, Error> {
        let staged = std::fs::read_dir(self.inner.blobs.staging_dir())
            .map_err(|e| io_error("read staging folder", &e))?
            .count();
        let published = self
            .inner
            .blobs
            .published_ids()
            .map_err(|e| io_error("read blob folders", &e))?;
        let mut keys = 0u64;
        for name in self.inner.db.tree_names() {
            // The log's applied marker is bookkeeping, not stored data.
            if name == super::wal::LOG_TREE.as_bytes() {
                continue;
            }
            let tree = self.inner.db.open_tree(name).map_err(sled_error)?;
            keys += tree.len() as u64;
        }
        // So is the usage counters' format marker (counters themselves are
        // removed with the last item they count).
        if self.inner.usage.ready()? {
            keys -= 1;
        }
        if self.inner.eviction.indexed()? {
            keys -= 1;
        }
        Ok(StoreStats {
            staged_files: staged as u64,
            blob_files: published.len() as u64,
            referenced_blobs: self.inner.blob_refs.len() as u64,
            keys,
        })
    }

    /// Scans the store for its [`Usage`]. Blocking.
    pub fn scan_usage(&self) -> Result<Usage, Error> {
        let mut usage = Usage::default();
        let mut logical_bytes = 0u64;
        for item in self.inner.objects.iter() {
            let (key, value) = item.map_err(sled_error)?;
            let record = record::decode(&value)?;
            logical_bytes += record.size;
            if key.last() == Some(&b's') {
                usage.streams += 1;
            } else {
                usage.objects += 1;
            }
        }
        for item in self.inner.artifacts.iter().values() {
            logical_bytes += record::decode(&item.map_err(sled_error)?)?.size;
            usage.artifacts += 1;
        }
        let (cassettes, entries, entry_bytes) = self.inner.entry_trees.usage()?;
        usage.cassettes = cassettes;
        usage.entries = Some(entries);
        logical_bytes += entry_bytes;
        let (archives, archive_bytes) = self.inner.cache.usage()?;
        usage.cache_archives = archives;
        logical_bytes += archive_bytes;
        let blob_bytes: u64 = self
            .inner
            .blobs
            .published_ids()
            .map_err(|e| io_error("read blob folders", &e))?
            .into_iter()
            .filter_map(|id| std::fs::metadata(self.inner.blobs.blob_path(id)).ok())
            .map(|m| m.len())
            .sum();
        // Uploads in progress take disk too: a full disk is as full with
        // staged bytes as with published ones.
        let staged_bytes: u64 = std::fs::read_dir(self.inner.blobs.staging_dir())
            .map_err(|e| io_error("read staging folder", &e))?
            .filter_map(|entry| entry.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        usage.disk_bytes = self.inner.db.size_on_disk().map_err(sled_error)?
            + self.inner.packs.disk_bytes()
            + blob_bytes
            + staged_bytes;
        usage.logical_bytes = Some(logical_bytes);
        Ok(usage)
    }
}

#[async_trait]
impl Engine for SledStore {
    fn describe(&self) -> String {
        format!("sled in {}", self.root().display())
    }

    async fn put_object_copy(
        &self,
        ns: &trove_proto::types::Namespace,
        hash: &trove_proto::types::Name,
        expected_size: Option<u64>,
        data: trove_proto::types::ByteStream,
        created_at: Box<dyn FnOnce() -> i64 + Send>,
    ) -> Result<trove_proto::objects::ObjectInfo, Error> {
        self.put_object_as_of(ns, hash, expected_size, data, Some(created_at))
            .await
    }

    fn start_background(&self) -> Background {
        // Group commit and blob retiring run inside the store itself.
        Background::default()
    }

    async fn usage(&self) -> Result<Usage, Error> {
        let store = self.clone();
        blocking(move || store.scan_usage()).await
    }

    async fn flush(&self) -> Result<(), Error> {
        SledStore::flush(self).await
    }

    fn write_refusal(&self) -> Option<String> {
        self.inner
            .write_refusal
            .get()
            .cloned()
            .or_else(|| self.inner.wal.refusal())
    }
}

impl super::cache::CacheTrees {
    /// Archives and their bytes. Blocking.
    pub(super) fn usage(&self) -> Result<(u64, u64), Error> {
        let (mut archives, mut bytes) = (0u64, 0u64);
        for value in self.refs.iter().values() {
            bytes += record::decode(&value.map_err(sled_error)?)?.size;
            archives += 1;
        }
        Ok((archives, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of uploads still in progress count in the disk usage.
    #[test]
    fn staged_uploads_count_on_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            SledStore::open(dir.path(), super::super::StoreOptions::default()).expect("open");
        let before = store.scan_usage().expect("scan").disk_bytes;
        let staged = store.inner.blobs.staging_dir().join("upload-in-progress");
        std::fs::write(&staged, vec![0u8; 3 << 20]).expect("stage");
        let after = store.scan_usage().expect("scan").disk_bytes;
        assert!(
            after >= before + (3 << 20),
            "{before} -> {after}: staged bytes are missing"
        );
    }
}
