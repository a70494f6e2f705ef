//! Large values live outside sled, one file per value, so that sled never
//! holds (or rewrites) megabytes of payload and no value is ever held whole in
//! memory.
//!
//! Life of a blob: bytes are written to `staging/<id>.tmp` (small values stay
//! in memory and are stored inline in sled instead); on a clean end the file
//! is fsynced and hard-linked to `blobs/<shard>/<id>` (a link never replaces
//! an existing file, unlike a rename), its staging name removed and the
//! directory fsynced;
//! only then is the metadata that references it committed in sled. A blob that
//! is no longer referenced is unlinked after the metadata change is durable.
//! Every step is guarded: dropping a writer or an uncommitted published blob
//! removes its file, and [`BlobDir::reclaim`] sweeps what a crash left behind.
//!
//! This module never opens sled trees; the store passes it the set of
//! referenced ids.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// The folders holding blob files and staged uploads.
#[derive(Debug, Clone)]
pub struct BlobDir {
    blobs: PathBuf,
    staging: PathBuf,
    /// Per shard (`id & 0xFF`): its folder's entry in `blobs/` is known to
    /// be durable (it existed when `blobs/` was synced at open, or a
    /// publish synced `blobs/` after creating or finding it since).
    durable_shards: Arc<[AtomicBool; 256]>,
}

impl BlobDir {
    /// Creates (if needed) `blobs/` and `staging/` under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        let dir = BlobDir {
            blobs: root.join("blobs"),
            staging: root.join("staging"),
            durable_shards: Arc::new(std::array::from_fn(|_| AtomicBool::new(false))),
        };
        std::fs::create_dir_all(&dir.blobs)?;
        std::fs::create_dir_all(&dir.staging)?;
        // Shards are created by the first publish into them (see
        // `link_into_shard`): 256 empty folders would take 1 MiB of disk.
        for path in [&dir.blobs, &dir.staging, root] {
            std::fs::File::open(path)?.sync_all()?;
        }
        // Synced just above: every shard that exists now is durable.
        for entry in std::fs::read_dir(&dir.blobs)? {
            let shard = entry?.file_name();
            if let Some(index) = shard
                .to_str()
                .and_then(|n| usize::from_str_radix(n, 16).ok())
            {
                if let Some(flag) = dir.durable_shards.get(index) {
                    flag.store(true, Ordering::Release);
                }
            }
        }
        if let Some(parent) = root.parent() {
            // Best effort: the data folder itself may be new.
            if let Ok(parent) = std::fs::File::open(parent) {
                let _ = parent.sync_all();
            }
        }
        Ok(dir)
    }

    /// Path of the published blob `id`.
    pub fn blob_path(&self, id: u64) -> PathBuf {
        self.blobs
            .join(format!("{:02x}", id & 0xFF))
            .join(format!("{id:016x}"))
    }

    fn staging_path(&self, id: u64) -> PathBuf {
        self.staging.join(format!("{id:016x}.tmp"))
    }

    /// The staging folder (tests check that aborted uploads leave it empty).
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// Deletes every staged file and every blob whose id `is_referenced`
    /// rejects. Runs once at start, before any request is served. Returns the
    /// number of files removed and their total size.
    pub fn reclaim(&self, is_referenced: impl Fn(u64) -> bool) -> io::Result<(u64, u64)> {
        let mut removed = (0u64, 0u64);
        let mut remove = |path: &Path| -> io::Result<()> {
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(path)?;
            removed.0 += 1;
            removed.1 += len;
            Ok(())
        };
        for entry in std::fs::read_dir(&self.staging)? {
            remove(&entry?.path())?;
        }
        for shard in std::fs::read_dir(&self.blobs)? {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&shard)? {
                let path = entry?.path();
                let id = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| u64::from_str_radix(n, 16).ok());
                match id {
                    Some(id) if is_referenced(id) => {}
                    _ => remove(&path)?,
                }
            }
        }
        Ok(removed)
    }

    /// Ids of every published blob file (for consistency checks).
    pub fn published_ids(&self) -> io::Result<HashSet<u64>> {
        let mut ids = HashSet::new();
        for shard in std::fs::read_dir(&self.blobs)? {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&shard)? {
                if let Some(id) = entry?
                    .file_name()
                    .to_str()
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
                {
                    ids.insert(id);
                }
            }
        }
        Ok(ids)
    }

    /// Unlinks blob `id`; a missing file is not an error.
    pub fn remove(&self, id: u64) {
        let path = self.blob_path(id);
        if let Err(err) = std::fs::remove_file(&path) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::warn!(blob = id, error = %err, "could not remove retired blob; it will be reclaimed at next start");
            }
        }
    }
}

