//! Conditional record I/O: reading records with their versions, writing them
//! only if absent or unchanged, the per-record turns of this process, the
//! remembered last versions, listing, and the backoff between lost races.

use super::*;

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

impl BucketStore {
    /// The version of the record at `path` this process last wrote, if remembered.
    pub fn recall(&self, path: &Path) -> Option<(Bytes, UpdateVersion)> {
        let known = self.inner.known.lock().ok()?;
        known.records.get(path.as_ref()).cloned()
    }

    /// Remembers the version of the record at `path` just written. The
    /// memory is bounded by bytes ([`KNOWN_BYTES`]) as well as by count; a
    /// record too big to be worth it is not remembered.
    pub fn remember(&self, path: &Path, bytes: Bytes, version: UpdateVersion) {
        if let Ok(mut known) = self.inner.known.lock() {
            known.forget(path.as_ref());
            let size = bytes.len() + path.as_ref().len();
            if size > KNOWN_BYTES / 16 {
                return;
            }
            if known.records.len() >= KNOWN_RECORDS || known.bytes + size > KNOWN_BYTES {
                known.records.clear();
                known.bytes = 0;
            }
            known.bytes += size;
            known
                .records
                .insert(path.as_ref().to_owned(), (bytes, version));
        }
    }

    /// Forgets what was remembered of the record at `path`.
    pub fn forget(&self, path: &Path) {
        if let Ok(mut known) = self.inner.known.lock() {
            known.forget(path.as_ref());
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

    /// Deletes an object; a missing one is fine. A hashed record's name note
    /// stays: deleting it could race a put of the same name (which writes
    /// the note, then the record) and hide that name from listings, while a
    /// note without its record is a few bytes that listings skip.
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
