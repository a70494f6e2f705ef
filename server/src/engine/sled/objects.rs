//! [`ObjectStore`] on sled: objects and streams share the `objects` tree,
//! keyed `(namespace, hash, kind)` so one scan lists both and one transaction
//! deletes both. Streams are stored as a body of length-prefixed chunk records.
//!
//! Never imports tonic; never awaits inside a logged write.

use async_trait::async_trait;
use futures::StreamExt;
use trove_proto::objects::{ChunkStream, ListedObject, ObjectInfo, StreamInfo};
use trove_proto::types::{
    clamp_page_size, encode_page_token, now_micros, ByteStream, ListPage, Name, Namespace, Page,
};
use trove_proto::{Error, ObjectStore};

use super::schema::*;
use super::{blocking, keys, scan_after, sled_error, SledStore};
use crate::engine::chunks::{decode_chunks, encode_stream};
use crate::engine::record::{self, ValueRecord};
use crate::engine::values::{
    check_find_missing, object_info, object_record, stream_info, stream_record, verify_content,
};

impl SledStore {
    /// `put_object`; for a copy of an object stored elsewhere, with the
    /// creation time a new object gets from `copy_created_at` (called once
    /// the body has ended cleanly): a tier keeps the upstream's time on its
    /// local copy.
    pub(crate) async fn put_object_as_of(
        &self,
        ns: &Namespace,
        hash: &Name,
        expected_size: Option<u64>,
        data: ByteStream,
        copy_created_at: Option<Box<dyn FnOnce() -> i64 + Send>>,
    ) -> Result<ObjectInfo, Error> {
        let at = object_key(ns, hash, KIND_OBJECT);
        let staged = self
            .stage((ns, &self.inner.objects, &at), data, expected_size)
            .await?;
        let verified = verify_content(hash, &staged.sha256)?;
        let (size, sha256) = (staged.len, staged.sha256);
        let copy = copy_created_at.is_some();
        let now = copy_created_at.map_or_else(now_micros, |created_at| created_at());
        let key = object_key(ns, hash, KIND_OBJECT);
        let record = self
            .publish_and_commit(
                &self.inner.objects,
                &key,
                staged,
                object_record(verified, now, size, sha256),
            )
            .await?;
        // Storing a value already there writes nothing: count it as a use,
        // or the caller's fresh copy could be the next one evicted. (A copy
        // carries another store's time, so it always counts.)
        if copy || record.updated_at != now {
            self.note_object_use(ns.as_str(), &key);
        }
        Ok(object_info(hash, &record))
    }
}

#[async_trait]
impl ObjectStore for SledStore {
    async fn put_object(
        &self,
        ns: &Namespace,
        hash: &Name,
        expected_size: Option<u64>,
        data: ByteStream,
    ) -> Result<ObjectInfo, Error> {
        self.put_object_as_of(ns, hash, expected_size, data, None)
            .await
    }

    async fn get_object(
        &self,
        ns: &Namespace,
        hash: &Name,
    ) -> Result<(ObjectInfo, ByteStream), Error> {
        let key = object_key(ns, hash, KIND_OBJECT);
        let (record, reader) = self
            .open_value(&self.inner.objects, &key, "object", hash.as_str())
            .await?;
        self.note_object_use(ns.as_str(), &key);
        let what = format!("object {}", trove_proto::error::shorten(hash.as_str()));
        Ok((object_info(hash, &record), self.byte_stream(reader, what)))
    }