/// Hard-links `from` to `to`, first creating `to`'s shard folder if it is
/// missing. Unless `shard_durable` says so already, `blobs/` is then
/// synced, so that the link never depends on a folder entry that is not
/// durable: a shard another publish created a moment ago may not be synced
/// yet, and a sync that failed leaves the flag down for the next publish.
fn link_into_shard(from: &Path, to: &Path, shard_durable: &AtomicBool) -> io::Result<()> {
    let shard = to
        .parent()
        .ok_or_else(|| io::Error::other("a blob path has no shard"))?;
    match std::fs::hard_link(from, to) {
        Err(err) if err.kind() == io::ErrorKind::NotFound && from.exists() => {
            match std::fs::create_dir(shard) {
                Err(err) if err.kind() != io::ErrorKind::AlreadyExists => return Err(err),
                _ => {}
            }
            std::fs::hard_link(from, to)?;
        }
        other => other?,
    }
    if !shard_durable.load(Ordering::Acquire) {
        let blobs = shard
            .parent()
            .ok_or_else(|| io::Error::other("a shard has no parent"))?;
        std::fs::File::open(blobs)?.sync_all()?;
        shard_durable.store(true, Ordering::Release);
    }
    Ok(())
}

/// Removes a file when dropped, unless disarmed.
#[derive(Debug)]
struct FileGuard {
    path: Option<PathBuf>,
}

impl FileGuard {
    fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where an upload's SHA-256 is computed.
enum Hashing {
    /// On the calling task.
    Here(Sha256),
    /// On a thread of the blocking pool, one chunk behind: a chunk is
    /// hashed while the calling task writes it and receives the next.
    /// A job per chunk, not a thread per upload, so that idle uploads hold
    /// no thread of the pool that file writes need too.
    Behind(tokio::task::JoinHandle<Sha256>),
    /// A job failed or an update was cancelled part way: no digest can be
    /// trusted any more.
    Lost,
}

impl Hashing {
    /// Adds `data`: on the calling task while `here`, else on the pool.
    async fn update(&mut self, data: bytes::Bytes, here: bool) -> io::Result<()> {
        // Left in place if this update fails or is cancelled part way.
        let mut hasher = match std::mem::replace(self, Hashing::Lost) {
            Hashing::Here(hasher) => hasher,
            Hashing::Behind(job) => job.await.map_err(hashing_failed)?,
            Hashing::Lost => return Err(lost()),
        };
        *self = if here {
            hasher.update(&data);
            Hashing::Here(hasher)
        } else {
            Hashing::Behind(tokio::task::spawn_blocking(move || {
                hasher.update(&data);
                hasher
            }))
        };
        Ok(())
    }

    async fn finish(self) -> io::Result<[u8; 32]> {
        let hasher = match self {
            Hashing::Here(hasher) => hasher,
            Hashing::Behind(job) => job.await.map_err(hashing_failed)?,
            Hashing::Lost => return Err(lost()),
        };
        Ok(hasher.finalize().into())
    }
}

fn lost() -> io::Error {
    io::Error::other("an earlier chunk of the upload was not hashed")
}

fn hashing_failed(err: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("hashing the upload failed: {err}"))
}

/// Accumulates an upload's bytes: in memory up to the inline limit, then in a
/// staging file. Computes the SHA-256 and length as it goes (on another
/// thread once the body spilled to a file). Dropping it before
/// [`BodyWriter::finish`] discards everything.
pub struct BodyWriter {
    dir: BlobDir,
    id: u64,
    inline_limit: usize,
    buffer: Vec<u8>,
    file: Option<(tokio::io::BufWriter<tokio::fs::File>, FileGuard)>,
    hashing: Hashing,
    len: u64,
}

