//! [`ArtifactStore`] on sled: one record per `(namespace, key)` in the
//! `artifacts` tree; values above the inline limit live in blob files.
//!
//! Never imports tonic; never awaits inside a logged write.

use async_trait::async_trait;
use trove_proto::artifacts::{
    ArtifactInfo, ListedArtifact, PutOptions, MAX_LISTED_PAGE_BYTES, MAX_LISTED_VALUE_BYTES,
};
use trove_proto::error::shorten;
use trove_proto::types::{
    clamp_page_size, encode_page_token, now_micros, ByteStream, ListPage, Name, Namespace, Page,
};
use trove_proto::{ArtifactStore, Error};

use super::blob::BlobDir;
use super::packs::{PackLoc, Packs};
use super::schema::*;
use super::{blocking, io_error, keys, scan_after, sled_error, SledStore};
use crate::engine::record::{self, Body, ValueRecord};
use crate::engine::values::{artifact_info, artifact_record};

/// Reads a small value whole, for listings. `None` when its blob or pack
/// vanished (a concurrent overwrite or compaction), so the caller can
/// re-read the record.
fn read_small_value(
    blobs: &BlobDir,
    packs: &Packs,
    record: &ValueRecord,
    key: &str,
) -> Result<Option<Vec<u8>>, Error> {
    match &record.body {
        Body::Inline(data) => Ok(Some(data.clone())),
        Body::Packed { pack, offset, crc } => {
            let loc = PackLoc {
                pack: *pack,
                offset: *offset,
            };
            packs
                .read(loc, record.body_len, *crc)
                .map_err(|err| super::read::pack_error("artifact", key, err))
        }
        Body::Blob(id) => match std::fs::read(blobs.blob_path(*id)) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read value", &e)),
        },
    }
}

#[async_trait]
impl ArtifactStore for SledStore {
    async fn put_artifact(
        &self,
        ns: &Namespace,
        key: &Name,
        options: PutOptions,
        data: ByteStream,
    ) -> Result<ArtifactInfo, Error> {
        let at = artifact_key(ns, key);
        let staged = self
            .stage(
                (ns, &self.inner.artifacts, &at),
                data,
                options.expected_size,
            )
            .await?;
        let (size, sha256) = (staged.len, staged.sha256);
        let now = now_micros();
        let make = artifact_record(options.content_type, now, size, sha256);
        let record = self
            .publish_and_commit(&self.inner.artifacts, &at, staged, make)
            .await?;
        Ok(artifact_info(key.as_str(), &record))
    }

    async fn get_artifact(
        &self,
        ns: &Namespace,
        key: &Name,
    ) -> Result<(ArtifactInfo, ByteStream), Error> {
        let (record, reader) = self
            .open_value(
                &self.inner.artifacts,
                &artifact_key(ns, key),
                "artifact",
                key.as_str(),
            )
            .await?;
        Ok((
            artifact_info(key.as_str(), &record),
            self.byte_stream(reader, format!("artifact {}", shorten(key.as_str()))),
        ))
    }

    async fn delete_artifact(&self, ns: &Namespace, key: &Name) -> Result<bool, Error> {
        let ticket = self.ticket();
        let removed = self.remove_all(&self.inner.artifacts, &[artifact_key(ns, key)])?;
        // Even a no-op waits: a concurrent delete of the same key may not be
        // durable yet, and this caller is about to be told the key is gone.
        self.durable(ticket).await?;
        if removed.is_empty() {
            return Ok(false);
        }
        self.retire_blobs(
            removed.iter().filter_map(ValueRecord::blob_id).collect(),
            ticket,
        );
        Ok(true)
    }

    async fn stat_artifact(&self, ns: &Namespace, key: &Name) -> Result<ArtifactInfo, Error> {
        let ticket = self.ticket();
        let found = self
            .inner
            .artifacts
            .get(artifact_key(ns, key))
            .map_err(sled_error)?;
        self.visible(ticket).await?;
        match found {
            Some(bytes) => Ok(artifact_info(key.as_str(), &record::decode(&bytes)?)),
            None => Err(Error::not_found("artifact", key.as_str())),
        }
    }

    async fn list_artifacts(
        &self,
        ns: &Namespace,
        page: &ListPage,
        with_values: bool,
    ) -> Result<Page<ListedArtifact>, Error> {
        let ticket = self.ticket();
        let tree = self.inner.artifacts.clone();
        let blobs = self.inner.blobs.clone();
        let packs = std::sync::Arc::clone(&self.inner.packs);
        let ns_key = namespace_key(ns);
        let page = page.clone();
        let page = blocking(move || {
            let limit = clamp_page_size(page.page_size) as usize;
            let mut items: Vec<ListedArtifact> = Vec::new();
            let mut value_bytes = 0u64;
            let mut more = false;
            for entry in scan_after(&tree, &ns_key, &page.prefix, page.after.as_deref()) {
                let (raw_key, value) = entry.map_err(sled_error)?;
                let Some((key, _)) = keys::take_part(&raw_key[ns_key.len()..]) else {
                    continue;
                };
                let Ok(key) = String::from_utf8(key) else {
                    continue;
                };
                if items.len() == limit {
                    more = true;
                    break;
                }
                let mut record = record::decode(&value)?;
                let mut inline_value = None;
                if with_values && record.size <= MAX_LISTED_VALUE_BYTES {
                    if !items.is_empty() && value_bytes + record.size > MAX_LISTED_PAGE_BYTES {
                        more = true;
                        break;
                    }
                    // A blob can be retired by a concurrent overwrite between
                    // reading the record and the file, and a pack compacted:
                    // re-read the record.
                    let mut missing: Option<Body> = None;
                    for _ in 0..5 {
                        if record.size > MAX_LISTED_VALUE_BYTES {
                            break;
                        }
                        if let Some(data) = read_small_value(&blobs, &packs, &record, &key)? {
                            inline_value = Some(data);
                            break;
                        }
                        if let Body::Packed { pack, offset, .. } = record.body {
                            if missing.as_ref() == Some(&record.body) {
                                let loc = PackLoc { pack, offset };
                                return Err(super::read::pack_gone("artifact", &key, loc));
                            }
                        }
                        missing = Some(record.body.clone());
                        match tree.get(&raw_key).map_err(sled_error)? {
                            Some(bytes) => record = record::decode(&bytes)?,
                            None => break,
                        }
                    }
                    value_bytes += inline_value.as_ref().map_or(0, |v| v.len() as u64);
                }
                items.push(ListedArtifact {
                    info: Some(artifact_info(&key, &record)),
                    value: inline_value.map(Into::into),
                });
            }
            let next_page_token = if more {
                items
                    .last()
                    .and_then(|last| last.info.as_ref())
                    .map(|info| encode_page_token(&info.key))
            } else {
                None
            };
            Ok(Page {
                items,
                next_page_token,
            })
        })
        .await?;
        self.visible(ticket).await?;
        Ok(page)
    }
}
