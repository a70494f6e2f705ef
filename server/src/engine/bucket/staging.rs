//! Staging and retiring bodies: draining a caller's bytes into an inline body
//! or an uploaded blob under a pending marker, and retiring replaced blobs
//! (their deletion is left to reclaim when a record may still own them).

use super::*;
use crate::engine::values::DeclaredSize;

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
pub(super) struct PendingBlob {
    pub(super) store: BucketStore,
    pub(super) id: u64,
    pub(super) upload: Option<WriteMultipart>,
    pub(super) owned: bool,
    pub(super) maybe_owned: bool,
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
pub(super) struct Marker {
    pub(super) owner: String,
    pub(super) blob: u64,
}

impl BucketStore {
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
        let declared = DeclaredSize::new(expected_size);
        let mut hasher = Sha256::new();
        let mut buffered = BytesMut::new();
        let mut guard: Option<PendingBlob> = None;
        let mut len = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            len += chunk.len() as u64;
            declared.check_progress(len)?;
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
        declared.check_end(len)?;
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
    pub(super) async fn start_blob(&self, owner: &Path) -> Result<PendingBlob, Error> {
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
}