impl BodyWriter {
    /// A writer that will stage to `staging/<id>.tmp` if the value outgrows `inline_limit`.
    pub fn new(dir: &BlobDir, id: u64, inline_limit: usize) -> Self {
        BodyWriter {
            dir: dir.clone(),
            id,
            inline_limit,
            buffer: Vec::new(),
            file: None,
            hashing: Hashing::Here(Sha256::new()),
            len: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.len
    }

    /// Appends bytes.
    pub async fn write(&mut self, data: bytes::Bytes) -> io::Result<()> {
        // Small bodies hash here: a hand-off costs more than it saves.
        let here = self.file.is_none() && self.buffer.len() + data.len() <= self.inline_limit;
        self.hashing.update(data.clone(), here).await?;
        self.len += data.len() as u64;
        if let Some((file, _)) = self.file.as_mut() {
            return file.write_all(&data).await;
        }
        if self.buffer.len() + data.len() <= self.inline_limit {
            self.buffer.extend_from_slice(&data);
            return Ok(());
        }
        let path = self.dir.staging_path(self.id);
        let guard = FileGuard {
            path: Some(path.clone()),
        };
        // Created synchronously (one quick syscall): an async open that is
        // still running when a cancelled upload drops this writer would
        // create the file after the guard already removed it.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let file = tokio::fs::File::from_std(file);
        let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
        file.write_all(&self.buffer).await?;
        file.write_all(&data).await?;
        self.buffer = Vec::new();
        self.file = Some((file, guard));
        Ok(())
    }

    /// Ends the upload: a spilled value is flushed and fsynced (not yet published).
    pub async fn finish(self) -> io::Result<StagedBody> {
        let sha256 = self.hashing.finish().await?;
        let content = match self.file {
            None => StagedContent::Inline(self.buffer),
            Some((mut file, guard)) => {
                file.flush().await?;
                let file = file.into_inner();
                file.sync_all().await?;
                drop(file);
                StagedContent::File {
                    dir: self.dir,
                    id: self.id,
                    guard,
                }
            }
        };
        Ok(StagedBody {
            sha256,
            len: self.len,
            content,
        })
    }
}

enum StagedContent {
    Inline(Vec<u8>),
    File {
        dir: BlobDir,
        id: u64,
        guard: FileGuard,
    },
}

/// A complete, durable upload not yet visible to anyone.
pub struct StagedBody {
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
    /// Number of bytes.
    pub len: u64,
    content: StagedContent,
}

/// Where a committed value's bytes live.
#[derive(Debug)]
pub enum Published {
    /// Small value, to be stored inside the metadata record.
    Inline(Vec<u8>),
    /// Blob file `id`, removed on drop unless [`PublishedBlob::keep`] is called.
    Blob(PublishedBlob),
}

/// A blob file already in place but not yet referenced by committed metadata.
#[derive(Debug)]
pub struct PublishedBlob {
    /// The blob id.
    pub id: u64,
    guard: FileGuard,
}

impl PublishedBlob {
    /// Call once the metadata referencing the blob has committed.
    pub fn keep(mut self) {
        self.guard.disarm();
    }
}

impl StagedBody {
    /// Moves a staged file into `blobs/` (rename, then fsync the directory) so
    /// that it can be referenced by a metadata commit.
    pub async fn publish(self) -> io::Result<Published> {
        match self.content {
            StagedContent::Inline(bytes) => Ok(Published::Inline(bytes)),
            StagedContent::File { dir, id, mut guard } => {
                let from = dir.staging_path(id);
                let to = dir.blob_path(id);
                let durable_shards = Arc::clone(&dir.durable_shards);
                let published = tokio::task::spawn_blocking(move || -> io::Result<PathBuf> {
                    let parent = to.parent().map(Path::to_path_buf).unwrap_or_default();
                    // A link, unlike a rename, never replaces: a published
                    // blob (which a record may reference) is never
                    // overwritten, whatever the id generator did.
                    link_into_shard(&from, &to, &durable_shards[(id & 0xFF) as usize]).map_err(
                        |err| {
                            if err.kind() == io::ErrorKind::AlreadyExists {
                                io::Error::other(format!(
                                    "blob {id:016x} is already published; refusing to replace it"
                                ))
                            } else {
                                err
                            }
                        },
                    )?;
                    std::fs::remove_file(&from)?;
                    std::fs::File::open(&parent)?.sync_all()?;
                    Ok(to)
                })
                .await
                .map_err(io::Error::other)??;
                guard.disarm();
                Ok(Published::Blob(PublishedBlob {
                    id,
                    guard: FileGuard {
                        path: Some(published),
                    },
                }))
            }
        }
    }
}

impl super::SledStore {
    /// Drains `data` into a new body for `key` of `tree` in a namespace,
    /// enforcing `expected_size` and the capacity limits as bytes arrive.
    pub(super) async fn stage(
        &self,
        (ns, tree, key): (&trove_proto::types::Namespace, &sled::Tree, &[u8]),
        mut data: trove_proto::types::ByteStream,
        expected_size: Option<u64>,
    ) -> Result<StagedBody, trove_proto::Error> {
        let declared = crate::engine::values::DeclaredSize::new(expected_size);
        let mut room = self.room(ns, tree, key)?;
        // One wait for the whole upload, however many of its chunks meet
        // the ceiling.
        let waits_until = tokio::time::Instant::now() + self.inner.options.eviction_wait;
        if let Some(size) = expected_size {
            room = self
                .room_for((ns, tree, key), room, size, waits_until)
                .await?;
        }
        let mut writer = BodyWriter::new(
            &self.inner.blobs,
            self.next_id()?,
            self.inner.options.inline_limit,
        );
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            // A long upload keeps the store busy for eviction's pacing.
            self.inner.eviction.note_call();
            writer
                .write(chunk)
                .await
                .map_err(|e| super::io_error("stage upload", &e))?;
            if !room.unlimited() && room.refuse(writer.written()).is_some() {
                room = self
                    .room_for((ns, tree, key), room, writer.written(), waits_until)
                    .await?;
            }
            // The injected failure comes once the body has spilled into its
            // staging file, so the cleanup of a real failure is exercised.
            let spilled = writer.written() > self.inner.options.inline_limit as u64;
            if let Some(err) = self
                .inner
                .options
                .faults
                .as_ref()
                .and_then(|f| f.blob_write_error())
            {
                if spilled {
                    return Err(super::io_error("stage upload", &err));
                }
            }
            declared.check_progress(writer.written())?;
        }
        declared.check_end(writer.written())?;
        writer
            .finish()
            .await
            .map_err(|e| super::io_error("stage upload", &e))
    }

