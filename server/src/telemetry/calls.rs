//! The tower layer in front of every gRPC call: admission, deadlines,
//! metrics and the one log line per request.
//!
//! - Admission: at most `max_concurrent_requests` calls run at once, and at
//!   most `max_calls_per_peer` of them from one client address; one more is
//!   refused at once with RESOURCE_EXHAUSTED rather than queued. Health and
//!   reflection have a small slot pool of their own, so probes keep working
//!   under load and cannot take the calls' slots.
//! - Request bodies are read under the intake guard ([`crate::guard::intake`]):
//!   a server-wide budget for partly received messages, and limits on how
//!   long a stalled client is waited for.
//! - Deadlines: a call gets `min(request timeout, the caller's grpc-timeout)`
//!   to produce its response (for uploads, that includes receiving the whole
//!   stream); past it the caller gets DEADLINE_EXCEEDED. A response still
//!   streaming at the deadline is dropped (file handles included) and its
//!   slot given back then; if its caller is not even reading, the connection
//!   is closed after a short grace, since flow control leaves no other way to
//!   end the stream.
//! - Metrics and logs: recorded when the response body ends (or the caller
//!   goes away), with the final grpc-status from the trailers, the bytes in
//!   and out and the duration. Payloads are never logged.
//!
//! This module knows HTTP and gRPC framing, never the store.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::http;
use tower::{Layer, Service};
use trove_proto::Error;

use super::names::{code_name, labels, parse_grpc_timeout};
use crate::access::tls::PeerInfo;
use crate::guard::intake::IntakeBody;
use crate::guard::peers::PeerTicket;
use crate::guard::{self, ConnHandle, GuardedInfo, Guards};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Settings of the layer.
#[derive(Debug, Clone)]
pub struct CallLayer {
    limiter: Arc<Semaphore>,
    max_concurrent: usize,
    timeout: Option<Duration>,
    max_message_bytes: usize,
    /// Told when a call is answered DATA_LOSS (stored data found damaged).
    damage: Option<Arc<tokio::sync::watch::Sender<u64>>>,
    /// Slots of health and reflection calls.
    probes: Arc<Semaphore>,
    guards: Guards,
}

impl CallLayer {
    /// A layer admitting `max_concurrent` calls, each bounded by `timeout`.
    pub fn new(max_concurrent: usize, timeout: Option<Duration>, max_message_bytes: usize) -> Self {
        CallLayer {
            limiter: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            timeout,
            max_message_bytes,
            damage: None,
            probes: Arc::new(Semaphore::new(guard::PROBE_CONCURRENCY)),
            guards: Guards::unlimited(),
        }
    }

    /// Reads request bodies and admits callers under `guards`.
    #[must_use]
    pub fn with_guards(mut self, guards: Guards) -> Self {
        self.guards = guards;
        self
    }

    /// Counts every DATA_LOSS answer on `damage` (the server turns it into
    /// a health status).
    #[must_use]
    pub fn with_damage_signal(mut self, damage: Arc<tokio::sync::watch::Sender<u64>>) -> Self {
        self.damage = Some(damage);
        self
    }
}

impl<S> Layer<S> for CallLayer {
    type Service = CallService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallService {
            inner,
            settings: self.clone(),
        }
    }
}

/// What the layers and adapters below this one learn about a call (who
/// made it, in which namespace, whether it writes or deletes), for its audit
/// line and the per-principal metrics. Travels in the request's extensions.
#[derive(Debug, Clone, Default)]
pub struct CallNote(Arc<std::sync::Mutex<NoteFields>>);

/// The fields of a [`CallNote`].
#[derive(Debug, Clone, Default)]
pub struct NoteFields {
    /// The authenticated principal.
    pub principal: Option<String>,
    /// The namespace the call addressed.
    pub namespace: Option<String>,
    /// The call writes or deletes, or was denied: it gets an audit line.
    pub audited: bool,
}

impl CallNote {
    /// Updates the note.
    pub fn update(&self, change: impl FnOnce(&mut NoteFields)) {
        if let Ok(mut fields) = self.0.lock() {
            change(&mut fields);
        }
    }

