//! gRPC adapter for `trove.v1.Entries`, generic over [`EntryStore`].

use std::sync::Arc;

use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use trove_proto::entries::{AppendOptions, EntryCursor, NewEntry, NewEntryStream, ReadOptions};
use trove_proto::pb::{self, entries_server::Entries};
use trove_proto::types::{ListPage, Name, Namespace};
use trove_proto::{EntryStore, Error};

use super::{
    first_message, require_header, split, status, upload_parts, Access, Limits, OpenAccess, Part,
    Permission, ResponseStream,
};

/// Serves `trove.v1.Entries` from any [`EntryStore`].
#[derive(Debug)]
pub struct EntriesService<S: ?Sized> {
    store: Arc<S>,
    limits: Limits,
    access: Access,
}

impl<S: ?Sized> EntriesService<S> {
    /// Wraps a store.
    pub fn new(store: Arc<S>, limits: Limits) -> Self {
        EntriesService {
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

fn cassette(field: &str, raw: String) -> Result<Name, Status> {
    Name::new(field, raw).map_err(status)
}

fn namespace(raw: &str) -> Result<Namespace, Status> {
    Namespace::new(raw).map_err(status)
}

/// Validates wire entries; `offset` numbers them across a Replace stream.
fn parse_entries(entries: Vec<pb::Entry>, offset: usize) -> Result<Vec<NewEntry>, Error> {
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| NewEntry::parse(&format!("entries[{}]", offset + i), e.json, e.recorded_at))
        .collect()
}

/// Bytes of entry payload per read message.
const READ_MESSAGE_BUDGET: usize = 1024 * 1024;

#[tonic::async_trait]
impl<S: EntryStore + ?Sized> Entries for EntriesService<S> {
    type ReadStream = ResponseStream<pb::ReadResponse>;

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, cassette = ?request.get_ref().cassette, count = request.get_ref().entries.len()))]
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Write])?;
        let name = cassette("cassette", request.cassette)?;
        let entries = parse_entries(request.entries, 0).map_err(status)?;
        let options = AppendOptions {
            idempotency_key: (!request.idempotency_key.is_empty())
                .then(|| Name::new("idempotency_key", request.idempotency_key))
                .transpose()
                .map_err(status)?,
        };
        let appended = self
            .store
            .append_entries(&ns, &name, entries, options)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::AppendResponse { appended }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, cassette = ?request.get_ref().cassette))]
    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let name = cassette("cassette", request.cassette)?;
        let after = if request.after.is_empty() {
            None
        } else {
            Some(EntryCursor::decode("after", &request.after).map_err(status)?)
        };
        let limit = (request.limit > 0).then_some(request.limit);
        let entries = self
            .store
            .read_entries(&ns, &name, ReadOptions { after, limit })
            .await
            .map_err(status)?;
        // Group entries into messages of about 1 MiB; a large entry travels alone.
        let messages =
            futures::stream::unfold((entries, false), |(mut entries, done)| async move {
                if done {
                    return None;
                }
                let mut batch = Vec::new();
                let mut bytes = 0usize;
                loop {
                    match entries.next().await {
                        Some(Ok(entry)) => {
                            bytes += entry.json.len() + 48;
                            batch.push(entry);
                            if bytes >= READ_MESSAGE_BUDGET {
                                return Some((
                                    Ok(pb::ReadResponse { entries: batch }),
                                    (entries, false),
                                ));
                            }
                        }
                        Some(Err(err)) => return Some((Err(status(err)), (entries, true))),
                        None if batch.is_empty() => return None,
                        None => {
                            return Some((Ok(pb::ReadResponse { entries: batch }), (entries, true)))
                        }
                    }
                }
            });
        Ok(Response::new(messages.boxed()))
    }

    #[tracing::instrument(skip_all, fields(ns, cassette))]
    async fn replace(
        &self,
        request: Request<Streaming<pb::ReplaceRequest>>,
    ) -> Result<Response<pb::ReplaceResponse>, Status> {
        let (extensions, mut stream) = split(request);
        let first = first_message(&mut stream, &self.limits)
            .await
            .map_err(status)?;
        let header = require_header(first.header)?;
        let ns = namespace(&header.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Write, Permission::Delete])?;
        let name = cassette("header.cassette", header.cassette)?;
        tracing::Span::current()
            .record("ns", ns.as_str())
            .record("cassette", name.as_str());
        let first = Part {
            has_header: true,
            payload: first.entries,
            finish: first.finish,
        };
        let batches = upload_parts(first, stream, self.limits, |m| Part {
            has_header: m.header.is_some(),
            payload: m.entries,
            finish: m.finish,
        });
        let mut seen = 0usize;
        let entries: NewEntryStream = batches
            .flat_map(move |batch| {
                let parsed = batch.and_then(|entries| {
                    let n = entries.len();
                    let parsed = parse_entries(entries, seen);
                    seen += n;
                    parsed
                });
                match parsed {
                    Ok(entries) => futures::stream::iter(entries.into_iter().map(Ok)).left_stream(),
                    Err(e) => futures::stream::once(async move { Err(e) }).right_stream(),
                }
            })
            .boxed();
        let count = self
            .store
            .replace_entries(&ns, &name, entries)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReplaceResponse { count }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, cassette = ?request.get_ref().cassette))]
    async fn delete(
        &self,
        request: Request<pb::DeleteCassetteRequest>,
    ) -> Result<Response<pb::DeleteCassetteResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Delete])?;
        let name = cassette("cassette", request.cassette)?;
        let existed = self
            .store
            .delete_cassette(&ns, &name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteCassetteResponse { existed }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, cassette = ?request.get_ref().cassette))]
    async fn exists(
        &self,
        request: Request<pb::ExistsRequest>,
    ) -> Result<Response<pb::ExistsResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let name = cassette("cassette", request.cassette)?;
        let exists = self
            .store
            .cassette_exists(&ns, &name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ExistsResponse { exists }))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace, cassette = ?request.get_ref().cassette))]
    async fn ensure(
        &self,
        request: Request<pb::EnsureRequest>,
    ) -> Result<Response<pb::EnsureResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let name = cassette("cassette", request.cassette)?;
        self.store
            .ensure_cassette(&ns, &name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::EnsureResponse {}))
    }

    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace))]
    async fn list(
        &self,
        request: Request<pb::ListCassettesRequest>,
    ) -> Result<Response<pb::ListCassettesResponse>, Status> {
        let (extensions, request) = split(request);
        let ns = namespace(&request.namespace)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let page = ListPage::new(&request.prefix, request.page_size, &request.page_token)
            .map_err(status)?;
        let page = self
            .store
            .list_cassettes(&ns, &page)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListCassettesResponse {
            next_page_token: page.token_or_empty(),
            cassettes: page.items,
        }))
    }
}
