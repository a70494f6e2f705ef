//! gRPC adapter for `trove.v1.Cache`, generic over [`CacheStore`].

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use trove_proto::cache::{BranchRefsKey, BranchRefsWrite, CacheScope, PruneOptions, UploadOptions};
use trove_proto::pb::{self, cache_server::Cache};
use trove_proto::types::{Name, Namespace};
use trove_proto::CacheStore;

use super::{
    first_message, require_header, split, status, upload_parts, Access, Limits, OpenAccess, Part,
    Permission, ResponseStream,
};

/// Serves `trove.v1.Cache` from any [`CacheStore`].
#[derive(Debug)]
pub struct CacheService<S: ?Sized> {
    store: Arc<S>,
    limits: Limits,
    access: Access,
}

impl<S: ?Sized> CacheService<S> {
    /// Wraps a store.
    pub fn new(store: Arc<S>, limits: Limits) -> Self {
        CacheService {
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

fn scope(field: &str, raw: Option<&pb::CacheScope>) -> Result<CacheScope, Status> {
    CacheScope::from_wire(field, raw).map_err(status)
}

fn namespace(raw: &str) -> Result<Namespace, Status> {
    Namespace::new(raw).map_err(status)
}

fn optional_name(field: &str, raw: Option<String>) -> Result<Option<Name>, Status> {
    raw.filter(|s| !s.is_empty())
        .map(|s| Name::new(field, s))
        .transpose()
        .map_err(status)
}

#[tonic::async_trait]
impl<S: CacheStore + ?Sized> Cache for CacheService<S> {
    type DownloadStream = ResponseStream<pb::DownloadResponse>;

    #[tracing::instrument(skip_all, fields(ns, reference))]
    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let (extensions, mut stream) = split(request);
        let first = first_message(&mut stream, &self.limits)
            .await
            .map_err(status)?;
        let header = require_header(first.header)?;
        let scope = scope("header.scope", header.scope.as_ref())?;
        self.access
            .authorize(&extensions, &scope.namespace, &[Permission::Write])?;
        let reference = Name::new("header.ref", header.r#ref).map_err(status)?;
        tracing::Span::current()
            .record("ns", scope.namespace.as_str())
            .record("reference", reference.as_str());
        let options = UploadOptions {
            tree_sha: optional_name("header.tree_sha", header.tree_sha)?,
            uploaded_at: header.uploaded_at,
            expected_size: header.size,
        };
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
        let stored = self
            .store
            .upload(&scope, &reference, options, body)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UploadResponse {
            stored: Some(stored),
        }))
    }

    #[tracing::instrument(skip_all, fields(reference = ?request.get_ref().r#ref))]
    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let (extensions, request) = split(request);
        let scope = scope("scope", request.scope.as_ref())?;
        self.access
            .authorize(&extensions, &scope.namespace, &[Permission::Read])?;
        let tree_sha = optional_name("tree_sha", request.tree_sha)?;
        let found = self
            .store
            .download(&scope, &request.r#ref, tree_sha.as_ref())
            .await
            .map_err(status)?;
        let Some((served, data)) = found else {
            let miss = pb::DownloadResponse {
                found: false,
                served: None,
                data: Bytes::new(),
            };
            return Ok(Response::new(
                futures::stream::once(async move { Ok(miss) }).boxed(),
            ));
        };
        let head = futures::stream::once(async move {
            Ok(pb::DownloadResponse {
                found: true,
                served: Some(served),
                data: Bytes::new(),
            })
        });
        let tail = data.map(|chunk| {
            chunk
                .map(|data| pb::DownloadResponse {
                    found: true,
                    served: None,
                    data,
                })
                .map_err(status)
        });
        Ok(Response::new(head.chain(tail).boxed()))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace))]
    async fn branch_refs(
        &self,
        request: Request<pb::BranchRefsRequest>,
    ) -> Result<Response<pb::BranchRefsResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let key = BranchRefsKey::new(ns, &request.prefix, &request.branch).map_err(status)?;
        let refs = self.store.branch_refs(&key).await.map_err(status)?;
        Ok(Response::new(pb::BranchRefsResponse {
            refs: refs.into_iter().collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, count = request.get_ref().refs.len()))]
    async fn write_branch_refs(
        &self,
        request: Request<pb::WriteBranchRefsRequest>,
    ) -> Result<Response<pb::WriteBranchRefsResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Write])?;
        let write = BranchRefsWrite::new(
            ns,
            &request.prefix,
            &request.branch,
            &request.default_branch,
            request.refs.into_iter().collect(),
        )
        .map_err(status)?;
        let written = self.store.write_branch_refs(&write).await.map_err(status)?;
        Ok(Response::new(pb::WriteBranchRefsResponse { written }))
    }

    #[tracing::instrument(skip_all)]
    async fn prune(
        &self,
        request: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        let (extensions, request) = split(request);
        let scope = scope("scope", request.scope.as_ref())?;
        self.access
            .authorize(&extensions, &scope.namespace, &[Permission::Delete])?;
        let options = PruneOptions {
            count: request.count,
            duration_seconds: request.duration_seconds,
            pr_branch_ttl_seconds: request.pr_branch_ttl_seconds,
        };
        let removed = self.store.prune(&scope, options).await.map_err(status)?;
        Ok(Response::new(pb::PruneResponse { removed }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace))]
    async fn prune_all(
        &self,
        request: Request<pb::PruneAllRequest>,
    ) -> Result<Response<pb::PruneAllResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Delete])?;
        let removed = self
            .store
            .prune_all(&ns, &request.prefix, request.pr_branch_ttl_seconds)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PruneAllResponse { removed }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_refs(
        &self,
        request: Request<pb::ListRefsRequest>,
    ) -> Result<Response<pb::ListRefsResponse>, Status> {
        let (extensions, request) = split(request);
        let scope = scope("scope", request.scope.as_ref())?;
        self.access
            .authorize(&extensions, &scope.namespace, &[Permission::Read])?;
        let page = self
            .store
            .list_refs(&scope, request.page_size, &request.page_token)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListRefsResponse {
            next_page_token: page.token_or_empty(),
            refs: page.items,
        }))
    }
}
