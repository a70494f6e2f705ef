//! gRPC adapter for `trove.v1.Objects`, generic over [`ObjectStore`].

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use trove_proto::objects::ChunkStream;
use trove_proto::pb::{self, objects_server::Objects};
use trove_proto::types::{ListPage, Name, Namespace};
use trove_proto::{Error, ObjectStore};

use super::{
    first_message, require_header, split, status, upload_parts, Access, Limits, OpenAccess, Part,
    Permission, ResponseStream,
};

/// Serves `trove.v1.Objects` from any [`ObjectStore`].
#[derive(Debug)]
pub struct ObjectsService<S: ?Sized> {
    store: Arc<S>,
    limits: Limits,
    access: Access,
}

impl<S: ?Sized> ObjectsService<S> {
    /// Wraps a store.
    pub fn new(store: Arc<S>, limits: Limits) -> Self {
        ObjectsService {
            store,
            limits,
            access: Arc::new(OpenAccess),
        }
    }

    /// Consults `access` on every call (by default everything is allowed).
    #[must_use]
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }
}

fn hash(field: &str, raw: String) -> Result<Name, Status> {
    Name::new(field, raw).map_err(status)
}

fn namespace(raw: &str) -> Result<Namespace, Status> {
    Namespace::new(raw).map_err(status)
}

#[tonic::async_trait]
impl<S: ObjectStore + ?Sized> Objects for ObjectsService<S> {
    type GetStream = ResponseStream<pb::GetObjectResponse>;
    type GetStreamStream = ResponseStream<pb::GetStreamResponse>;

