//! [`ArtifactStore`] on the bucket engine: one value record per key at
//! `n/{ns}/a/{key}!r`, listed in key order straight from the bucket.

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use trove_proto::artifacts::{
    ArtifactInfo, ListedArtifact, PutOptions, MAX_LISTED_PAGE_BYTES, MAX_LISTED_VALUE_BYTES,
};
use trove_proto::types::{
    clamp_page_size, encode_page_token, now_micros, ByteStream, ListPage, Name, Namespace, Page,
};
use trove_proto::{ArtifactStore, Error};

use super::layout::*;
use super::names::NameQuery;
use super::BucketStore;
use crate::engine::values::{artifact_info, artifact_record};

/// Records read at once while listing.
const PARALLEL_READS: usize = 32;

impl BucketStore {
    /// A listed artifact with its value when asked and small enough. A blob
    /// replaced meanwhile is followed to the new record.
    async fn listed_artifact(
        &self,
        path: Path,
        key: String,
        with_values: bool,
    ) -> Result<Option<(ListedArtifact, u64)>, Error> {
        for _ in 0..8 {
            let Some(record) = self.read_record(&path).await? else {
                // Deleted since it was listed.
                return Ok(None);
            };
            let mut value = None;
            if with_values && record.size <= MAX_LISTED_VALUE_BYTES {
                match self.read_body(&record).await? {
                    Some(data) => value = Some(data),
                    None => continue,
                }
            }
            let bytes = value.as_ref().map_or(0, |v| v.len() as u64);
            return Ok(Some((
                ListedArtifact {
                    info: Some(artifact_info(&key, &record)),
                    value: value.map(Into::into),
                },
                bytes,
            )));
        }
        Err(Error::Unavailable {
            message: format!(
                "artifact {} kept changing while it was listed; retry",
                trove_proto::error::shorten(&key)
            ),
        })
    }
}

#[async_trait]
impl ArtifactStore for BucketStore {
    async fn put_artifact(
        &self,
        ns: &Namespace,
        key: &Name,
        options: PutOptions,
        data: ByteStream,
    ) -> Result<ArtifactInfo, Error> {
        let path = self.artifact_path(ns, key.as_str());
        let staged = self.stage(data, options.expected_size, &path).await?;
        self.write_note(&path, key.as_str()).await?;
        let (size, sha256) = (staged.len, staged.sha256);
        let now = now_micros();
        let make = artifact_record(options.content_type, now, size, sha256);
        let record = self.publish_value(&path, staged, make).await?;
        Ok(artifact_info(key.as_str(), &record))
    }

    async fn get_artifact(
        &self,
        ns: &Namespace,
        key: &Name,
    ) -> Result<(ArtifactInfo, ByteStream), Error> {
        let path = self.artifact_path(ns, key.as_str());
        let (record, stream) = self.open_value(&path, "artifact", key.as_str()).await?;
        Ok((artifact_info(key.as_str(), &record), stream))
    }

    async fn delete_artifact(&self, ns: &Namespace, key: &Name) -> Result<bool, Error> {
        self.remove_value(&self.artifact_path(ns, key.as_str()))
            .await
    }

    async fn stat_artifact(&self, ns: &Namespace, key: &Name) -> Result<ArtifactInfo, Error> {
        match self
            .read_record(&self.artifact_path(ns, key.as_str()))
            .await?
        {
            Some(record) => Ok(artifact_info(key.as_str(), &record)),
            None => Err(Error::not_found("artifact", key.as_str())),
        }
    }

    async fn list_artifacts(
        &self,
        ns: &Namespace,
        page: &ListPage,
        with_values: bool,
    ) -> Result<Page<ListedArtifact>, Error> {
        let limit = clamp_page_size(page.page_size) as usize;
        let query = NameQuery {
            dir: Self::ns_dir(ns, 'a'),
            prefix: page.prefix.clone(),
            after: page.after.clone().map(|a| (a, KIND_ARTIFACT)),
        };
        // One more key than the page holds tells whether another page follows.
        let mut listed: Vec<(String, Path)> = self
            .list_names(query)
            .try_filter_map(|(key, kind, meta)| {
                futures::future::ready(Ok((kind == KIND_ARTIFACT).then_some((key, meta.location))))
            })
            .take(limit + 1)
            .try_collect()
            .await?;
        let mut more = listed.len() > limit;
        listed.truncate(limit);
        // When every listed key vanished before its record was read, the
        // next page still starts after the last key listed.
        let last_listed = listed.last().map(|(key, _)| key.clone());
        let wanted = listed.into_iter();
        let reads: Vec<_> = wanted
            .map(|(key, path)| {
                let store = self.clone();
                async move { store.listed_artifact(path, key, with_values).await }
            })
            .collect();
        let mut found = futures::stream::iter(reads).buffered(PARALLEL_READS);
        let mut items = Vec::new();
        let mut value_bytes = 0u64;
        while let Some(item) = found.next().await {
            let Some((item, bytes)) = item? else {
                continue;
            };
            if with_values && !items.is_empty() && value_bytes + bytes > MAX_LISTED_PAGE_BYTES {
                more = true;
                break;
            }
            value_bytes += bytes;
            items.push(item);
        }
        let next_page_token = if more {
            items
                .last()
                .and_then(|last| last.info.as_ref())
                .map(|info| info.key.clone())
                .or(last_listed)
                .map(|key| encode_page_token(&key))
        } else {
            None
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }
}
