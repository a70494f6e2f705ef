//! Fair shares between callers: how many connections and calls one peer
//! address may hold, and a way to close a connection whose caller keeps
//! streams open past their deadline.
//!
//! Every accepted connection is wrapped in a [`GuardedConn`]: it counts
//! against its peer's connection cap (a connection over the cap is closed at
//! once) and carries a [`ConnHandle`] into every call's extensions, through
//! which the call layer charges the peer's call cap and, as a last resort,
//! closes the connection. Closing is the only way to take back a response
//! stream that HTTP/2 flow control holds: the server cannot send on it, and
//! so cannot even reset it, until the client reads.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// Counts what each peer address holds, up to a cap.
#[derive(Debug)]
pub struct PeerCounter {
    /// Most held per peer; `usize::MAX` when there is no cap.
    cap: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl PeerCounter {
    /// A counter allowing `cap` per peer (0: no cap).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(PeerCounter {
            cap: if cap == 0 { usize::MAX } else { cap },
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The cap (`usize::MAX` when there is none).
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Takes one for `peer`, or `None` when it already holds the cap.
    pub fn try_take(self: &Arc<Self>, peer: IpAddr) -> Option<PeerTicket> {
        let mut held = self.held.lock().ok()?;
        let count = held.entry(peer).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(PeerTicket {
            counter: Arc::clone(self),
            peer,
        })
    }

    /// How many `peer` holds.
    pub fn held_by(&self, peer: IpAddr) -> usize {
        self.held
            .lock()
            .map(|held| held.get(&peer).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// One unit held by a peer; given back when dropped.
#[derive(Debug)]
pub struct PeerTicket {
    counter: Arc<PeerCounter>,
    peer: IpAddr,
}

impl Drop for PeerTicket {
    fn drop(&mut self) {
        if let Ok(mut held) = self.counter.held.lock() {
            if let Some(count) = held.get_mut(&self.peer) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    held.remove(&self.peer);
                }
            }
        }
    }
}

/// What a call learns about its connection.
#[derive(Debug)]
pub struct ConnHandle {
    /// The peer's address, when the socket knows it.
    pub peer: Option<IpAddr>,
    closer: CancellationToken,
}

impl ConnHandle {
    /// Closes the connection: every stream on it ends and its bodies are
    /// dropped.
    pub fn close(&self) {
        self.closer.cancel();
    }
}

/// What a guarded connection puts in each call's extensions: the inner
/// connection's own information and the handle.
#[derive(Debug, Clone)]
pub struct GuardedInfo<I> {
    /// The wrapped connection's information.
    pub inner: I,
    /// The connection's handle.
    pub conn: Arc<ConnHandle>,
}

/// A connection counted against its peer's cap and closable by its calls.
pub struct GuardedConn<C> {
    inner: C,
    handle: Arc<ConnHandle>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    _ticket: Option<PeerTicket>,
}

impl<C> GuardedConn<C> {
    /// Wraps `inner` from `peer`, or hands it back when the peer already
    /// holds as many connections as `connections` allows.
    pub fn admit(
        inner: C,
        peer: Option<IpAddr>,
        connections: &Arc<PeerCounter>,
    ) -> Result<Self, C> {
        let ticket = match peer {
            Some(ip) => match connections.try_take(ip) {
                Some(ticket) => Some(ticket),
                None => return Err(inner),
            },
            None => None,
        };
        let closer = CancellationToken::new();
        let closed = Box::pin(closer.clone().cancelled_owned());
        Ok(GuardedConn {
            inner,
            handle: Arc::new(ConnHandle { peer, closer }),
            closed,
            _ticket: ticket,
        })
    }

    fn aborted() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed by the server: a call outlived its deadline without being read",
        )
    }
}

impl<C: Connected> Connected for GuardedConn<C> {
    type ConnectInfo = GuardedInfo<C::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        GuardedInfo {
            inner: self.inner.connect_info(),
            conn: Arc::clone(&self.handle),
        }
    }
}

impl<C: AsyncRead + Unpin> AsyncRead for GuardedConn<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // The connection task always waits on a read, so this is where a
        // close request wakes it.
        if self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Self::aborted()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for GuardedConn<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.handle.closer.is_cancelled() {
            return Poll::Ready(Err(Self::aborted()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.handle.closer.is_cancelled() {
            return Poll::Ready(Err(Self::aborted()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer at its cap is refused until it gives one back; other peers are
    /// unaffected.
    #[test]
    fn peers_are_capped_separately() {
        let counter = PeerCounter::new(2);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let first = counter.try_take(a).expect("first");
        let _second = counter.try_take(a).expect("second");
        assert!(counter.try_take(a).is_none());
        assert!(counter.try_take(b).is_some());
        drop(first);
        assert!(counter.try_take(a).is_some());
        assert_eq!(counter.held_by(b), 0, "released tickets leave no entry");
    }

    /// A cap of 0 means none.
    #[test]
    fn zero_means_no_cap() {
        let counter = PeerCounter::new(0);
        let a: IpAddr = [10, 0, 0, 1].into();
        let tickets: Vec<_> = (0..10_000).filter_map(|_| counter.try_take(a)).collect();
        assert_eq!(tickets.len(), 10_000);
    }

    /// Closing a connection fails its pending read at once.
    #[tokio::test]
    async fn closing_wakes_the_reader() {
        use tokio::io::AsyncReadExt;
        let (client, server) = tokio::io::duplex(64);
        let counter = PeerCounter::new(1);
        let peer = Some(IpAddr::from([127, 0, 0, 1]));
        let Ok(mut conn) = GuardedConn::admit(server, peer, &counter) else {
            panic!("the first connection is admitted");
        };
        assert!(
            GuardedConn::admit(tokio::io::duplex(1).1, peer, &counter).is_err(),
            "second connection over the cap"
        );
        let handle = Arc::clone(&conn.handle);
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            conn.read(&mut buf).await
        });
        handle.close();
        let read = reading.await.expect("join");
        assert_eq!(
            read.expect_err("aborted").kind(),
            std::io::ErrorKind::ConnectionAborted
        );
        drop(client);
        assert_eq!(counter.held_by([127, 0, 0, 1].into()), 0);
    }
}
