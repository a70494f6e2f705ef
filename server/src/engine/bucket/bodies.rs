//! Value bodies: opening and reading a record's body (inline, a blob, or
//! through the local blob cache), and publishing, opening and removing a
//! value under a record path.

use super::*;
use bytes::Bytes;

/// A record pointing into the embedded engine's value packs, which this
/// engine never writes: the bucket holds data it cannot have written.
pub(super) fn packed_here() -> Error {
    Error::DataLoss {
        message: "a value record points into a local value pack, which the object-storage \
                  engine never writes; the bucket holds data from elsewhere"
            .into(),
    }
}

impl BucketStore {
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
            Body::Packed { .. } => Err(packed_here()),
        }
    }

    /// Opens blob `id` (`len` bytes) in the store, keeping a local copy when
    /// a blob cache is configured. `Ok(None)` when the blob is gone.
    pub(crate) async fn open_blob(&self, id: u64, len: u64) -> Result<Option<ByteStream>, Error> {
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
            Body::Packed { .. } => Err(packed_here()),
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
                    Some(crate::engine::record::decode(bytes)?),
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
            let bytes = crate::engine::record::encode(&new)?;
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
        // new one. A record that reads the same twice while its blob is
        // missing has lost its body: retrying cannot help.
        let mut missing_under: Option<Bytes> = None;
        for _ in 0..8 {
            let Some((bytes, _)) = self.read(path).await? else {
                return Err(Error::not_found(kind, display));
            };
            if missing_under.as_ref() == Some(&bytes) {
                return Err(Error::DataLoss {
                    message: format!(
                        "{kind} {display}: its stored body is missing from the object store; \
                         the value cannot be read: write it again"
                    ),
                });
            }
            let record = crate::engine::record::decode(&bytes).map_err(|e| match e {
                Error::DataLoss { message } => Error::DataLoss {
                    message: format!("{kind} {display}: {message}"),
                },
                other => other,
            })?;
            if let Some(stream) = self.open_body(&record).await? {
                return Ok((record, stream));
            }
            missing_under = Some(bytes);
        }
        Err(Error::Unavailable {
            message: format!("{kind} {display} kept changing while it was opened; retry"),
        })
    }

    /// The record at `path`, decoded; `None` when missing.
    pub async fn read_record(&self, path: &Path) -> Result<Option<ValueRecord>, Error> {
        match self.read(path).await? {
            Some((bytes, _)) => Ok(Some(crate::engine::record::decode(&bytes)?)),
            None => Ok(None),
        }
    }
}
