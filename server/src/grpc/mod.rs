//! Thin gRPC adapters: each method converts the wire request into validated
//! domain types, asks the access policy ([`Authorize`]) as soon as it knows
//! the namespace, calls the trait, and maps the result back. No storage
//! logic and no sled types live here; each adapter is generic over the trait
//! it serves, so any implementation (the sled store, a remote client) can sit
//! behind it. This module imports only `trove-proto` of the workspace: the
//! policy is a trait here, implemented by the server's access module.

pub mod admin;
pub mod artifacts;
pub mod cache;
pub mod entries;
pub mod objects;

use std::pin::Pin;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tonic::{Request, Status, Streaming};
use trove_proto::types::Namespace;
use trove_proto::Error;

/// A boxed response stream, as tonic's server traits expect.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A permission a call needs on its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read, stat, list, find, download.
    Read,
    /// Put, append, upload, write a branch map.
    Write,
    /// Delete, prune, or replace a cassette's whole content away.
    Delete,
    /// Operator calls.
    Admin,
}

/// The server's access policy. Every method asks it once it knows the
/// namespace and before the store is touched, so a denied call changes
/// nothing and answers the same whether or not the item exists.
pub trait Authorize: Send + Sync + std::fmt::Debug {
    /// `Ok` when the caller (known from the call's extensions) holds every
    /// permission in `needed` on `ns`; otherwise the status to answer.
    fn authorize(
        &self,
        extensions: &tonic::Extensions,
        ns: &Namespace,
        needed: &[Permission],
    ) -> Result<(), Status>;
}

/// The policy of a server without access control: everything is allowed.
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenAccess;

impl Authorize for OpenAccess {
    fn authorize(
        &self,
        _: &tonic::Extensions,
        _: &Namespace,
        _: &[Permission],
    ) -> Result<(), Status> {
        Ok(())
    }
}

/// A shared access policy.
pub type Access = Arc<dyn Authorize>;

/// A request's extensions (where the caller's identity travels) and message.
pub fn split<T>(request: Request<T>) -> (tonic::Extensions, T) {
    let (_, extensions, message) = request.into_parts();
    (extensions, message)
}

/// Limits the adapters enforce on incoming messages.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message accepted, in bytes.
    pub max_message_bytes: usize,
}

impl Limits {
    /// The domain error for a message over the limit.
    pub fn exceeded(&self, what: &str) -> Error {
        Error::exhausted(
            format!("max_message_bytes ({})", self.max_message_bytes),
            format!(
                "{what} is larger than the server accepts; send large values in several messages"
            ),
        )
    }

    /// Maps a failure to read the next message of a client stream: an
    /// oversize message becomes RESOURCE_EXHAUSTED naming the limit, anything
    /// else means the client went away.
    pub fn stream_error(&self, status: Status) -> Error {
        match status.code() {
            // The server's intake guard names its own limit; keep it.
            tonic::Code::ResourceExhausted if status.metadata().contains_key("trove-limit") => {
                Error::from(status)
            }
            tonic::Code::DeadlineExceeded => Error::from(status),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => self.exceeded("a message"),
            tonic::Code::Cancelled => Error::Cancelled {
                message: "the client cancelled the upload; nothing was stored".into(),
            },
            // A message that is not valid protobuf for the method: INTERNAL,
            // as for unary calls (the gRPC status-code guide's choice).
            tonic::Code::Internal => Error::Internal {
                message: format!("{}; nothing was stored", status.message()),
            },
            _ => Error::Cancelled {
                message: format!(
                    "the upload stream failed ({}); nothing was stored",
                    status.message()
                ),
            },
        }
    }
}

/// Reads the first message of a client stream, which must exist.
pub async fn first_message<M>(stream: &mut Streaming<M>, limits: &Limits) -> Result<M, Error> {
    match stream.message().await {
        Ok(Some(message)) => Ok(message),
        Ok(None) => Err(Error::invalid(
            "header",
            "the stream ended before its first message; the first message must carry the header",
        )),
        Err(status) => Err(limits.stream_error(status)),
    }
}

/// The header of an upload's first message, which must be there.
pub fn require_header<H>(header: Option<H>) -> Result<H, Status> {
    header.ok_or_else(|| {
        status(Error::invalid(
            "header",
            "the first message must carry the header",
        ))
    })
}

/// One message of a client-streamed upload, split into what the adapters need.
#[derive(Debug)]
pub struct Part<T> {
    /// The message (wrongly, unless it is the first) carries a header.
    pub has_header: bool,
    /// Its payload (bytes, chunks or entries).
    pub payload: T,
    /// The message says it is the last one.
    pub finish: bool,
}

/// Turns a client stream into the payloads of an upload, given the first
/// message's payload and `finish` flag. The stream yields an error (so the
/// store discards the upload) when a later message repeats the header, when
/// a message follows the one with `finish`, when the transport fails, and
/// when the stream ends without `finish`: HTTP/2 servers may report a client's
/// cancellation as a normal end of stream, so only `finish` proves the upload
/// is complete.
pub fn upload_parts<M: Send + 'static, T: Send + 'static>(
    first: Part<T>,
    rest: Streaming<M>,
    limits: Limits,
    split: fn(M) -> Part<T>,
) -> BoxStream<'static, Result<T, Error>> {
    let finished = first.finish;
    let head = futures::stream::once(async move { Ok(first.payload) });
    let tail = futures::stream::unfold(
        (rest, finished, false),
        move |(mut rest, finished, failed)| async move {
            if failed {
                return None;
            }
            let fail = |e: Error, rest| Some((Err(e), (rest, finished, true)));
            match rest.next().await {
                Some(Ok(message)) => {
                    let part = split(message);
                    if finished {
                        return fail(
                            Error::invalid("finish", "a message arrived after the one with finish=true; nothing was stored"),
                            rest,
                        );
                    }
                    if part.has_header {
                        return fail(
                            Error::invalid("header", "only the first message may carry a header; nothing was stored"),
                            rest,
                        );
                    }
                    Some((Ok(part.payload), (rest, part.finish, false)))
                }
                Some(Err(status)) => fail(limits.stream_error(status), rest),
                None if finished => None,
                None => fail(
                    Error::invalid(
                        "finish",
                        "the stream ended without a message with finish=true (cancelled or cut short); nothing was stored",
                    ),
                    rest,
                ),
            }
        },
    );
    head.chain(tail).boxed()
}

/// Maps a domain error to the status sent to the caller.
pub fn status(err: Error) -> Status {
    Status::from(err)
}
