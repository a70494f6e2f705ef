//! The request-body guard: how much of a caller's request the server is
//! willing to hold, and how long it waits for it.
//!
//! tonic reserves room for a whole message as soon as its 5-byte prefix
//! announces the length, and buffers until the last byte arrives. Left alone,
//! a client that announces big messages and never finishes them makes the
//! server hold gigabytes. [`IntakeBody`] reads the same gRPC framing as it
//! passes through and:
//! - charges every announced message to one server-wide [`Budget`] the moment
//!   its prefix arrives, and refuses the call at once with RESOURCE_EXHAUSTED
//!   when it does not fit (nothing was buffered yet); the charge is held until
//!   the next message starts or the request ends, which covers the message
//!   while the handler works on it;
//! - ends calls whose client stalls: no first message within the first-message
//!   timeout, no data for the idle timeout while the server waits, or a message
//!   arriving slower than the minimum rate. Time counts only while the server
//!   is waiting on the client, never while the handler is busy.
//!
//! Knows HTTP bodies and gRPC framing, never the store.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use trove_proto::Error;

/// Length of the gRPC message prefix: a compression flag and a big-endian
/// u32 length.
const PREFIX: usize = 5;

/// Messages up to this size are not charged: what they can hold is bounded
/// by the call slots (at most one such message per call), and leaving them
/// out keeps small calls flowing while big uploads fill the budget.
pub const UNCHARGED_MESSAGE_BYTES: u64 = 64 * 1024;

/// The server-wide allowance for bytes of messages being received. One
/// client address may hold at most half of it, so a single caller cannot
/// starve the others.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    per_peer: u64,
    used: AtomicU64,
    by_peer: Mutex<HashMap<IpAddr, u64>>,
}

impl Budget {
    /// A budget of `limit` bytes, of which one client address gets half.
    pub fn new(limit: u64) -> Arc<Self> {
        Self::with_peer_share(limit, limit / 2)
    }

    /// A budget of `limit` bytes, of which one client address gets
    /// `per_peer` (never less than one message of the largest size, or such
    /// a message could never be received).
    pub fn with_peer_share(limit: u64, per_peer: u64) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            per_peer: per_peer.min(limit),
            used: AtomicU64::new(0),
            by_peer: Mutex::new(HashMap::new()),
        })
    }

    /// Bytes currently charged.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `bytes` to the server and to `peer`, or says which limit
    /// refused them and how much of it is in use.
    fn try_charge(self: &Arc<Self>, bytes: u64, peer: Option<IpAddr>) -> Result<Charge, Refusal> {
        let mut by_peer = self.by_peer.lock().map_err(|_| Refusal::Server(0))?;
        if let Some(ip) = peer {
            let held = by_peer.get(&ip).copied().unwrap_or(0);
            if held.saturating_add(bytes) > self.per_peer {
                return Err(Refusal::Peer(held));
            }
        }
        let used = self.used.load(Ordering::Relaxed);
        let after = used.saturating_add(bytes);
        if after > self.limit {
            return Err(Refusal::Server(used));
        }
        self.used.store(after, Ordering::Relaxed);
        if let Some(ip) = peer {
            *by_peer.entry(ip).or_insert(0) += bytes;
        }
        metrics::gauge!("trove_pending_message_bytes").set(after as f64);
        Ok(Charge {
            budget: Arc::clone(self),
            bytes,
            peer,
        })
    }
}

/// Which share of the budget was full, and how much of it was in use.
#[derive(Debug)]
enum Refusal {
    Server(u64),
    Peer(u64),
}

