//! gRPC adapter for `trove.v1.Artifacts`, generic over [`ArtifactStore`].

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use trove_proto::artifacts::PutOptions;
use trove_proto::pb::{self, artifacts_server::Artifacts};
use trove_proto::types::{ListPage, Name, Namespace};
use trove_proto::ArtifactStore;

use super::{
    first_message, require_header, split, status, upload_parts, Access, Limits, OpenAccess, Part,
    Permission, ResponseStream,
};

/// Serves `trove.v1.Artifacts` from any [`ArtifactStore`].
#[derive(Debug)]
pub struct ArtifactsService<S: ?Sized> {
    store: Arc<S>,
    limits: Limits,
    access: Access,
}

impl<S: ?Sized> ArtifactsService<S> {
    /// Wraps a store.
    pub fn new(store: Arc<S>, limits: Limits) -> Self {
        ArtifactsService {
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

fn key(field: &str, raw: String) -> Result<Name, Status> {
    Name::new(field, raw).map_err(status)
}

fn namespace(raw: &str) -> Result<Namespace, Status> {
    Namespace::new(raw).map_err(status)
}

#[tonic::async_trait]
impl<S: ArtifactStore + ?Sized> Artifacts for ArtifactsService<S> {
    type GetStream = ResponseStream<pb::GetArtifactResponse>;

    #[tracing::instrument(skip_all, fields(ns, key))]
    async fn put(
        &self,
        request: Request<Streaming<pb::PutArtifactRequest>>,
    ) -> Result<Response<pb::PutArtifactResponse>, Status> {
        let (extensions, mut stream) = split(request);
        let first = first_message(&mut stream, &self.limits)
            .await
            .map_err(status)?;
        let header = require_header(first.header)?;
        let ns = namespace(&header.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Write])?;
        let key = key("header.key", header.key)?;
        tracing::Span::current()
            .record("ns", ns.as_str())
            .record("key", key.as_str());
        let options = PutOptions::new(&header.content_type, header.size).map_err(status)?;
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
            .put_artifact(&ns, &key, options, body)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PutArtifactResponse { info: Some(info) }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, key = ?request.get_ref().key))]
    async fn get(
        &self,
        request: Request<pb::GetArtifactRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let key = key("key", request.key)?;
        let (info, data) = self.store.get_artifact(&ns, &key).await.map_err(status)?;
        let head = futures::stream::once(async move {
            Ok(pb::GetArtifactResponse {
                info: Some(info),
                data: Bytes::new(),
            })
        });
        let tail = data.map(|chunk| {
            chunk
                .map(|data| pb::GetArtifactResponse { info: None, data })
                .map_err(status)
        });
        Ok(Response::new(head.chain(tail).boxed()))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, key = ?request.get_ref().key))]
    async fn delete(
        &self,
        request: Request<pb::DeleteArtifactRequest>,
    ) -> Result<Response<pb::DeleteArtifactResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Delete])?;
        let key = key("key", request.key)?;
        let existed = self
            .store
            .delete_artifact(&ns, &key)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteArtifactResponse { existed }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, key = ?request.get_ref().key))]
    async fn stat(
        &self,
        request: Request<pb::StatArtifactRequest>,
    ) -> Result<Response<pb::StatArtifactResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let key = key("key", request.key)?;
        let info = self.store.stat_artifact(&ns, &key).await.map_err(status)?;
        Ok(Response::new(pb::StatArtifactResponse { info: Some(info) }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace))]
    async fn list(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let page = ListPage::new(&request.prefix, request.page_size, &request.page_token)
            .map_err(status)?;
        let page = self
            .store
            .list_artifacts(&ns, &page, request.with_values)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListArtifactsResponse {
            next_page_token: page.token_or_empty(),
            artifacts: page.items,
        }))
    }
}
