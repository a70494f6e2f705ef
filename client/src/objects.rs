//! [`ObjectStore`] over gRPC.

use async_trait::async_trait;
use futures::StreamExt;
use trove_proto::objects::{ChunkStream, ListedObject, ObjectInfo, StreamChunk, StreamInfo};
use trove_proto::pb;
use trove_proto::types::{ByteStream, ListPage, Name, Namespace, Page};
use trove_proto::{Error, ObjectStore};

use crate::{
    batched_messages, download_bytes, first_download_message, run_upload, upload_messages,
    TroveClient,
};

fn missing_info() -> Error {
    Error::internal("the server's reply lacks the object metadata")
}

#[async_trait]
impl ObjectStore for TroveClient {
    async fn put_object(
        &self,
        ns: &Namespace,
        hash: &Name,
        expected_size: Option<u64>,
        data: ByteStream,
    ) -> Result<ObjectInfo, Error> {
        let first = pb::PutObjectRequest {
            header: Some(pb::PutObjectHeader {
                namespace: ns.as_str().to_owned(),
                hash: hash.as_str().to_owned(),
                size: expected_size,
            }),
            data: bytes::Bytes::new(),
            finish: false,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let messages = upload_messages(first, data, self.chunk_bytes, tx, |data, finish| {
            pb::PutObjectRequest {
                header: None,
                data,
                finish,
            }
        });
        let mut client = self.objects.clone();
        let reply = run_upload(client.put(messages), rx).await?;
        reply.info.ok_or_else(missing_info)
    }

    async fn get_object(
        &self,
        ns: &Namespace,
        hash: &Name,
    ) -> Result<(ObjectInfo, ByteStream), Error> {
        let mut client = self.objects.clone();
        let mut stream = client
            .get(pb::GetObjectRequest {
                namespace: ns.as_str().to_owned(),
                hash: hash.as_str().to_owned(),
            })
            .await?
            .into_inner();
        let first = first_download_message(&mut stream).await?;
        let info = first.info.ok_or_else(missing_info)?;
        let head = futures::stream::iter((!first.data.is_empty()).then_some(Ok(first.data)));
        Ok((info, head.chain(download_bytes(stream, |m| m.data)).boxed()))
    }

    async fn delete_object(&self, ns: &Namespace, hash: &Name) -> Result<bool, Error> {
        let mut client = self.objects.clone();
        let reply = client
            .delete(pb::DeleteObjectRequest {
                namespace: ns.as_str().to_owned(),
                hash: hash.as_str().to_owned(),
            })
            .await?;
        Ok(reply.into_inner().existed)
    }

    async fn stat_object(&self, ns: &Namespace, hash: &Name) -> Result<ObjectInfo, Error> {
        let mut client = self.objects.clone();
        let reply = client
            .stat(pb::StatObjectRequest {
                namespace: ns.as_str().to_owned(),
                hash: hash.as_str().to_owned(),
            })
            .await?;
        reply.into_inner().info.ok_or_else(missing_info)
    }

    async fn list_objects(
        &self,
        ns: &Namespace,
        page: &ListPage,
    ) -> Result<Page<ListedObject>, Error> {
        let (prefix, page_size, page_token) = page.to_wire();
        let mut client = self.objects.clone();
        let reply = client
            .list(pb::ListObjectsRequest {
                namespace: ns.as_str().to_owned(),
                prefix,
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        Ok(Page {
            items: reply.objects,
            next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
        })
    }

    async fn find_missing(&self, ns: &Namespace, hashes: &[Name]) -> Result<Vec<Name>, Error> {
        let mut client = self.objects.clone();
        let reply = client
            .find_missing(pb::FindMissingRequest {
                namespace: ns.as_str().to_owned(),
                hashes: hashes.iter().map(|h| h.as_str().to_owned()).collect(),
            })
            .await?
            .into_inner();
        reply
            .missing
            .into_iter()
            .map(|h| Name::new("missing", h))
            .collect()
    }

    async fn put_stream(
        &self,
        ns: &Namespace,
        hash: &Name,
        chunks: ChunkStream,
    ) -> Result<StreamInfo, Error> {
        let first = pb::PutStreamRequest {
            header: Some(pb::PutStreamHeader {
                namespace: ns.as_str().to_owned(),
                hash: hash.as_str().to_owned(),
            }),
            chunks: Vec::new(),
            finish: false,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<Error>();
        let messages = batched_messages(
            first,
            chunks,
            self.chunk_bytes,
            tx,
            |chunk: &StreamChunk| chunk.data.len(),
            |chunk| chunk,
            |chunks, finish| pb::PutStreamRequest {
                header: None,
                chunks,
                finish,
            },
        );
        let mut client = self.objects.clone();
        let reply = run_upload(client.put_stream(messages), rx).await?;
        reply.info.ok_or_else(missing_info)
    }

    async fn get_stream(
        &self,
        ns: &Namespace,
        hash: &Name,
    ) -> Result<(StreamInfo, ChunkStream), Error> {
        let mut client = self.objects.clone();
        let mut stream = client
            .get_stream(pb::GetStreamRequest {
                namespace: ns.as_str().to_owned(),
                hash: hash.as_str().to_owned(),
            })
            .await?
            .into_inner();
        let first = first_download_message(&mut stream).await?;
        let info = first.info.ok_or_else(missing_info)?;
        let head = futures::stream::iter(first.chunks.into_iter().map(Ok));
        let rest = stream.flat_map(|message| match message {
            Ok(m) => futures::stream::iter(m.chunks.into_iter().map(Ok)).left_stream(),
            Err(status) => {
                futures::stream::once(async move { Err(Error::from(status)) }).right_stream()
            }
        });
        Ok((info, head.chain(rest).boxed()))
    }
}