/// Bytes charged to the budget; given back when dropped.
#[derive(Debug)]
struct Charge {
    budget: Arc<Budget>,
    bytes: u64,
    peer: Option<IpAddr>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let Ok(mut by_peer) = self.budget.by_peer.lock() else {
            return;
        };
        let after = self
            .budget
            .used
            .load(Ordering::Relaxed)
            .saturating_sub(self.bytes);
        self.budget.used.store(after, Ordering::Relaxed);
        if let Some(ip) = self.peer {
            if let Some(held) = by_peer.get_mut(&ip) {
                *held = held.saturating_sub(self.bytes);
                if *held == 0 {
                    by_peer.remove(&ip);
                }
            }
        }
        metrics::gauge!("trove_pending_message_bytes").set(after as f64);
    }
}

/// The limits every request body is read under.
#[derive(Debug, Clone)]
pub struct IntakeLimits {
    /// Shared by every call of the server.
    pub budget: Arc<Budget>,
    /// The first message must start arriving within this long of the call's
    /// start.
    pub first_message: Option<Duration>,
    /// Longest silence while the server waits for request data.
    pub idle: Option<Duration>,
    /// Slowest acceptable arrival of a message, in bytes per second (0: off).
    /// A message of N bytes gets the idle timeout plus N / rate to arrive.
    pub min_rate: u64,
}

impl IntakeLimits {
    /// Limits that only count bytes (for tests and embedders).
    pub fn unlimited() -> Self {
        IntakeLimits {
            budget: Budget::new(u64::MAX),
            first_message: None,
            idle: None,
            min_rate: 0,
        }
    }
}

/// Where the framing parser is inside the request body.
#[derive(Debug)]
struct Framing {
    /// Prefix bytes of the next message collected so far.
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    /// A message prefix has been seen.
    started: bool,
    /// When the current message must have fully arrived.
    /// Waiting time the current message may still take to arrive; spent
    /// only while the server waits on the client.
    message_left: Option<Duration>,
}