    fn read(&self) -> NoteFields {
        self.0.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// The service produced by [`CallLayer`].
#[derive(Debug, Clone)]
pub struct CallService<S> {
    inner: S,
    settings: CallLayer,
}

/// What the finished-call record needs.
struct CallRecord {
    service: String,
    method: String,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
    status: Option<String>,
    /// What the layers below learnt about the call.
    note: CallNote,
    /// Where DATA_LOSS answers are counted.
    damage: Option<Arc<tokio::sync::watch::Sender<u64>>>,
    /// The response body reached its end (or an error) rather than being dropped.
    ended: bool,
    /// The call's slot; shared with the deadline timer, which gives it back
    /// once it has dropped a response still streaming at the deadline.
    slot: Arc<std::sync::Mutex<Option<Slot>>>,
    /// The task that ends the call at its deadline; stopped when the call
    /// ends, so no per-call task outlives its call.
    deadline_timer: Option<tokio::task::AbortHandle>,
}

impl Drop for CallRecord {
    /// Records the call whenever it ends: response finished, caller gone, or
    /// the handler dropped before answering.
    fn drop(&mut self) {
        if let Some(timer) = self.deadline_timer.take() {
            timer.abort();
        }
        let clean = self.ended && self.status.is_none() || self.status.is_some();
        self.finish(clean);
    }
}

impl CallRecord {
    fn finish(&self, ended_cleanly: bool) {
        let code = match (&self.status, ended_cleanly) {
            (Some(code), _) => code_name(code),
            (None, true) => "OK",
            (None, false) => "CANCELLED",
        };
        let elapsed = self.started.elapsed();
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let labels = [
            ("service", self.service.clone()),
            ("method", self.method.clone()),
            ("code", code.to_owned()),
        ];
        metrics::counter!("trove_requests_total", &labels).increment(1);
        metrics::histogram!("trove_request_duration_seconds", &labels)
            .record(elapsed.as_secs_f64());
        let by_method = [
            ("service", self.service.clone()),
            ("method", self.method.clone()),
        ];
        metrics::counter!("trove_request_bytes_total", &by_method).increment(bytes_in);
        metrics::counter!("trove_response_bytes_total", &by_method).increment(self.bytes_out);
        metrics::gauge!("trove_requests_in_flight").decrement(1.0);
        let note = self.note.read();
        if let Some(principal) = &note.principal {
            metrics::counter!(
                "trove_requests_by_principal_total",
                "principal" => principal.clone(),
                "code" => code
            )
            .increment(1);
        }
        if code == "DATA_LOSS" {
            metrics::counter!(
                "trove_data_loss_total",
                "service" => self.service.clone(),
                "method" => self.method.clone()
            )
            .increment(1);
            tracing::error!(
                service = %self.service,
                method = %self.method,
                "stored data found damaged; the call was answered DATA_LOSS"
            );
            if let Some(damage) = &self.damage {
                damage.send_modify(|seen| *seen += 1);
            }
        }
        let denied = matches!(code, "UNAUTHENTICATED" | "PERMISSION_DENIED");
        if note.audited || denied {
            tracing::info!(
                target: "trove_server::audit",
                principal = note.principal.as_deref().unwrap_or("-"),
                namespace = note.namespace.as_deref().unwrap_or("-"),
                service = %self.service,
                method = %self.method,
                status = code,
                "audit"
            );
        }
        tracing::info!(
            target: "trove_server::request",
            service = %self.service,
            method = %self.method,
            status = code,
            duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            bytes_in,
            bytes_out = self.bytes_out,
            "request"
        );
    }
}

/// tonic rejects an oversize unary message itself, with OUT_OF_RANGE, before
/// any adapter runs. Trove promises RESOURCE_EXHAUSTED naming the limit, and
/// nothing in Trove emits OUT_OF_RANGE, so the status is rewritten here.
fn oversize_is_resource_exhausted(headers: &mut http::HeaderMap, limit: usize) {
    const OUT_OF_RANGE: &str = "11";
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) != Some(OUT_OF_RANGE) {
        return;
    }
    let code = (tonic::Code::ResourceExhausted as i32).to_string();
    if let Ok(code) = http::HeaderValue::from_str(&code) {
        headers.insert("grpc-status", code);
    }
    let message = format!(
        "max_message_bytes ({limit}) exceeded: a message is larger than the server accepts; send large values in several messages"
    );
    if let Ok(message) = http::HeaderValue::from_str(&message) {
        headers.insert("grpc-message", message);
    }
    if let Ok(limit) = http::HeaderValue::from_str(&format!("max_message_bytes ({limit})")) {
        headers.insert("trove-limit", limit);
    }
}

/// What an admitted call holds until its response body is dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _peer: Option<PeerTicket>,
}