    async fn delete_object(&self, ns: &Namespace, hash: &Name) -> Result<bool, Error> {
        let ticket = self.ticket();
        let keys = [
            object_key(ns, hash, KIND_OBJECT),
            object_key(ns, hash, KIND_STREAM),
        ];
        let removed = self.remove_all(&self.inner.objects, &keys)?;
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

    async fn stat_object(&self, ns: &Namespace, hash: &Name) -> Result<ObjectInfo, Error> {
        let ticket = self.ticket();
        let key = object_key(ns, hash, KIND_OBJECT);
        let found = self.inner.objects.get(key).map_err(sled_error)?;
        self.visible(ticket).await?;
        match found {
            Some(bytes) => Ok(object_info(hash, &record::decode(&bytes)?)),
            None => Err(Error::not_found("object", hash.as_str())),
        }
    }

    async fn list_objects(
        &self,
        ns: &Namespace,
        page: &ListPage,
    ) -> Result<Page<ListedObject>, Error> {
        let ticket = self.ticket();
        let tree = self.inner.objects.clone();
        let ns_key = namespace_key(ns);
        let page = page.clone();
        let page = blocking(move || {
            let limit = clamp_page_size(page.page_size) as usize;
            let mut items: Vec<ListedObject> = Vec::new();
            let mut more = false;
            for entry in scan_after(&tree, &ns_key, &page.prefix, page.after.as_deref()) {
                let (key, value) = entry.map_err(sled_error)?;
                let Some((hash, rest)) = keys::take_part(&key[ns_key.len()..]) else {
                    continue;
                };
                let Ok(hash) = String::from_utf8(hash) else {
                    continue;
                };
                let kind = rest.first().copied();
                let same = items.last().is_some_and(|last| last.hash == hash);
                if !same {
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    items.push(ListedObject {
                        hash,
                        ..Default::default()
                    });
                }
                let Some(item) = items.last_mut() else {
                    continue;
                };
                match kind {
                    Some(KIND_OBJECT) => {
                        item.has_object = true;
                        item.size = record::decode(&value)?.size;
                    }
                    Some(KIND_STREAM) => item.has_stream = true,
                    _ => {}
                }
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
        })
        .await?;
        self.visible(ticket).await?;
        Ok(page)
    }

    async fn find_missing(&self, ns: &Namespace, hashes: &[Name]) -> Result<Vec<Name>, Error> {
        let ticket = self.ticket();
        check_find_missing(hashes.len())?;
        let store = self.clone();
        let ns = ns.clone();
        let hashes = hashes.to_vec();
        let missing = blocking(move || {
            let mut missing = Vec::new();
            for hash in hashes {
                let key = object_key(&ns, &hash, KIND_OBJECT);
                let present = store.inner.objects.contains_key(&key).map_err(sled_error)?;
                if present {
                    // Found is a use: the caller is about to rely on it.
                    store.note_object_use(ns.as_str(), &key);
                } else {
                    missing.push(hash);
                }
            }
            Ok(missing)
        })
        .await?;
        // A client skips its upload of whatever is reported present: that
        // must survive a crash.
        self.visible(ticket).await?;
        Ok(missing)
    }

    async fn put_stream(
        &self,
        ns: &Namespace,
        hash: &Name,
        chunks: ChunkStream,
    ) -> Result<StreamInfo, Error> {
        let (body, tally) = encode_stream(chunks);
        let at = object_key(ns, hash, KIND_STREAM);
        let staged = self
            .stage((ns, &self.inner.objects, &at), body, None)
            .await?;
        let (chunk_count, size) = tally.totals();
        let (body_len, sha256) = (staged.len, staged.sha256);
        let now = now_micros();
        let key = object_key(ns, hash, KIND_STREAM);
        let record = self
            .publish_and_commit(
                &self.inner.objects,
                &key,
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
        let key = object_key(ns, hash, KIND_STREAM);
        let (record, reader) = self
            .open_value(&self.inner.objects, &key, "stream", hash.as_str())
            .await?;
        let what = format!("stream {}", trove_proto::error::shorten(hash.as_str()));
        let chunks = decode_chunks(reader, record.chunk_count, record.body_len)
            .map(move |chunk| {
                chunk.map_err(|e| match e {
                    Error::DataLoss { message } => Error::DataLoss {
                        message: format!("{what}: {message}"),
                    },
                    other => other,
                })
            })
            .boxed();
        Ok((stream_info(hash, &record), chunks))
    }
}
