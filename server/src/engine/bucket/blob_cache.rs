//! A bounded cache of blob bodies on local disk.
//!
//! Blobs never change once written (a replaced value gets a new blob id), so
//! a cached copy is always the blob's content, whatever other servers do.
//! Records are still read from the store on every call: the cache only
//! saves moving the body, and never changes what a caller sees.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use trove_proto::types::ByteStream;
use trove_proto::Error;

/// Blobs larger than this share of the capacity are never cached.
const LARGEST_SHARE: u64 = 4;

/// Bodies kept on local disk, least recently used evicted first.
#[derive(Clone)]
pub struct BlobCache {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Blob id -> (size, last use).
    entries: HashMap<u64, (u64, u64)>,
    total: u64,
    clock: u64,
}

impl BlobCache {
    /// A cache of at most `capacity` bytes in `dir`, emptied first (what a
    /// previous process left is not trusted).
    pub fn open(dir: &Path, capacity: u64) -> std::io::Result<Self> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)?;
        Ok(BlobCache {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                capacity,
                state: Mutex::new(State::default()),
            }),
        })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.inner.dir.join(format!("{id:016x}"))
    }

    /// The cached body of blob `id`, if present.
    pub async fn get(&self, id: u64) -> Option<ByteStream> {
        {
            let mut state = self.inner.state.lock().ok()?;
            state.clock += 1;
            let now = state.clock;
            let entry = state.entries.get_mut(&id)?;
            entry.1 = now;
        }
        // Eviction may unlink the file meanwhile: a miss, not an error.
        let file = tokio::fs::File::open(self.path(id)).await.ok()?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1024 * 1024)
            .map(|chunk| {
                chunk.map_err(|e| Error::Unavailable {
                    message: format!("read a cached blob: {e}"),
                })
            })
            .boxed();
        Some(stream)
    }

    /// Passes `stream` (the body of blob `id`, `len` bytes) through, keeping
    /// a copy when it is read to its end and fits.
    pub fn fill(&self, id: u64, len: u64, stream: ByteStream) -> ByteStream {
        if len > self.inner.capacity / LARGEST_SHARE {
            return stream;
        }
        let temp = self
            .inner
            .dir
            .join(format!("{id:016x}.{:016x}.tmp", rand::random::<u64>()));
        let state = Filling {
            cache: self.clone(),
            id,
            len,
            temp: Some(temp),
            file: None,
            written: 0,
            failed: false,
        };
        futures::stream::unfold((stream, state), |(mut stream, mut state)| async move {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    state.write(&chunk).await;
                    Some((Ok(chunk), (stream, state)))
                }
                Some(Err(e)) => {
                    state.failed = true;
                    Some((Err(e), (stream, state)))
                }
                None => {
                    state.finish().await;
                    None
                }
            }
        })
        .boxed()
    }

    fn insert(&self, id: u64, len: u64) -> Vec<u64> {
        let Ok(mut state) = self.inner.state.lock() else {
            return Vec::new();
        };
        state.clock += 1;
        let now = state.clock;
        if state.entries.insert(id, (len, now)).is_none() {
            state.total += len;
        }
        let mut evicted = Vec::new();
        while state.total > self.inner.capacity {
            let Some((&oldest, &(size, _))) =
                state.entries.iter().min_by_key(|(_, (_, used))| *used)
            else {
                break;
            };
            state.entries.remove(&oldest);
            state.total -= size;
            evicted.push(oldest);
        }
        evicted
    }
}

/// A copy being written while the body streams past.
struct Filling {
    cache: BlobCache,
    id: u64,
    len: u64,
    temp: Option<PathBuf>,
    file: Option<tokio::fs::File>,
    written: u64,
    failed: bool,
}

impl Filling {
    async fn write(&mut self, chunk: &Bytes) {
        if self.failed {
            return;
        }
        if self.file.is_none() {
            let Some(temp) = &self.temp else { return };
            match tokio::fs::File::create(temp).await {
                Ok(file) => self.file = Some(file),
                Err(_) => {
                    self.failed = true;
                    return;
                }
            }
        }
        if let Some(file) = self.file.as_mut() {
            if file.write_all(chunk).await.is_err() {
                self.failed = true;
            }
        }
        self.written += chunk.len() as u64;
    }

    async fn finish(&mut self) {
        let Some(temp) = self.temp.take() else { return };
        let complete = !self.failed && self.written == self.len;
        let flushed = match self.file.take() {
            Some(mut file) => file.flush().await.is_ok(),
            None => self.len == 0 && tokio::fs::write(&temp, b"").await.is_ok(),
        };
        if complete
            && flushed
            && tokio::fs::rename(&temp, self.cache.path(self.id))
                .await
                .is_ok()
        {
            for old in self.cache.insert(self.id, self.len) {
                let _ = tokio::fs::remove_file(self.cache.path(old)).await;
            }
        } else {
            let _ = tokio::fs::remove_file(&temp).await;
        }
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        // A body not read to its end leaves no copy behind.
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(data: &'static [u8]) -> ByteStream {
        futures::stream::iter([Ok(Bytes::from_static(data))]).boxed()
    }

    async fn read(stream: ByteStream) -> Vec<u8> {
        let chunks: Vec<Result<Bytes, Error>> = stream.collect().await;
        chunks
            .into_iter()
            .flat_map(|c| c.expect("chunk").to_vec())
            .collect()
    }

    /// Bodies read to the end are kept, partial ones are not, and the
    /// least recently used go first when the capacity is reached.
    #[tokio::test]
    async fn keeps_complete_bodies_within_capacity() {
        let dir = tempfile::tempdir().expect("dir");
        let cache = BlobCache::open(dir.path(), 40).expect("open");
        assert_eq!(
            read(cache.fill(1, 10, body(b"0123456789"))).await,
            b"0123456789"
        );
        assert_eq!(
            read(cache.get(1).await.expect("cached")).await,
            b"0123456789"
        );
        // Wrong length (a truncated read): not kept.
        let _ = read(cache.fill(2, 11, body(b"0123456789"))).await;
        assert!(cache.get(2).await.is_none());
        // Dropped midway: not kept, no temporary file left.
        drop(cache.fill(3, 10, body(b"0123456789")));
        assert!(cache.get(3).await.is_none());
        // Too large for a share of the capacity: passed through only.
        let _ = read(cache.fill(4, 11, body(b"01234567890"))).await;
        assert!(cache.get(4).await.is_none());
        for id in 5..9 {
            let _ = read(cache.fill(id, 10, body(b"abcdefghij"))).await;
        }
        // 1 was used before 5..8 were added: it went first.
        assert!(cache.get(1).await.is_none());
        assert!(cache.get(8).await.is_some());
        let files = std::fs::read_dir(dir.path()).expect("dir").count();
        assert_eq!(files, 4, "only the cached blobs are on disk");
    }
}