/// A request body read under [`IntakeLimits`]; also counts its bytes.
pub struct IntakeBody {
    inner: Body,
    count: Arc<AtomicU64>,
    limits: IntakeLimits,
    /// The caller's address, for its share of the budget.
    peer: Option<IpAddr>,
    /// When the first message must have started.
    first_due: Option<Instant>,
    framing: Framing,
    charge: Option<Charge>,
    /// Since when the server has been waiting on the client with nothing.
    waiting_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl IntakeBody {
    /// Wraps `inner` of a call from `peer`; its byte count is added to
    /// `count`.
    pub fn new(
        inner: Body,
        count: Arc<AtomicU64>,
        limits: IntakeLimits,
        peer: Option<IpAddr>,
    ) -> Self {
        let first_due = limits
            .first_message
            .and_then(|d| Instant::now().checked_add(d));
        IntakeBody {
            inner,
            count,
            limits,
            peer,
            first_due,
            framing: Framing {
                prefix: [0; PREFIX],
                prefix_len: 0,
                remaining: 0,
                started: false,
                message_left: None,
            },
            charge: None,
            waiting_since: None,
            timer: None,
            done: false,
        }
    }

    /// Follows the framing through `data`, charging each message announced.
    fn observe(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            if self.framing.remaining > 0 {
                let take = usize::try_from(self.framing.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.framing.remaining -= take as u64;
                data = &data[take..];
                if self.framing.remaining == 0 {
                    self.framing.message_left = None;
                }
                continue;
            }
            let take = (PREFIX - self.framing.prefix_len).min(data.len());
            let at = self.framing.prefix_len;
            self.framing.prefix[at..at + take].copy_from_slice(&data[..take]);
            self.framing.prefix_len += take;
            data = &data[take..];
            if self.framing.prefix_len == PREFIX {
                self.framing.prefix_len = 0;
                let p = self.framing.prefix;
                let length = u64::from(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
                self.begin_message(length)?;
            }
        }
        Ok(())
    }

    fn begin_message(&mut self, length: u64) -> Result<(), tonic::Status> {
        self.framing.started = true;
        self.first_due = None;
        // The previous message has been handed over; its charge goes first
        // so that a stream of equal messages never counts twice.
        self.charge = None;
        self.framing.remaining = length;
        self.framing.message_left = (length > 0 && self.limits.min_rate > 0).then(|| {
            let grace = self.limits.idle.unwrap_or(Duration::ZERO);
            grace.saturating_add(Duration::from_secs(length / self.limits.min_rate))
        });
        if length <= UNCHARGED_MESSAGE_BYTES {
            return Ok(());
        }
        match self.limits.budget.try_charge(length, self.peer) {
            Ok(charge) => self.charge = Some(charge),
            Err(refusal) => {
                metrics::counter!("trove_pending_budget_refusals_total").increment(1);
                let budget = &self.limits.budget;
                let (limit, message) = match refusal {
                    Refusal::Server(used) => (
                        format!("max_pending_message_bytes ({})", budget.limit),
                        format!(
                            "the server already holds {used} bytes of partly received messages \
                             and a message of {length} bytes does not fit; retry with backoff, \
                             or send smaller messages"
                        ),
                    ),
                    Refusal::Peer(held) => (
                        format!(
                            "max_pending_message_bytes per client address ({})",
                            budget.per_peer
                        ),
                        format!(
                            "this client address already has {held} bytes of partly received \
                             messages and a message of {length} bytes does not fit its share; \
                             finish or cancel other uploads, or send smaller messages"
                        ),
                    ),
                };
                return Err(tonic::Status::from(Error::exhausted(limit, message)));
            }
        }
        Ok(())
    }

    /// The earliest limit that applies while the server waits, and the
    /// status to answer when it passes.
    fn next_limit(&self) -> Option<(Instant, Stall)> {
        let mut due: Option<(Instant, Stall)> = None;
        let mut consider = |at: Option<Instant>, why: Stall| {
            if let Some(at) = at {
                if due.is_none_or(|(earliest, _)| at < earliest) {
                    due = Some((at, why));
                }
            }
        };
        if !self.framing.started {
            consider(self.first_due, Stall::FirstMessage);
        }
        if let Some(since) = self.waiting_since {
            let after = |d: Duration| since.checked_add(d);
            consider(
                self.framing.message_left.and_then(after),
                Stall::SlowMessage,
            );
            consider(self.limits.idle.and_then(after), Stall::Idle);
        }
        due
    }

    fn stalled(&self, why: Stall) -> tonic::Status {
        let secs = |d: Option<Duration>| d.map_or(0, |d| d.as_secs());
        let message = match why {
            Stall::FirstMessage => format!(
                "no request message started within {} s of the call (first_message_timeout_secs); \
                 send the first message right after the call starts; nothing was stored",
                secs(self.limits.first_message)
            ),
            Stall::Idle => format!(
                "the client sent nothing for {} s while the server waited for the rest of the \
                 request (idle_timeout_secs); nothing was stored",
                secs(self.limits.idle)
            ),
            Stall::SlowMessage => format!(
                "a message arrived slower than min_upload_rate_bytes ({} bytes/s); nothing was \
                 stored",
                self.limits.min_rate
            ),
        };
        metrics::counter!("trove_stalled_requests_total", "reason" => why.label()).increment(1);
        tonic::Status::from(Error::DeadlineExceeded { message })
    }

    fn fail(&mut self, status: tonic::Status) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        self.done = true;
        self.charge = None;
        self.timer = None;
        Poll::Ready(Some(Err(status)))
    }
}

/// Why a waiting request was given up.
#[derive(Debug, Clone, Copy)]
enum Stall {
    FirstMessage,
    Idle,
    SlowMessage,
}

impl Stall {
    fn label(self) -> &'static str {
        match self {
            Stall::FirstMessage => "first_message",
            Stall::Idle => "idle",
            Stall::SlowMessage => "slow_message",
        }
    }
}

