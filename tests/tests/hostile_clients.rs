//! One client cannot take the server down: each hostile pattern is played by
//! a raw HTTP/2 client from 127.0.0.2 against the real binary at its default
//! limits, while a well-behaved client on 127.0.0.1 keeps making calls. Each
//! test asserts the server's peak resident memory stays under the bound the
//! README documents, that no file descriptor is left behind once the hostile
//! client is gone, and that the well-behaved client got correct answers
//! throughout. Figures are printed (`--nocapture`) for the README's table.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use trove_proto::pb;
use trove_proto::types::{Name, Namespace};
use trove_proto::{ArtifactStore, ObjectStore};
use trove_tests::harness::{scrape, ServerProcess};
use trove_tests::raw::{self, HOSTILE_PEER};
use trove_tests::{bytes_stream, collect_bytes};

/// The bound the README's robustness section promises for a server at its
/// defaults under any one of these patterns.
const RSS_BOUND_MIB: u64 = 512;

/// Extra descriptors tolerated after a pattern (log files, sled's threads
/// opening and closing segments).
const FD_SLACK: usize = 8;

fn hostile() -> IpAddr {
    IpAddr::from(HOSTILE_PEER)
}

/// Samples the server's resident memory until stopped; keeps the peak.
struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(raw::rss_mib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(raw::rss_mib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        PeakRss { peak, stop, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// A well-behaved client making round trips until stopped; counts them and
/// fails the test on any wrong answer.
struct Bystander {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Bystander {
    async fn start(server: &ServerProcess) -> Self {
        let client = server.client().await;
        let stop = Arc::new(AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let ns = Namespace::new("bystander").expect("ns");
            let mut rounds = 0u64;
            loop {
                let key = Name::new("key", format!("k{}", rounds % 8)).expect("key");
                let value = Bytes::from(format!("value {rounds}"));
                client
                    .put_artifact(
                        &ns,
                        &key,
                        Default::default(),
                        bytes_stream(vec![value.clone()]),
                    )
                    .await
                    .expect("a well-behaved put is served beside the hostile client");
                let (_, body) = client
                    .get_artifact(&ns, &key)
                    .await
                    .expect("a well-behaved get is served beside the hostile client");
                assert_eq!(collect_bytes(body).await.expect("read"), value);
                rounds += 1;
                if halt.load(Ordering::Relaxed) {
                    return rounds;
                }
            }
        });
        Bystander { stop, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .expect("the well-behaved client never saw a wrong answer")
    }
}

/// Prints one row of the README's table and checks the bounds.
fn report(pattern: &str, peak_rss: u64, fds_before: usize, fds_peak: usize, fds_after: usize) {
    println!(
        "pattern={pattern} peak_rss_mib={peak_rss} fds_before={fds_before} fds_peak={fds_peak} fds_after={fds_after}"
    );
    assert!(
        peak_rss < RSS_BOUND_MIB,
        "{pattern}: peak RSS {peak_rss} MiB, bound {RSS_BOUND_MIB} MiB"
    );
    assert!(
        fds_after <= fds_before + FD_SLACK,
        "{pattern}: {fds_after} descriptors after, {fds_before} before"
    );
}

/// Item 1: 144 uploads each announce a 16 MiB message and send all but
/// 1 KiB of it. The server charges each announced message to its budget
/// for partly received messages (256 MiB by default): the ones that do not
/// fit are refused at once with RESOURCE_EXHAUSTED, not buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_messages_are_bounded_by_the_budget() {
    let server = ServerProcess::start().await;
    let pid = server.pid();
    let fds_before = raw::open_fds(pid);
    let bystander = Bystander::start(&server).await;
    let peak = PeakRss::start(pid);
    const LENGTH: u32 = 16 * 1024 * 1024;
    let body = Bytes::from(vec![0u8; LENGTH as usize - 1024]);
    let mut conn = raw::connect(server.addr, hostile()).await;
    let mut calls = Vec::new();
    for _ in 0..144 {
        let (response, mut send) =
            raw::start_call(&mut conn, server.addr, "/trove.v1.Objects/Put", None).await;
        let body = body.clone();
        calls.push(tokio::spawn(async move {
            let sent = raw::send_all(&mut send, raw::prefix(LENGTH)).await
                && raw::send_all(&mut send, body).await;
            (sent, response, send)
        }));
    }
    let mut held = Vec::new();
    let mut refused = 0;
    for call in calls {
        let (sent, response, send) = call.await.expect("join");
        if sent {
            held.push((response, send));
        } else {
            let (code, message) = raw::status_of(response).await.expect("a status");
            assert_eq!(code, tonic::Code::ResourceExhausted as i32, "{message}");
            assert!(message.contains("max_pending_message_bytes"), "{message}");
            refused += 1;
        }
    }
    let fds_peak = raw::open_fds(pid);
    let rounds = bystander.finish().await;
    let peak_rss = peak.finish().await;
    println!(
        "held {} uploads, refused {refused}; bystander made {rounds} round trips",
        held.len()
    );
    drop(held);
    drop(conn);
    let fds_after = raw::fds_settle(pid, fds_before + FD_SLACK, Duration::from_secs(30)).await;
    report(
        "partial 16 MiB messages x144",
        peak_rss,
        fds_before,
        fds_peak,
        fds_after,
    );
    assert!(refused >= 144 - 16, "only {refused} of 144 refused");
    assert!(rounds > 0);
}

/// Item 2: health and reflection have their own small slot pool and a
/// 4 KiB message limit: 600 health checks announcing 4 MiB and 200
/// reflection calls that stall half way are answered at once or at their
/// deadline, and hold nothing after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_capped() {
    let server = ServerProcess::start().await;
    let pid = server.pid();
    let fds_before = raw::open_fds(pid);
    let bystander = Bystander::start(&server).await;
    let peak = PeakRss::start(pid);
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(raw::connect(server.addr, hostile()).await);
    }
    let mut calls = Vec::new();
    for _ in 0..200 {
        let (response, mut send) = raw::start_call(
            &mut conns[3],
            server.addr,
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            Some("3S"),
        )
        .await;
        calls.push(tokio::spawn(async move {
            // Announces 2 KiB (within the limit) and sends half.
            let _ = raw::send_all(&mut send, raw::prefix(2048)).await
                && raw::send_all(&mut send, Bytes::from(vec![0u8; 1024])).await;
            let status = raw::status_of(response).await;
            drop(send);
            status
        }));
    }
    let big = Bytes::from(vec![0u8; 1024 * 1024]);
    for i in 0..600 {
        let conn = &mut conns[i % 3];
        let (response, mut send) = raw::start_call(
            conn,
            server.addr,
            "/grpc.health.v1.Health/Check",
            Some("3S"),
        )
        .await;
        let big = big.clone();
        calls.push(tokio::spawn(async move {
            let _ = raw::send_all(&mut send, raw::prefix(4 * 1024 * 1024)).await
                && raw::send_all(&mut send, big).await;
            let status = raw::status_of(response).await;
            drop(send);
            status
        }));
    }
    let mut codes = std::collections::BTreeMap::new();
    for call in calls {
        let code = call.await.expect("join").map_or(-1, |(code, _)| code);
        *codes.entry(code).or_insert(0) += 1;
    }
    let fds_peak = raw::open_fds(pid);
    println!("answers by grpc-status: {codes:?}");
    for code in codes.keys() {
        assert!(
            [
                tonic::Code::ResourceExhausted as i32,
                tonic::Code::DeadlineExceeded as i32
            ]
            .contains(code),
            "unexpected answers: {codes:?}"
        );
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("a normal health check is answered");
    let rounds = bystander.finish().await;
    assert!(rounds > 0);
    let peak_rss = peak.finish().await;
    drop(conns);
    let fds_after = raw::fds_settle(pid, fds_before + FD_SLACK, Duration::from_secs(30)).await;
    report(
        "health 4 MiB x600 + reflection stalls x200",
        peak_rss,
        fds_before,
        fds_peak,
        fds_after,
    );
}

/// Item 3: 400 downloads of a 32 MiB object whose client announces a 1 s
/// deadline and never reads. At the deadline each response is dropped (its
/// file handle with it) and its slot given back; since flow control keeps
/// the server from even ending those streams, the connection is closed
/// after a short grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_downloads_are_dropped_at_their_deadline() {
    let server = ServerProcess::start().await;
    let pid = server.pid();
    let client = server.client().await;
    let ns = Namespace::new("hostile").expect("ns");
    let data: Vec<u8> = (0..32 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let hash = Name::new("hash", trove_tests::sha256_hex(&data)).expect("hash");
    client
        .put_object(&ns, &hash, None, bytes_stream(vec![Bytes::from(data)]))
        .await
        .expect("put");
    let fds_before = raw::open_fds(pid);
    let bystander = Bystander::start(&server).await;
    let peak = PeakRss::start(pid);
    let request = raw::frame(
        &pb::GetObjectRequest {
            namespace: "hostile".into(),
            hash: hash.as_str().into(),
        }
        .encode_to_vec(),
    );
    let mut conns = Vec::new();
    for _ in 0..2 {
        conns.push(raw::connect_small_window(server.addr, hostile()).await);
    }
    let mut held = Vec::new();
    for i in 0..400 {
        let (response, mut send) = raw::start_call(
            &mut conns[i % 2],
            server.addr,
            "/trove.v1.Objects/Get",
            Some("1S"),
        )
        .await;
        let _ = send.send_data(request.clone(), true);
        held.push((response, send));
    }
    // Let the server start every admitted download, then wait out the
    // deadline and the grace, polling the descriptors back down.
    let fds_peak = {
        let mut most = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < until {
            most = most.max(raw::open_fds(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        most
    };
    let fds_after = raw::fds_settle(pid, fds_before + FD_SLACK, Duration::from_secs(30)).await;
    let rounds = bystander.finish().await;
    assert!(rounds > 0);
    let peak_rss = peak.finish().await;
    report(
        "unread 32 MiB downloads x400, 1 s deadline",
        peak_rss,
        fds_before,
        fds_peak,
        fds_after,
    );
    // The unread streams' connections are closed once the grace is over.
    let metrics = server.metrics_addr.expect("metrics");
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(metrics).await;
        if text.contains("trove_connections_closed_total{reason=\"stalled_response\"}") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the stalled connections were not closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(held);
    drop(conns);
}

/// Item 4: 1,050 uploads that send only their headers. One peer holds at
/// most `max_calls_per_peer` (256) slots, so the well-behaved client is
/// served throughout; each held call ends at the first-message timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_only_uploads_cannot_hold_every_slot() {
    let server = ServerProcess::start().await;
    let pid = server.pid();
    let fds_before = raw::open_fds(pid);
    let peak = PeakRss::start(pid);
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(raw::connect(server.addr, hostile()).await);
    }
    let mut held = Vec::new();
    for i in 0..1_050 {
        let started = raw::start_call(
            &mut conns[i % 5],
            server.addr,
            "/trove.v1.Artifacts/Put",
            None,
        )
        .await;
        held.push(started);
    }
    // Beside 1,050 held uploads, a normal client is served at once.
    let bystander = Bystander::start(&server).await;
    let mut artifacts = pb::artifacts_client::ArtifactsClient::new(server.channel().await);
    let answer = artifacts
        .stat(pb::StatArtifactRequest {
            namespace: "bystander".into(),
            key: "nothing".into(),
        })
        .await
        .expect_err("nothing there");
    assert_eq!(answer.code(), tonic::Code::NotFound, "{answer:?}");
    let fds_peak = raw::open_fds(pid);
    let mut codes = std::collections::BTreeMap::new();
    for (response, send) in held {
        let code = raw::status_of(response).await.map_or(-1, |(code, _)| code);
        *codes.entry(code).or_insert(0) += 1;
        drop(send);
    }
    println!("answers by grpc-status: {codes:?}");
    assert_eq!(
        codes
            .get(&(tonic::Code::DeadlineExceeded as i32))
            .copied()
            .unwrap_or(0)
            + codes
                .get(&(tonic::Code::ResourceExhausted as i32))
                .copied()
                .unwrap_or(0),
        1_050,
        "every held upload is refused or cut: {codes:?}"
    );
    assert!(
        codes
            .get(&(tonic::Code::ResourceExhausted as i32))
            .copied()
            .unwrap_or(0)
            >= 1_050 - 256,
        "{codes:?}"
    );
    let rounds = bystander.finish().await;
    assert!(rounds > 0);
    let peak_rss = peak.finish().await;
    drop(conns);
    let fds_after = raw::fds_settle(pid, fds_before + FD_SLACK, Duration::from_secs(30)).await;
    report(
        "header-only uploads x1050",
        peak_rss,
        fds_before,
        fds_peak,
        fds_after,
    );
}

/// Item 5: 20,000 short calls, each under the server's 300 s deadline,
/// leave no task behind and memory flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_calls_leave_no_task_behind() {
    let server = ServerProcess::start().await;
    let pid = server.pid();
    let metrics = server.metrics_addr.expect("metrics");
    let alive = |text: String| -> f64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("trove_runtime_alive_tasks "))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum()
    };
    let mut artifacts = pb::artifacts_client::ArtifactsClient::new(server.channel().await);
    let stat = pb::StatArtifactRequest {
        namespace: "ops".into(),
        key: "missing".into(),
    };
    let _ = artifacts.stat(stat.clone()).await;
    let fds_before = raw::open_fds(pid);
    let tasks_before = alive(scrape(metrics).await);
    let rss_before = raw::rss_mib(pid);
    let peak = PeakRss::start(pid);
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (mut client, stat) = (artifacts.clone(), stat.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..2_500 {
                let _ = client.stat(stat.clone()).await;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("join");
    }
    let tasks_after = alive(scrape(metrics).await);
    let peak_rss = peak.finish().await;
    let rss_after = raw::rss_mib(pid);
    println!("alive tasks {tasks_before} -> {tasks_after}; rss {rss_before} -> {rss_after} MiB");
    assert!(
        tasks_after < tasks_before + 100.0,
        "tasks grew from {tasks_before} to {tasks_after}"
    );
    assert!(
        rss_after < rss_before + 32,
        "memory grew from {rss_before} to {rss_after} MiB over 20,000 finished calls"
    );
    let fds_after = raw::open_fds(pid);
    report(
        "20,000 finished calls",
        peak_rss,
        fds_before,
        fds_before,
        fds_after,
    );
}

/// Opens a raw TCP connection from the hostile peer, speaks just enough
/// HTTP/2 for the server to apply its own settings (the client preface, an
/// empty SETTINGS frame, and the acknowledgement of the server's), then sends
/// the 9-byte header of a HEADERS frame announcing `length` bytes and
/// `sent` bytes of it. Returns the socket, still open.
async fn partial_frame(
    addr: std::net::SocketAddr,
    length: u32,
    sent: usize,
) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(hostile(), 0))?;
    let mut tcp = socket.connect(addr).await?;
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    tcp.write_all(&frame_header(0, 4, 0, 0)).await?;
    // The server's first frame is its SETTINGS; its maximum frame size
    // applies once acknowledged.
    let mut head = [0u8; 9];
    tcp.read_exact(&mut head).await?;
    assert_eq!(head[3], 4, "the server opens with SETTINGS");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await?;
    tcp.write_all(&frame_header(0, 4, 1, 0)).await?;
    // HEADERS with END_HEADERS on stream 1, its block never completed.
    tcp.write_all(&frame_header(length, 1, 4, 1)).await?;
    tcp.write_all(&vec![0u8; sent]).await?;
    tcp.flush().await?;
    Ok(tcp)
}

