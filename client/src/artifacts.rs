//! [`ArtifactStore`] over gRPC.

use async_trait::async_trait;
use futures::StreamExt;
use trove_proto::artifacts::{ArtifactInfo, ListedArtifact, PutOptions};
use trove_proto::pb;
use trove_proto::types::{ByteStream, ListPage, Name, Namespace, Page};
use trove_proto::{ArtifactStore, Error};

use crate::{download_bytes, first_download_message, run_upload, upload_messages, TroveClient};

fn missing_info() -> Error {
    Error::internal("the server's reply lacks the artifact metadata")
}

#[async_trait]
impl ArtifactStore for TroveClient {
    async fn put_artifact(
        &self,
        ns: &Namespace,
        key: &Name,
        options: PutOptions,
        data: ByteStream,
    ) -> Result<ArtifactInfo, Error> {
        let first = pb::PutArtifactRequest {
            header: Some(pb::PutArtifactHeader {
                namespace: ns.as_str().to_owned(),
                key: key.as_str().to_owned(),
                content_type: options.content_type,
                size: options.expected_size,
            }),
            data: bytes::Bytes::new(),
            finish: false,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let messages = upload_messages(first, data, self.chunk_bytes, tx, |data, finish| {
            pb::PutArtifactRequest {
                header: None,
                data,
                finish,
            }
        });
        let mut client = self.artifacts.clone();
        let reply = run_upload(client.put(messages), rx).await?;
        reply.info.ok_or_else(missing_info)
    }

    async fn get_artifact(
        &self,
        ns: &Namespace,
        key: &Name,
    ) -> Result<(ArtifactInfo, ByteStream), Error> {
        let mut client = self.artifacts.clone();
        let mut stream = client
            .get(pb::GetArtifactRequest {
                namespace: ns.as_str().to_owned(),
                key: key.as_str().to_owned(),
            })
            .await?
            .into_inner();
        let first = first_download_message(&mut stream).await?;
        let info = first.info.ok_or_else(missing_info)?;
        let head = futures::stream::iter((!first.data.is_empty()).then_some(Ok(first.data)));
        Ok((info, head.chain(download_bytes(stream, |m| m.data)).boxed()))
    }

    async fn delete_artifact(&self, ns: &Namespace, key: &Name) -> Result<bool, Error> {
        let mut client = self.artifacts.clone();
        let reply = client
            .delete(pb::DeleteArtifactRequest {
                namespace: ns.as_str().to_owned(),
                key: key.as_str().to_owned(),
            })
            .await?;
        Ok(reply.into_inner().existed)
    }

    async fn stat_artifact(&self, ns: &Namespace, key: &Name) -> Result<ArtifactInfo, Error> {
        let mut client = self.artifacts.clone();
        let reply = client
            .stat(pb::StatArtifactRequest {
                namespace: ns.as_str().to_owned(),
                key: key.as_str().to_owned(),
            })
            .await?;
        reply.into_inner().info.ok_or_else(missing_info)
    }

    async fn list_artifacts(
        &self,
        ns: &Namespace,
        page: &ListPage,
        with_values: bool,
    ) -> Result<Page<ListedArtifact>, Error> {
        let (prefix, page_size, page_token) = page.to_wire();
        let mut client = self.artifacts.clone();
        let reply = client
            .list(pb::ListArtifactsRequest {
                namespace: ns.as_str().to_owned(),
                prefix,
                page_size,
                page_token,
                with_values,
            })
            .await?
            .into_inner();
        Ok(Page {
            items: reply.artifacts,
            next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
        })
    }
}