    /// `room` if `bytes` fit it; otherwise, when only eviction running
    /// behind stands in the way, waits for it to make room (until
    /// `deadline`): a write to an evicting namespace is slowed, not
    /// refused, while eviction can free what it needs. Else the refusal.
    /// (The exact check at commit cannot wait: uploads released together
    /// may still meet at the ceiling there and be refused.)
    async fn room_for(
        &self,
        (ns, tree, key): (&trove_proto::types::Namespace, &sled::Tree, &[u8]),
        mut room: super::accounting::Room,
        bytes: u64,
        deadline: tokio::time::Instant,
    ) -> Result<super::accounting::Room, trove_proto::Error> {
        let mut woke = false;
        let mut waiting = None;
        loop {
            let Some(refused) = room.refuse(bytes) else {
                return Ok(room);
            };
            let evicting = self
                .inner
                .eviction
                .running
                .load(std::sync::atomic::Ordering::Acquire);
            if !evicting
                || !room.waits_for_eviction(bytes)
                || tokio::time::Instant::now() >= deadline
            {
                return Err(refused);
            }
            // One wake-up is enough: the thread runs passes until the
            // namespace is under its quota.
            if !woke {
                self.inner.eviction.wake();
                woke = true;
            }
            // Eviction runs at full speed while any write waits.
            waiting.get_or_insert_with(|| self.inner.eviction.waiting_write());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            room = self.room(ns, tree, key)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publishing never replaces a blob already published under the same id.
    /// The shard it goes to is created by the first publish.
    #[tokio::test]
    async fn publishing_never_overwrites() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = BlobDir::open(root.path()).expect("open");
        let shards = || {
            std::fs::read_dir(root.path().join("blobs"))
                .expect("blobs")
                .count()
        };
        assert_eq!(shards(), 0, "no shard before the first publish");
        let stage = |fill: u8| {
            let dir = &dir;
            async move {
                let mut writer = BodyWriter::new(dir, 7, 0);
                writer
                    .write(bytes::Bytes::from(vec![fill; 4096]))
                    .await
                    .expect("write");
                writer.finish().await.expect("finish")
            }
        };
        match stage(1).await.publish().await.expect("first publish") {
            Published::Blob(blob) => blob.keep(),
            Published::Inline(_) => panic!("a 4 KiB body over a 0-byte inline limit is a blob"),
        }
        assert_eq!(shards(), 1, "the first publish made its shard");
        assert!(
            dir.durable_shards[7].load(Ordering::Acquire),
            "and synced the folder holding it"
        );
        let reopened = BlobDir::open(root.path()).expect("reopen");
        assert!(reopened.durable_shards[7].load(Ordering::Acquire));
        assert!(!reopened.durable_shards[8].load(Ordering::Acquire));
        let second = stage(2).await.publish().await;
        assert!(second.is_err(), "a second publish under id 7 must fail");
        let kept = std::fs::read(dir.blob_path(7)).expect("read");
        assert_eq!(kept, vec![1u8; 4096], "the first blob is untouched");
    }
}
