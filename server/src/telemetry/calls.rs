//! The tower layer in front of every gRPC call: load shedding, deadlines,
//! metrics and the one log line per request.
//!
//! - Load shedding: at most `max_concurrent_requests` calls run at once; one
//!   more is refused at once with RESOURCE_EXHAUSTED rather than queued. Health
//!   and reflection are exempt so probes keep working under load.
//! - Deadlines: a call gets `min(request timeout, the caller's grpc-timeout)`
//!   to produce its response (for uploads, that includes receiving the whole
//!   stream); past it the caller gets DEADLINE_EXCEEDED.
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
        }
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
    /// The concurrency slot; shared with the deadline timer, which gives it
    /// back when a call outlives its deadline (a stalled reader cannot be
    /// cut while HTTP/2 flow control keeps its response from being polled).
    _permit: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>,
    /// The task that gives the slot back at the deadline; stopped when the
    /// call ends, so no per-call task outlives its call.
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

fn code_name(code: &str) -> &'static str {
    match code.trim().parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "CANCELLED",
        Ok(tonic::Code::Unknown) => "UNKNOWN",
        Ok(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Ok(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Ok(tonic::Code::NotFound) => "NOT_FOUND",
        Ok(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Ok(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Ok(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Ok(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Ok(tonic::Code::Aborted) => "ABORTED",
        Ok(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Ok(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Ok(tonic::Code::Internal) => "INTERNAL",
        Ok(tonic::Code::Unavailable) => "UNAVAILABLE",
        Ok(tonic::Code::DataLoss) => "DATA_LOSS",
        Ok(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
        Err(_) => "UNKNOWN",
    }
}

/// Methods of the services this server answers; anything else is labelled
/// `unknown` so that arbitrary paths cannot create unbounded metric series.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "trove.v1.Objects",
        &[
            "Put",
            "Get",
            "Delete",
            "Stat",
            "List",
            "FindMissing",
            "PutStream",
            "GetStream",
        ],
    ),
    (
        "trove.v1.Artifacts",
        &["Put", "Get", "Delete", "Stat", "List"],
    ),
    (
        "trove.v1.Entries",
        &[
            "Append", "Read", "Replace", "Delete", "Exists", "Ensure", "List",
        ],
    ),
    (
        "trove.v1.Cache",
        &[
            "Upload",
            "Download",
            "BranchRefs",
            "WriteBranchRefs",
            "Prune",
            "PruneAll",
            "ListRefs",
        ],
    ),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
    (
        "grpc.reflection.v1.ServerReflection",
        &["ServerReflectionInfo"],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &["ServerReflectionInfo"],
    ),
];

/// The `(service, method)` labels for a request path.
fn labels(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    match KNOWN.iter().find(|(s, _)| *s == service) {
        Some((s, methods)) if methods.contains(&method) => ((*s).to_owned(), method.to_owned()),
        Some((s, _)) => ((*s).to_owned(), "unknown".to_owned()),
        None => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

/// Parses a `grpc-timeout` header value (`<up to 8 digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
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

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (service, method) = labels(request.uri().path());
        let exempt = service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.");
        let permit = if exempt {
            None
        } else {
            match Arc::clone(&self.settings.limiter).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    metrics::counter!("trove_requests_shed_total", "service" => service.clone(), "method" => method.clone())
                        .increment(1);
                    metrics::gauge!("trove_requests_in_flight").increment(1.0);
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
                        _permit: Arc::new(std::sync::Mutex::new(None)),
                    });
                    let status = tonic::Status::resource_exhausted(format!(
                        "max_concurrent_requests ({}) exceeded: the server is at capacity; retry with backoff",
                        self.settings.max_concurrent
                    ));
                    return Box::pin(async move { Ok(status.into_http()) });
                }
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
        let mut request = request;
        request.extensions_mut().insert(note.clone());
        let request = request.map(|body| {
            Body::new(CountingBody {
                inner: body,
                count: Arc::clone(&bytes_in),
            })
        });
        metrics::gauge!("trove_requests_in_flight").increment(1.0);
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
            _permit: Arc::new(std::sync::Mutex::new(permit)),
        };
        let limit = self.settings.max_message_bytes;
        // The clone is the one that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let expires = deadline.map(|d| tokio::time::Instant::now() + d);
        if let Some(at) = expires {
            let slot = Arc::downgrade(&record._permit);
            let timer = tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                if let Some(slot) = slot.upgrade() {
                    if let Ok(mut permit) = slot.lock() {
                        permit.take();
                    }
                }
            });
            record.deadline_timer = Some(timer.abort_handle());
        }
        Box::pin(async move {
            let call = inner.call(request);
            let response = match deadline {
                Some(deadline) => match tokio::time::timeout(deadline, call).await {
                    Ok(result) => result?,
                    Err(_) => tonic::Status::deadline_exceeded(format!(
                        "the call did not complete within its deadline of {} ms",
                        deadline.as_millis()
                    ))
                    .into_http(),
                },
                None => call.await?,
            };
            let (mut parts, body) = response.into_parts();
            oversize_is_resource_exhausted(&mut parts.headers, limit);
            record.status = parts
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = CountedBody {
                inner: body,
                record: Some(record),
                deadline: expires.map(|at| Box::pin(tokio::time::sleep_until(at))),
                expired: false,
            };
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// Counts the bytes of a request body.
struct CountingBody {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl HttpBody for CountingBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Watches a response body: bytes out, the final status, and the end of the
/// call (normal, or the caller went away).
struct CountedBody {
    inner: Body,
    record: Option<CallRecord>,
    /// The call's deadline also bounds a streamed response: a download whose
    /// reader stalls cannot hold its slot forever.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: bool,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.expired {
            return Poll::Ready(None);
        }
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                self.expired = true;
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
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
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
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric labels are bounded: unknown services and methods collapse to "unknown".
    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            labels("/trove.v1.Objects/Put"),
            ("trove.v1.Objects".into(), "Put".into())
        );
        assert_eq!(
            labels("/trove.v1.Objects/Nope"),
            ("trove.v1.Objects".into(), "unknown".into())
        );
        assert_eq!(labels("/x.y/z"), ("unknown".into(), "unknown".into()));
        assert_eq!(labels(""), ("unknown".into(), "unknown".into()));
    }

    /// grpc-timeout values in every unit parse; malformed ones are ignored.
    #[test]
    fn grpc_timeout_parsing() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        for bad in ["", "m", "10x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