impl<S> CallService<S> {
    /// A slot for the call, or the RESOURCE_EXHAUSTED error saying which
    /// limit refused it.
    fn admit(&self, probe: bool, conn: Option<&ConnHandle>) -> Result<Slot, Error> {
        let settings = &self.settings;
        if probe {
            return match Arc::clone(&settings.probes).try_acquire_owned() {
                Ok(permit) => Ok(Slot {
                    _permit: permit,
                    _peer: None,
                }),
                Err(_) => Err(Error::exhausted(
                    format!("health and reflection calls ({})", guard::PROBE_CONCURRENCY),
                    "too many health or reflection calls at once; retry with backoff",
                )),
            };
        }
        let peer = match conn.and_then(|c| c.peer) {
            Some(ip) => {
                let counter = &settings.guards.calls_per_peer;
                match counter.try_take(ip) {
                    Some(ticket) => Some(ticket),
                    None => {
                        return Err(Error::exhausted(
                            format!("max_calls_per_peer ({})", counter.cap()),
                            format!(
                                "this client address ({ip}) already holds {} calls; finish or \
                                 cancel some, or retry with backoff",
                                counter.cap()
                            ),
                        ))
                    }
                }
            }
            None => None,
        };
        match Arc::clone(&settings.limiter).try_acquire_owned() {
            Ok(permit) => Ok(Slot {
                _permit: permit,
                _peer: peer,
            }),
            Err(_) => Err(Error::exhausted(
                format!("max_concurrent_requests ({})", settings.max_concurrent),
                "the server is at capacity; retry with backoff",
            )),
        }
    }
}

/// Takes what a guarded connection put in the request: the connection's
/// handle, and its peer information where the access layer expects it.
fn take_connection(request: &mut http::Request<Body>) -> Option<Arc<ConnHandle>> {
    let info = request.extensions_mut().remove::<GuardedInfo<PeerInfo>>()?;
    request.extensions_mut().insert(info.inner);
    Some(info.conn)
}