impl HttpBody for IntakeBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // Only bytes end a wait: empty frames do not keep a call
                // alive. The wait is charged to the message being received.
                let has_bytes = frame.data_ref().is_none_or(|d| !d.is_empty());
                if has_bytes {
                    if let Some(since) = self.waiting_since.take() {
                        let waited = since.elapsed();
                        if let Some(left) = self.framing.message_left.as_mut() {
                            *left = left.saturating_sub(waited);
                        }
                    }
                }
                if let Some(data) = frame.data_ref() {
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                    let data = data.clone();
                    if let Err(status) = self.observe(&data) {
                        return self.fail(status);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.done = true;
                self.charge = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(status))) => {
                self.charge = None;
                Poll::Ready(Some(Err(status)))
            }
            Poll::Pending => {
                if self.waiting_since.is_none() {
                    self.waiting_since = Some(Instant::now());
                }
                let Some((due, why)) = self.next_limit() else {
                    return Poll::Pending;
                };
                let timer = match self.timer.as_mut() {
                    Some(timer) => {
                        if timer.deadline() != due {
                            timer.as_mut().reset(due);
                        }
                        timer
                    }
                    None => self.timer.insert(Box::pin(tokio::time::sleep_until(due))),
                };
                if timer.as_mut().poll(cx).is_ready() {
                    let status = self.stalled(why);
                    return self.fail(status);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(lengths: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &n in lengths {
            out.push(0);
            out.extend_from_slice(&n.to_be_bytes());
            out.extend(std::iter::repeat_n(7u8, n as usize));
        }
        out
    }

    async fn read_all(body: IntakeBody) -> Result<usize, tonic::Status> {
        let mut total = 0;
        let mut body = std::pin::pin!(body);
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            if let Some(data) = frame?.data_ref() {
                total += data.len();
            }
        }
        Ok(total)
    }

    /// Messages split across frames at every boundary are charged once each
    /// and the budget is whole again after the body ends.
    #[tokio::test]
    async fn framing_is_followed_across_frames() {
        let bytes = framed(&[10, 0, 100_000, 5]);
        let pieces: Vec<Result<Bytes, tonic::Status>> = bytes
            .chunks(4093)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let body = Body::new(http_body_util_stream(pieces));
        let mut limits = IntakeLimits::unlimited();
        limits.budget = Budget::new(100_000);
        let budget = Arc::clone(&limits.budget);
        let count = Arc::new(AtomicU64::new(0));
        let read = read_all(IntakeBody::new(body, Arc::clone(&count), limits, None)).await;
        assert_eq!(read.expect("fits"), bytes.len());
        assert_eq!(count.load(Ordering::Relaxed), bytes.len() as u64);
        assert_eq!(budget.used(), 0);
    }

    /// A message announced bigger than what is left is refused at its prefix;
    /// small messages pass even then.
    #[tokio::test]
    async fn over_budget_is_refused_at_the_prefix() {
        let budget = Budget::new(1_000_000);
        let held = budget.try_charge(900_000, None).expect("fits");
        let mut limits = IntakeLimits::unlimited();
        limits.budget = Arc::clone(&budget);
        let body = Body::new(http_body_util_stream(vec![Ok(Bytes::from(framed(&[
            200_000,
        ])))]));
        let err = read_all(IntakeBody::new(body, Arc::default(), limits.clone(), None))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err
            .message()
            .contains("max_pending_message_bytes (1000000)"));
        assert_eq!(budget.used(), 900_000);
        let small = Body::new(http_body_util_stream(vec![Ok(Bytes::from(framed(&[
            65_536,
        ])))]));
        read_all(IntakeBody::new(small, Arc::default(), limits, None))
            .await
            .expect("a small message is not charged");
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    /// One client address gets at most half the budget; others still fit.
    #[tokio::test]
    async fn one_peer_gets_half_the_budget() {
        let budget = Budget::new(1_000_000);
        let (a, b): (IpAddr, IpAddr) = ([127, 0, 0, 2].into(), [127, 0, 0, 3].into());
        let _held = budget.try_charge(400_000, Some(a)).expect("fits");
        let mut limits = IntakeLimits::unlimited();
        limits.budget = Arc::clone(&budget);
        let message = || {
            Body::new(http_body_util_stream(vec![Ok(Bytes::from(framed(&[
                200_000,
            ])))]))
        };
        let err = read_all(IntakeBody::new(
            message(),
            Arc::default(),
            limits.clone(),
            Some(a),
        ))
        .await
        .expect_err("over its share");
        assert!(err.message().contains("per client address"), "{err:?}");
        read_all(IntakeBody::new(message(), Arc::default(), limits, Some(b)))
            .await
            .expect("another peer fits");
        assert_eq!(budget.used(), 400_000);
    }

    /// A caller that never sends a message is cut at the first-message timeout.
    #[tokio::test(start_paused = true)]
    async fn silence_ends_at_the_first_message_timeout() {
        let body = Body::new(http_body_util_stream(Vec::new()).chain_pending());
        let mut limits = IntakeLimits::unlimited();
        limits.first_message = Some(Duration::from_secs(10));
        let err = read_all(IntakeBody::new(body, Arc::default(), limits, None))
            .await
            .expect_err("cut");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(err.message().contains("first_message_timeout_secs"));
    }

    /// A message that stops half way is cut at the idle timeout, and its
    /// charge is given back.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_message_ends_at_the_idle_timeout() {
        let mut bytes = framed(&[100_000]);
        bytes.truncate(50_000);
        let body = Body::new(http_body_util_stream(vec![Ok(Bytes::from(bytes))]).chain_pending());
        let mut limits = IntakeLimits::unlimited();
        limits.idle = Some(Duration::from_secs(30));
        let budget = Arc::clone(&limits.budget);
        let err = read_all(IntakeBody::new(body, Arc::default(), limits, None))
            .await
            .expect_err("cut");
        assert!(err.message().contains("idle_timeout_secs"), "{err:?}");
        assert_eq!(budget.used(), 0);
    }

    /// A body fed by the test through a channel.
    struct ChannelBody(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl HttpBody for ChannelBody {
        type Data = Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            self.0
                .poll_recv(cx)
                .map(|item| item.map(|b| Ok(Frame::data(b))))
        }
    }

    /// Time the handler spends between reads never counts against a
    /// message: only time spent waiting for the client does.
    #[tokio::test(start_paused = true)]
    async fn a_busy_handler_does_not_spend_the_message_allowance() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut limits = IntakeLimits::unlimited();
        limits.idle = Some(Duration::from_secs(30));
        limits.min_rate = 1024 * 1024;
        let body = IntakeBody::new(Body::new(ChannelBody(rx)), Arc::default(), limits, None);
        let mut body = std::pin::pin!(body);
        let mut message = framed(&[200_000]);
        let rest = message.split_off(100_000);
        tx.send(Bytes::from(message)).expect("send");
        let first = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert!(matches!(first, Some(Ok(_))));
        // The handler is busy for an hour; then the client needs 20 s more.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            tx.send(Bytes::from(rest)).expect("send");
        });
        let second = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert!(
            matches!(second, Some(Ok(_))),
            "cut while the handler was busy: {second:?}"
        );
        sender.await.expect("join");
    }

    /// A frame stream for tests, optionally never ending.
    struct TestStream {
        items: std::collections::VecDeque<Result<Bytes, tonic::Status>>,
        pending_at_end: bool,
    }

    fn http_body_util_stream(items: Vec<Result<Bytes, tonic::Status>>) -> TestStream {
        TestStream {
            items: items.into(),
            pending_at_end: false,
        }
    }

    impl TestStream {
        fn chain_pending(mut self) -> Self {
            self.pending_at_end = true;
            self
        }
    }

    impl HttpBody for TestStream {
        type Data = Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            match self.items.pop_front() {
                Some(item) => Poll::Ready(Some(item.map(Frame::data))),
                None if self.pending_at_end => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }
}
