//! [`ObjectStore`] on the bucket engine: an object's record at
//! `n/{ns}/o/{hash}!d`, a stream's at `n/{ns}/o/{hash}!s`, so one listing
//! walks both in hash order.

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use trove_proto::objects::{ChunkStream, ListedObject, ObjectInfo, StreamInfo};
use trove_proto::types::{
    clamp_page_size, encode_page_token, now_micros, ByteStream, ListPage, Name, Namespace, Page,
};
use trove_proto::{Error, ObjectStore};

use super::layout::*;
use super::names::NameQuery;
use super::BucketStore;
use crate::engine::chunks::{decode_chunks, encode_stream};
use crate::engine::values::{
    check_find_missing, object_info, object_record, stream_info, stream_record, verify_content,
};

/// Lookups in flight at once for listings and `find_missing`.
const PARALLEL_READS: usize = 64;

impl BucketStore {}

/// Turns a byte stream into a reader for the chunk decoder.
fn reader(stream: ByteStream) -> impl tokio::io::AsyncRead + Send + Unpin + 'static {
    tokio_util::io::StreamReader::new(stream.map_err(|e| std::io::Error::other(e.to_string())))
}

#[async_trait]
impl ObjectStore for BucketStore {
    async fn put_object(
        &self,
        ns: &Namespace,
        hash: &Name,
        expected_size: Option<u64>,
        data: ByteStream,
    ) -> Result<ObjectInfo, Error> {
        let path = self.object_path(ns, hash.as_str(), KIND_OBJECT);
        let staged = self.stage(data, expected_size, &path).await?;
        let verified = verify_content(hash, &staged.sha256)?;
        self.write_note(&path, hash.as_str()).await?;
        let (size, sha256) = (staged.len, staged.sha256);
        let now = now_micros();
        let record = self
            .publish_value(&path, staged, object_record(verified, now, size, sha256))
            .await?;
        Ok(object_info(hash, &record))
    }

    async fn get_object(
        &self,
        ns: &Namespace,
        hash: &Name,
    ) -> Result<(ObjectInfo, ByteStream), Error> {
        let path = self.object_path(ns, hash.as_str(), KIND_OBJECT);
        let (record, stream) = self.open_value(&path, "object", hash.as_str()).await?;
        Ok((object_info(hash, &record), stream))
    }

    async fn delete_object(&self, ns: &Namespace, hash: &Name) -> Result<bool, Error> {
        let object = self
            .remove_value(&self.object_path(ns, hash.as_str(), KIND_OBJECT))
            .await?;
        let stream = self
            .remove_value(&self.object_path(ns, hash.as_str(), KIND_STREAM))
            .await?;
        Ok(object || stream)
    }

    async fn stat_object(&self, ns: &Namespace, hash: &Name) -> Result<ObjectInfo, Error> {
        let path = self.object_path(ns, hash.as_str(), KIND_OBJECT);
        match self.read_record(&path).await? {
            Some(record) => Ok(object_info(hash, &record)),
            None => Err(Error::not_found("object", hash.as_str())),
        }
    }

    async fn list_objects(
        &self,
        ns: &Namespace,
        page: &ListPage,
    ) -> Result<Page<ListedObject>, Error> {
        let limit = clamp_page_size(page.page_size) as usize;
        let query = NameQuery {
            dir: Self::ns_dir(ns, 'o'),
            prefix: page.prefix.clone(),
            // Past both kinds of the last hash listed.
            after: page.after.clone().map(|a| (a, 'z')),
        };
        let mut listing = self.list_names(query);
        let mut items: Vec<ListedObject> = Vec::new();
        let mut more = false;
        while let Some(entry) = listing.next().await {
            let (hash, kind, _) = entry?;
            if items.last().is_none_or(|last| last.hash != hash) {
                if items.len() == limit {
                    more = true;
                    break;
                }
                items.push(ListedObject {
                    hash,
                    ..Default::default()
                });
            }
            if let Some(item) = items.last_mut() {
                match kind {
                    KIND_OBJECT => item.has_object = true,
                    KIND_STREAM => item.has_stream = true,
                    _ => {}
                }
            }
        }
        drop(listing);
        // Object sizes live in the records: read them side by side.
        let lookups: Vec<_> = items
            .iter()
            .map(|item| {
                let path = item
                    .has_object
                    .then(|| self.object_path(ns, &item.hash, KIND_OBJECT));
                let store = self.clone();
                async move {
                    match path {
                        Some(path) => Ok(store.read_record(&path).await?.map_or(0, |r| r.size)),
                        None => Ok::<u64, Error>(0),
                    }
                }
            })
            .collect();
        let sizes: Vec<u64> = futures::stream::iter(lookups)
            .buffered(PARALLEL_READS)
            .try_collect()
            .await?;
        for (item, size) in items.iter_mut().zip(sizes) {
            item.size = size;
        }
        let next_page_token = if more {
            items.last().map(|last| encode_page_token(&last.hash))
        } else {
            None
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    async fn find_missing(&self, ns: &Namespace, hashes: &[Name]) -> Result<Vec<Name>, Error> {
        check_find_missing(hashes.len())?;
        let lookups: Vec<_> = hashes
            .iter()
            .map(|hash| {
                let path = self.object_path(ns, hash.as_str(), KIND_OBJECT);
                let store = self.clone();
                async move { store.exists(&path).await }
            })
            .collect();
        let present: Vec<bool> = futures::stream::iter(lookups)
            .buffered(PARALLEL_READS)
            .try_collect()
            .await?;
        Ok(hashes
            .iter()
            .zip(present)
            .filter(|(_, present)| !present)
            .map(|(hash, _)| hash.clone())
            .collect())
    }

    async fn put_stream(
        &self,
        ns: &Namespace,
        hash: &Name,
        chunks: ChunkStream,
    ) -> Result<StreamInfo, Error> {
        let (body, tally) = encode_stream(chunks);
        let path = self.object_path(ns, hash.as_str(), KIND_STREAM);
        let staged = self.stage(body, None, &path).await?;
        self.write_note(&path, hash.as_str()).await?;
        let (chunk_count, size) = tally.totals();
        let (body_len, sha256) = (staged.len, staged.sha256);
        let now = now_micros();
        let record = self
            .publish_value(
                &path,
                staged,
                stream_record(chunk_count, now, size, body_len, sha256),
            )
            .await?;
        Ok(stream_info(hash, &record))
    }

    async fn get_stream(
        &self,
        ns: &Namespace,
        hash: &Name,
    ) -> Result<(StreamInfo, ChunkStream), Error> {
        let path = self.object_path(ns, hash.as_str(), KIND_STREAM);
        let (record, stream) = self.open_value(&path, "stream", hash.as_str()).await?;
        let chunks = decode_chunks(reader(stream), record.chunk_count, record.body_len);
        Ok((stream_info(hash, &record), chunks))
    }
}