impl<S> Service<http::Request<Body>> for CallService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let (service, method) = labels(request.uri().path());
        let conn = take_connection(&mut request);
        let probe = service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.");
        metrics::gauge!("trove_requests_in_flight").increment(1.0);
        let slot = match self.admit(probe, conn.as_deref()) {
            Ok(slot) => slot,
            Err(refusal) => {
                metrics::counter!("trove_requests_shed_total", "service" => service.clone(), "method" => method.clone())
                    .increment(1);
                // Recorded like any call (RESOURCE_EXHAUSTED), so error
                // rates and request logs show the overload.
                drop(CallRecord {
                    service,
                    method,
                    started: Instant::now(),
                    bytes_in: Arc::new(AtomicU64::new(0)),
                    bytes_out: 0,
                    status: Some((tonic::Code::ResourceExhausted as i32).to_string()),
                    note: CallNote::default(),
                    damage: None,
                    deadline_timer: None,
                    ended: true,
                    slot: Arc::new(std::sync::Mutex::new(None)),
                });
                let status = tonic::Status::from(refusal);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let caller_deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let deadline = match (self.settings.timeout, caller_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let bytes_in = Arc::new(AtomicU64::new(0));
        let note = CallNote::default();
        request.extensions_mut().insert(note.clone());
        let intake = self.settings.guards.intake.clone();
        let peer = conn.as_ref().and_then(|c| c.peer);
        let request = request
            .map(|body| Body::new(IntakeBody::new(body, Arc::clone(&bytes_in), intake, peer)));
        let mut record = CallRecord {
            service,
            method,
            started: Instant::now(),
            bytes_in,
            bytes_out: 0,
            status: None,
            note,
            damage: self.settings.damage.clone(),
            deadline_timer: None,
            ended: false,
            slot: Arc::new(std::sync::Mutex::new(Some(slot))),
        };
        let limit = self.settings.max_message_bytes;
        // The clone is the one that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let response_body: SharedBody = Arc::default();
        let expires = deadline.map(|d| tokio::time::Instant::now() + d);
        if let Some(at) = expires {
            let timer = tokio::spawn(end_at_deadline(
                at,
                Arc::clone(&response_body),
                Arc::downgrade(&record.slot),
                conn,
            ));
            record.deadline_timer = Some(timer.abort_handle());
        }
        // tonic's own grpc-timeout handling wraps this layer and answers
        // CANCELLED ("Timeout expired") when it fires first: the answer is
        // given a moment before the caller's deadline, so that the caller
        // reliably gets DEADLINE_EXCEEDED naming its deadline.
        let answer_within = match (deadline, caller_deadline) {
            (Some(applied), Some(callers)) if applied == callers => {
                Some(applied.saturating_sub((applied / 100).clamp(HEAD_START, 10 * HEAD_START)))
            }
            _ => deadline,
        };
        Box::pin(async move {
            let call = inner.call(request);
            let response = match (deadline, answer_within) {
                (Some(deadline), Some(within)) => match tokio::time::timeout(within, call).await {
                    Ok(result) => result?,
                    Err(_) => tonic::Status::deadline_exceeded(format!(
                        "the call did not complete within its deadline of {} ms",
                        deadline.as_millis()
                    ))
                    .into_http(),
                },
                _ => call.await?,
            };
            let (mut parts, body) = response.into_parts();
            oversize_is_resource_exhausted(&mut parts.headers, limit);
            record.status = parts
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let end_stream = body.is_end_stream();
            if let Ok(mut shared) = response_body.lock() {
                *shared = Some(body);
            }
            let body = CountedBody {
                inner: response_body,
                record: Some(record),
                deadline: expires.map(|at| Box::pin(tokio::time::sleep_until(at))),
                finished: end_stream,
            };
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// How much earlier than a caller's deadline its answer is due, at least
/// (see `answer_within`): more than the timer's 1 ms resolution.
const HEAD_START: Duration = Duration::from_millis(2);

/// A response body the deadline timer can take away from the connection.
type SharedBody = Arc<std::sync::Mutex<Option<Body>>>;

/// Ends a call at its deadline: drops a response body still streaming (and
/// with it the file or store handle it reads from), gives the slot back, and
/// closes the connection if the caller has not let the stream end within
/// [`guard::STALLED_RESPONSE_GRACE`]. Aborted when the call ends first.
async fn end_at_deadline(
    at: tokio::time::Instant,
    body: SharedBody,
    slot: std::sync::Weak<std::sync::Mutex<Option<Slot>>>,
    conn: Option<Arc<ConnHandle>>,
) {
    tokio::time::sleep_until(at).await;
    let dropped = body.lock().ok().and_then(|mut b| b.take());
    drop(dropped);
    if let Some(slot) = slot.upgrade() {
        if let Ok(mut slot) = slot.lock() {
            slot.take();
        }
    }
    tokio::time::sleep(guard::STALLED_RESPONSE_GRACE).await;
    if let Some(conn) = conn {
        metrics::counter!("trove_connections_closed_total", "reason" => "stalled_response")
            .increment(1);
        tracing::warn!(
            peer = ?conn.peer,
            "closing a connection: a response stayed unread past its deadline"
        );
        conn.close();
    }
}

/// Watches a response body: bytes out, the final status, and the end of the
/// call (normal, or the caller went away).
struct CountedBody {
    inner: SharedBody,
    record: Option<CallRecord>,
    /// The call's deadline also bounds a streamed response: a download whose
    /// reader stalls cannot hold its slot forever.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    finished: bool,
}

impl CountedBody {
    /// Ends the stream with DEADLINE_EXCEEDED trailers.
    fn expire(&mut self) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        self.finished = true;
        if let Ok(mut inner) = self.inner.lock() {
            inner.take();
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("4"));
        trailers.insert(
            "grpc-message",
            http::HeaderValue::from_static("the call did not complete within its deadline"),
        );
        if let Some(mut record) = self.record.take() {
            record.status = Some("4".to_owned());
            record.ended = true;
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return self.expire();
            }
        }
        let polled = {
            let Ok(mut inner) = self.inner.lock() else {
                return self.expire();
            };
            match inner.as_mut() {
                Some(body) => Pin::new(body).poll_frame(cx),
                // The deadline timer took it.
                None => {
                    drop(inner);
                    return self.expire();
                }
            }
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(record) = self.record.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        record.bytes_out += data.len() as u64;
                    }
                    if let Some(trailers) = frame.trailers_ref() {
                        if let Some(code) =
                            trailers.get("grpc-status").and_then(|v| v.to_str().ok())
                        {
                            record.status = Some(code.to_owned());
                        }
                    }
                }
            }
            Poll::Ready(None) => {
                self.finished = true;
                if let Some(mut record) = self.record.take() {
                    record.ended = true;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.record.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