/// An HTTP/2 frame header: 24-bit length, type, flags, stream id.
fn frame_header(length: u32, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let l = length.to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// Item 6: a frame is buffered whole before the server can look at it, so
/// the largest frame it accepts (128 KiB) times the connections one peer may
/// hold (256) bounds what partly sent frames cost: 255 connections each
/// holding all but 16 bytes of a 128 KiB frame add about 32 MiB.
/// A frame one byte larger closes its connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_sent_frames_are_bounded_by_the_frame_size() {
    use tokio::io::AsyncReadExt;
    const MAX_FRAME: u32 = 128 * 1024;
    let server = ServerProcess::start().await;
    let pid = server.pid();
    let fds_before = raw::open_fds(pid);
    let rss_before = raw::rss_mib(pid);
    let bystander = Bystander::start(&server).await;
    let peak = PeakRss::start(pid);
    // First, while the peer holds no connection: a frame one byte over the
    // limit gets GOAWAY and the end of the connection, never a wait for the
    // rest of it.
    let mut oversized = partial_frame(server.addr, MAX_FRAME + 1, 16)
        .await
        .expect("a first connection");
    let mut rest = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), oversized.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "a frame over the limit did not close its connection"
    );
    drop(oversized);
    // Then the peer's other 255 connections (the cap is 256, and the one
    // above may still be counted for a moment).
    let mut held = Vec::new();
    for _ in 0..255 {
        let conn = partial_frame(server.addr, MAX_FRAME, MAX_FRAME as usize - 16)
            .await
            .expect("a connection under the per-peer cap");
        held.push(conn);
    }
    // Give the sampler a moment of wall time to see the peak.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_peak = raw::open_fds(pid);
    // The frames are held, not refused: every connection is still open
    // (whatever control frames the server sent are read; no end of stream).
    // Within the slack: the store's own files may have been open for a
    // moment when `fds_before` was counted.
    assert!(
        fds_peak + FD_SLACK >= fds_before + 255,
        "the server holds {fds_peak} descriptors, {fds_before} before 255 connections"
    );
    for conn in &held {
        let mut scratch = [0u8; 4096];
        loop {
            match conn.try_read(&mut scratch) {
                Ok(0) => panic!("the server closed a connection holding a frame within the limit"),
                Ok(_) => continue,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => panic!("a held connection failed: {err}"),
            }
        }
    }
    let rounds = bystander.finish().await;
    let peak_rss = peak.finish().await;
    drop(held);
    println!(
        "rss before {rss_before} MiB, peak {peak_rss} MiB; bystander made {rounds} round trips"
    );
    assert!(
        peak_rss < rss_before + 64,
        "255 partly sent frames took the server from {rss_before} to {peak_rss} MiB"
    );
    assert!(rounds > 0);
    let fds_after = raw::fds_settle(pid, fds_before + FD_SLACK, Duration::from_secs(30)).await;
    report(
        "255 connections, each all but 16 bytes of a 128 KiB frame",
        peak_rss,
        fds_before,
        fds_peak,
        fds_after,
    );
}

/// The limits are settings: a budget smaller than one largest message is
/// refused at start, naming both settings.
#[test]
fn a_budget_below_one_message_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(trove_tests::harness::server_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir.path())
        .args(["--max-pending-message-bytes", "1048576"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--max-pending-message-bytes"), "{stderr}");
    assert!(stderr.contains("--max-message-bytes"), "{stderr}");
}
