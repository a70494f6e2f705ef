//! [`CacheStore`] over gRPC.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures::StreamExt;
use trove_proto::cache::{
    BranchRefsKey, BranchRefsWrite, CacheScope, CachedRef, PruneOptions, UploadOptions,
};
use trove_proto::pb;
use trove_proto::types::{ByteStream, Name, Namespace, Page};
use trove_proto::{CacheStore, Error};

use crate::{download_bytes, first_download_message, run_upload, upload_messages, TroveClient};

#[async_trait]
impl CacheStore for TroveClient {
    async fn upload(
        &self,
        scope: &CacheScope,
        reference: &Name,
        options: UploadOptions,
        data: ByteStream,
    ) -> Result<CachedRef, Error> {
        let first = pb::UploadRequest {
            header: Some(pb::UploadHeader {
                scope: Some(scope.to_wire()),
                r#ref: reference.as_str().to_owned(),
                tree_sha: options.tree_sha.map(|t| t.as_str().to_owned()),
                uploaded_at: options.uploaded_at,
                size: options.expected_size,
            }),
            data: bytes::Bytes::new(),
            finish: false,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let messages = upload_messages(first, data, self.chunk_bytes, tx, |data, finish| {
            pb::UploadRequest {
                header: None,
                data,
                finish,
            }
        });
        let mut client = self.cache.clone();
        let reply = run_upload(client.upload(messages), rx).await?;
        reply
            .stored
            .ok_or_else(|| Error::internal("the server's reply lacks the stored ref"))
    }

    async fn download(
        &self,
        scope: &CacheScope,
        reference: &str,
        tree_sha: Option<&Name>,
    ) -> Result<Option<(CachedRef, ByteStream)>, Error> {
        let mut client = self.cache.clone();
        let mut stream = client
            .download(pb::DownloadRequest {
                scope: Some(scope.to_wire()),
                r#ref: reference.to_owned(),
                tree_sha: tree_sha.map(|t| t.as_str().to_owned()),
            })
            .await?
            .into_inner();
        let first = first_download_message(&mut stream).await?;
        if !first.found {
            return Ok(None);
        }
        let served = first
            .served
            .ok_or_else(|| Error::internal("the server's reply lacks the served ref"))?;
        let head = futures::stream::iter((!first.data.is_empty()).then_some(Ok(first.data)));
        Ok(Some((
            served,
            head.chain(download_bytes(stream, |m| m.data)).boxed(),
        )))
    }

    async fn branch_refs(&self, key: &BranchRefsKey) -> Result<BTreeMap<String, i64>, Error> {
        let mut client = self.cache.clone();
        let reply = client
            .branch_refs(pb::BranchRefsRequest {
                namespace: key.namespace.as_str().to_owned(),
                prefix: key.prefix.clone(),
                branch: key.branch.clone().unwrap_or_default(),
            })
            .await?;
        Ok(reply.into_inner().refs.into_iter().collect())
    }

    /// A no-op write (blank or default branch, empty map) is answered here:
    /// the server would answer it the same way without storing anything.
    async fn write_branch_refs(&self, write: &BranchRefsWrite) -> Result<bool, Error> {
        let Some((branch, refs)) = &write.target else {
            return Ok(false);
        };
        let mut client = self.cache.clone();
        let reply = client
            .write_branch_refs(pb::WriteBranchRefsRequest {
                namespace: write.namespace.as_str().to_owned(),
                prefix: write.prefix.clone(),
                branch: branch.clone(),
                default_branch: String::new(),
                refs: refs.clone().into_iter().collect(),
            })
            .await?;
        Ok(reply.into_inner().written)
    }

    async fn prune(&self, scope: &CacheScope, options: PruneOptions) -> Result<u64, Error> {
        let mut client = self.cache.clone();
        let reply = client
            .prune(pb::PruneRequest {
                scope: Some(scope.to_wire()),
                count: options.count,
                duration_seconds: options.duration_seconds,
                pr_branch_ttl_seconds: options.pr_branch_ttl_seconds,
            })
            .await?;
        Ok(reply.into_inner().removed)
    }

    async fn prune_all(
        &self,
        ns: &Namespace,
        prefix: &str,
        pr_branch_ttl_seconds: i64,
    ) -> Result<u64, Error> {
        let mut client = self.cache.clone();
        let reply = client
            .prune_all(pb::PruneAllRequest {
                namespace: ns.as_str().to_owned(),
                prefix: prefix.to_owned(),
                pr_branch_ttl_seconds,
            })
            .await?;
        Ok(reply.into_inner().removed)
    }

    async fn list_refs(
        &self,
        scope: &CacheScope,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page<CachedRef>, Error> {
        let mut client = self.cache.clone();
        let reply = client
            .list_refs(pb::ListRefsRequest {
                scope: Some(scope.to_wire()),
                page_size,
                page_token: page_token.to_owned(),
            })
            .await?
            .into_inner();
        Ok(Page {
            items: reply.refs,
            next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
        })
    }
}
