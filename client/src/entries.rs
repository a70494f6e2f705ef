//! [`EntryStore`] over gRPC.

use async_trait::async_trait;
use futures::StreamExt;
use trove_proto::entries::{AppendOptions, EntryStream, NewEntry, NewEntryStream, ReadOptions};
use trove_proto::pb;
use trove_proto::types::{ListPage, Name, Namespace, Page};
use trove_proto::{EntryStore, Error};

use crate::{batched_messages, run_upload, TroveClient};

fn to_wire(entry: NewEntry) -> pb::Entry {
    pb::Entry {
        json: entry.json,
        recorded_at: Some(entry.recorded_at),
    }
}

/// Entry bytes per Replace message.
const REPLACE_MESSAGE_BUDGET: usize = 1024 * 1024;

#[async_trait]
impl EntryStore for TroveClient {
    async fn append_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: Vec<NewEntry>,
        options: AppendOptions,
    ) -> Result<u64, Error> {
        let mut client = self.entries.clone();
        let reply = client
            .append(pb::AppendRequest {
                namespace: ns.as_str().to_owned(),
                cassette: cassette.as_str().to_owned(),
                entries: entries.into_iter().map(to_wire).collect(),
                idempotency_key: options
                    .idempotency_key
                    .map(|k| k.as_str().to_owned())
                    .unwrap_or_default(),
            })
            .await?;
        Ok(reply.into_inner().appended)
    }

    async fn read_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        options: ReadOptions,
    ) -> Result<EntryStream, Error> {
        let mut client = self.entries.clone();
        let stream = client
            .read(pb::ReadRequest {
                namespace: ns.as_str().to_owned(),
                cassette: cassette.as_str().to_owned(),
                after: options.after.map(|c| c.encode()).unwrap_or_default(),
                limit: options.limit.unwrap_or(0),
            })
            .await?
            .into_inner();
        Ok(stream
            .flat_map(|message| match message {
                Ok(m) => futures::stream::iter(m.entries.into_iter().map(Ok)).left_stream(),
                Err(status) => {
                    futures::stream::once(async move { Err(Error::from(status)) }).right_stream()
                }
            })
            .boxed())
    }

    async fn replace_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: NewEntryStream,
    ) -> Result<u64, Error> {
        let first = pb::ReplaceRequest {
            header: Some(pb::ReplaceHeader {
                namespace: ns.as_str().to_owned(),
                cassette: cassette.as_str().to_owned(),
            }),
            entries: Vec::new(),
            finish: false,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let messages = batched_messages(
            first,
            entries,
            REPLACE_MESSAGE_BUDGET,
            tx,
            |entry: &NewEntry| entry.json.len(),
            to_wire,
            |entries, finish| pb::ReplaceRequest {
                header: None,
                entries,
                finish,
            },
        );
        let mut client = self.entries.clone();
        Ok(run_upload(client.replace(messages), rx).await?.count)
    }

    async fn delete_cassette(&self, ns: &Namespace, cassette: &Name) -> Result<bool, Error> {
        let mut client = self.entries.clone();
        let reply = client
            .delete(pb::DeleteCassetteRequest {
                namespace: ns.as_str().to_owned(),
                cassette: cassette.as_str().to_owned(),
            })
            .await?;
        Ok(reply.into_inner().existed)
    }

    async fn cassette_exists(&self, ns: &Namespace, cassette: &Name) -> Result<bool, Error> {
        let mut client = self.entries.clone();
        let reply = client
            .exists(pb::ExistsRequest {
                namespace: ns.as_str().to_owned(),
                cassette: cassette.as_str().to_owned(),
            })
            .await?;
        Ok(reply.into_inner().exists)
    }

    async fn ensure_cassette(&self, ns: &Namespace, cassette: &Name) -> Result<(), Error> {
        let mut client = self.entries.clone();
        client
            .ensure(pb::EnsureRequest {
                namespace: ns.as_str().to_owned(),
                cassette: cassette.as_str().to_owned(),
            })
            .await?;
        Ok(())
    }

    async fn list_cassettes(&self, ns: &Namespace, page: &ListPage) -> Result<Page<String>, Error> {
        let (prefix, page_size, page_token) = page.to_wire();
        let mut client = self.entries.clone();
        let reply = client
            .list(pb::ListCassettesRequest {
                namespace: ns.as_str().to_owned(),
                prefix,
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        Ok(Page {
            items: reply.cassettes,
            next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
        })
    }
}