    #[tracing::instrument(skip_all, fields(ns, hash))]
    async fn put(
        &self,
        request: Request<Streaming<pb::PutObjectRequest>>,
    ) -> Result<Response<pb::PutObjectResponse>, Status> {
        let (extensions, mut stream) = split(request);
        let first = first_message(&mut stream, &self.limits)
            .await
            .map_err(status)?;
        let header = require_header(first.header)?;
        let ns = namespace(&header.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Write])?;
        let hash = hash("header.hash", header.hash)?;
        tracing::Span::current()
            .record("ns", ns.as_str())
            .record("hash", hash.as_str());
        let first = Part {
            has_header: true,
            payload: first.data,
            finish: first.finish,
        };
        let body = upload_parts(first, stream, self.limits, |m| Part {
            has_header: m.header.is_some(),
            payload: m.data,
            finish: m.finish,
        });
        let info = self
            .store
            .put_object(&ns, &hash, header.size, body)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PutObjectResponse { info: Some(info) }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, hash = ?request.get_ref().hash))]
    async fn get(
        &self,
        request: Request<pb::GetObjectRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let hash = hash("hash", request.hash)?;
        let (info, data) = self.store.get_object(&ns, &hash).await.map_err(status)?;
        let head = futures::stream::once(async move {
            Ok(pb::GetObjectResponse {
                info: Some(info),
                data: Bytes::new(),
            })
        });
        let tail = data.map(|chunk| {
            chunk
                .map(|data| pb::GetObjectResponse { info: None, data })
                .map_err(status)
        });
        Ok(Response::new(head.chain(tail).boxed()))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, hash = ?request.get_ref().hash))]
    async fn delete(
        &self,
        request: Request<pb::DeleteObjectRequest>,
    ) -> Result<Response<pb::DeleteObjectResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Delete])?;
        let hash = hash("hash", request.hash)?;
        let existed = self.store.delete_object(&ns, &hash).await.map_err(status)?;
        Ok(Response::new(pb::DeleteObjectResponse { existed }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, hash = ?request.get_ref().hash))]
    async fn stat(
        &self,
        request: Request<pb::StatObjectRequest>,
    ) -> Result<Response<pb::StatObjectResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let hash = hash("hash", request.hash)?;
        let info = self.store.stat_object(&ns, &hash).await.map_err(status)?;
        Ok(Response::new(pb::StatObjectResponse { info: Some(info) }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace))]
    async fn list(
        &self,
        request: Request<pb::ListObjectsRequest>,
    ) -> Result<Response<pb::ListObjectsResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let page = ListPage::new(&request.prefix, request.page_size, &request.page_token)
            .map_err(status)?;
        let page = self.store.list_objects(&ns, &page).await.map_err(status)?;
        Ok(Response::new(pb::ListObjectsResponse {
            next_page_token: page.token_or_empty(),
            objects: page.items,
        }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, count = request.get_ref().hashes.len()))]
    async fn find_missing(
        &self,
        request: Request<pb::FindMissingRequest>,
    ) -> Result<Response<pb::FindMissingResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let hashes = request
            .hashes
            .into_iter()
            .enumerate()
            .map(|(i, h)| hash(&format!("hashes[{i}]"), h))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = self
            .store
            .find_missing(&ns, &hashes)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::FindMissingResponse {
            missing: missing.into_iter().map(|n| n.as_str().to_owned()).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(ns, hash))]
    async fn put_stream(
        &self,
        request: Request<Streaming<pb::PutStreamRequest>>,
    ) -> Result<Response<pb::PutStreamResponse>, Status> {
        let (extensions, mut stream) = split(request);
        let first = first_message(&mut stream, &self.limits)
            .await
            .map_err(status)?;
        let header = require_header(first.header)?;
        let ns = namespace(&header.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Write])?;
        let hash = hash("header.hash", header.hash)?;
        tracing::Span::current()
            .record("ns", ns.as_str())
            .record("hash", hash.as_str());
        let first = Part {
            has_header: true,
            payload: first.chunks,
            finish: first.finish,
        };
        let batches = upload_parts(first, stream, self.limits, |m| Part {
            has_header: m.header.is_some(),
            payload: m.chunks,
            finish: m.finish,
        });
        let chunks: ChunkStream = batches
            .flat_map(|batch| match batch {
                Ok(chunks) => futures::stream::iter(chunks.into_iter().map(Ok)).left_stream(),
                Err(e) => futures::stream::once(async move { Err(e) }).right_stream(),
            })
            .boxed();
        let info = self
            .store
            .put_stream(&ns, &hash, chunks)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PutStreamResponse { info: Some(info) }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, hash = ?request.get_ref().hash))]
    async fn get_stream(
        &self,
        request: Request<pb::GetStreamRequest>,
    ) -> Result<Response<Self::GetStreamStream>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let hash = hash("hash", request.hash)?;
        let (info, chunks) = self.store.get_stream(&ns, &hash).await.map_err(status)?;
        let head = futures::stream::once(async move {
            Ok(pb::GetStreamResponse {
                info: Some(info),
                chunks: Vec::new(),
            })
        });
        // Batch chunks into messages of about 1 MiB so that many small
        // chunks do not cost one message each.
        let tail = batch_chunks(chunks, 1024 * 1024).map(|batch| {
            batch
                .map(|chunks| pb::GetStreamResponse { info: None, chunks })
                .map_err(status)
        });
        Ok(Response::new(head.chain(tail).boxed()))
    }
}

/// Groups chunks into batches of roughly `budget` bytes, preserving order.
fn batch_chunks(
    chunks: ChunkStream,
    budget: usize,
) -> impl futures::Stream<Item = Result<Vec<pb::StreamChunk>, Error>> + Send {
    futures::stream::unfold((chunks, false), move |(mut chunks, done)| async move {
        if done {
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        loop {
            match chunks.next().await {
                Some(Ok(chunk)) => {
                    bytes += chunk.data.len() + 16;
                    batch.push(chunk);
                    if bytes >= budget || batch.len() >= 4096 {
                        return Some((Ok(batch), (chunks, false)));
                    }
                }
                Some(Err(e)) => return Some((Err(e), (chunks, true))),
                None if batch.is_empty() => return None,
                None => return Some((Ok(batch), (chunks, true))),
            }
        }
    })
}
