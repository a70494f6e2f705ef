//! A small raw HTTP/2 gRPC client for hostile-client tests: it can do what a
//! well-behaved gRPC library never does (announce a message and not finish
//! it, send only headers, never read a response), from a chosen loopback
//! source address so the server sees it as a separate peer. And the probes
//! that read a process's resident memory and open file descriptors.

use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};

/// A source address on loopback other than 127.0.0.1, so the server counts
/// the hostile client as a different peer from the well-behaved one.
pub const HOSTILE_PEER: [u8; 4] = [127, 0, 0, 2];

/// One HTTP/2 connection to `addr` from `from` (any free port).
pub async fn connect(addr: SocketAddr, from: IpAddr) -> SendRequest<Bytes> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind source");
    let tcp = socket.connect(addr).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        // Generous windows so the client, not flow control, decides how
        // much the server receives.
        .initial_window_size(16 * 1024 * 1024)
        .initial_connection_window_size(64 * 1024 * 1024)
        .handshake(tcp)
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The same, with the default 64 KiB windows: a client that then never
/// reads leaves the server's responses blocked by flow control.
pub async fn connect_small_window(addr: SocketAddr, from: IpAddr) -> SendRequest<Bytes> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind source");
    let tcp = socket.connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Starts a gRPC call on `path`; returns the response future and the
/// request stream (still open).
pub async fn start_call(
    client: &mut SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    timeout: Option<&str>,
) -> (h2::client::ResponseFuture, SendStream<Bytes>) {
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        builder = builder.header("grpc-timeout", timeout);
    }
    let request = builder.body(()).expect("request");
    let mut ready = client.clone().ready().await.expect("connection ready");
    let started = ready.send_request(request, false).expect("send request");
    *client = ready;
    started
}

/// The 5-byte gRPC prefix of an uncompressed message of `length` bytes.
pub fn prefix(length: u32) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&length.to_be_bytes());
    Bytes::from(out)
}

/// A whole gRPC message frame around an encoded protobuf.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = prefix(u32::try_from(message.len()).expect("small message")).to_vec();
    out.extend_from_slice(message);
    Bytes::from(out)
}

/// Sends `data` as flow control allows; `false` when the server reset or
/// closed the stream first.
pub async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> bool {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            _ => return false,
        };
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        if send.send_data(piece, false).is_err() {
            return false;
        }
    }
    true
}

/// The grpc-status (and message) a call ended with: from the headers of a
/// trailers-only answer, else from the trailers after reading the body.
/// `None` when the stream was reset without a status.
pub async fn status_of(response: h2::client::ResponseFuture) -> Option<(i32, String)> {
    let response = response.await.ok()?;
    if let Some(found) = grpc_status(response.headers()) {
        return Some(found);
    }
    let mut body: RecvStream = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.ok()??;
    grpc_status(&trailers)
}

fn grpc_status(headers: &http::HeaderMap) -> Option<(i32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .replace("%20", " ");
    Some((code, message))
}

/// Resident memory of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Polls until process `pid` holds at most `most` file descriptors, for up
/// to `within`; returns the last count.
pub async fn fds_settle(pid: u32, most: usize, within: Duration) -> usize {
    let until = tokio::time::Instant::now() + within;
    loop {
        let now = open_fds(pid);
        if now <= most || tokio::time::Instant::now() >= until {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
