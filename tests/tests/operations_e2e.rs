//! Running Trove for real: configuration precedence, start-up validation,
//! metrics, load shedding, deadlines, compression and draining.

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic::codec::CompressionEncoding;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use trove_proto::pb;
use trove_proto::pb::artifacts_client::ArtifactsClient;
use trove_proto::types::Namespace;
use trove_tests::harness::{
    health_status, scrape, server_binary, wait_store_gauges, ServerProcess,
};
use trove_tests::store_one_of_each;

fn header(key: &str, data: Bytes, finish: bool) -> pb::PutArtifactRequest {
    pb::PutArtifactRequest {
        header: Some(pb::PutArtifactHeader {
            namespace: "ops".into(),
            key: key.into(),
            content_type: String::new(),
            size: None,
        }),
        data,
        finish,
    }
}

/// An upload whose body stays open until the returned sender is dropped or fed.
fn open_upload(
    key: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::PutArtifactRequest>,
    impl futures::Stream<Item = pb::PutArtifactRequest>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let first = header(key, Bytes::from_static(b"begin"), false);
    let rest = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (
        tx,
        futures::StreamExt::chain(futures::stream::once(async move { first }), rest),
    )
}

/// Settings come from the file, then the environment, then flags; the effective set is printable.
#[test]
fn config_precedence_file_env_flag() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("trove.toml");
    std::fs::write(
        &file,
        "max_message_bytes = 2000000\nchunk_bytes = 4096\nlog = \"debug\"\ndurability = \"relaxed\"\n",
    )
    .expect("write");
    let out = Command::new(server_binary())
        .args([
            "--config",
            &file.to_string_lossy(),
            "--log",
            "warn",
            "--print-config",
        ])
        .env("TROVE_CHUNK_BYTES", "8192")
        .env("TROVE_DURABILITY", "strict")
        .env("TROVE_LOG", "error")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    for want in [
        "max_message_bytes = 2000000",  // file
        "chunk_bytes = 8192",           // env beats file
        "durability = \"strict\"",      // env beats file
        "log = \"warn\"",               // flag beats file
        "listen = \"127.0.0.1:50051\"", // default
    ] {
        assert!(printed.contains(want), "{want:?} missing from:\n{printed}");
    }
}

/// An invalid setting, wherever it comes from, stops the server with a message naming it.
#[test]
fn invalid_settings_fail_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("trove.toml");
    for (content, needle) in [
        ("max_message_bytes = \"lots\"\n", "max-message-bytes"),
        ("request_timeout_secs = -1\n", "request-timeout-secs"),
        ("not_a_setting = 1\n", "not_a_setting"),
        ("listen = [\n", "trove.toml"),
    ] {
        std::fs::write(&file, content).expect("write");
        let out = Command::new(server_binary())
            .args(["--config", &file.to_string_lossy(), "--print-config"])
            .output()
            .expect("run");
        assert!(!out.status.success(), "{content:?} should be refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{content:?}: {stderr}");
    }
    let out = Command::new(server_binary())
        .args(["--metrics-listen", "not-an-address", "--print-config"])
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "an invalid --metrics-listen must fail"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-listen"));
}

fn sample_value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn parse(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text")
}

/// /metrics parses as Prometheus text, and its counters move with traffic.
#[tokio::test]
async fn metrics_follow_traffic() {
    let server = ServerProcess::start().await;
    let metrics = server.metrics_addr.expect("metrics enabled");
    let before = parse(&scrape(metrics).await);
    let mut artifacts = ArtifactsClient::new(server.channel().await);
    for i in 0..3 {
        artifacts
            .put(futures::stream::iter(vec![header(
                &format!("k{i}"),
                Bytes::from(vec![7u8; 10_000]),
                true,
            )]))
            .await
            .expect("put");
    }
    let missing = artifacts
        .stat(pb::StatArtifactRequest {
            namespace: "ops".into(),
            key: "missing".into(),
        })
        .await;
    assert_eq!(
        missing.map(|_| ()).map_err(|s| s.code()),
        Err(Code::NotFound)
    );
    let put = [
        ("service", "trove.v1.Artifacts"),
        ("method", "Put"),
        ("code", "OK"),
    ];
    let not_found = [
        ("service", "trove.v1.Artifacts"),
        ("method", "Stat"),
        ("code", "NOT_FOUND"),
    ];
    // A call is counted when the server finishes sending its response,
    // which can be just after the client has read it: poll (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, after, puts) = loop {
        let text = scrape(metrics).await;
        let after = parse(&text);
        let puts = sample_value(&after, "trove_requests_total", &put)
            - sample_value(&before, "trove_requests_total", &put);
        let counted =
            puts >= 3.0 && sample_value(&after, "trove_requests_total", &not_found) >= 1.0;
        if counted || Instant::now() >= deadline {
            break (text, after, puts);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        (puts - 3.0).abs() < f64::EPSILON,
        "3 puts counted, got {puts}\n{text}"
    );
    assert!(
        sample_value(&after, "trove_requests_total", &not_found) >= 1.0,
        "{text}"
    );
    let bytes_in = sample_value(&after, "trove_request_bytes_total", &[("method", "Put")]);
    assert!(bytes_in >= 30_000.0, "request bytes counted: {bytes_in}");
    assert!(
        text.contains("trove_request_duration_seconds_bucket"),
        "latency histogram:\n{text}"
    );
    assert!(text.contains("trove_requests_in_flight"), "{text}");
    assert!(
        text.contains("trove_store_disk_bytes"),
        "store figures:\n{text}"
    );
}

/// Beyond --max-concurrent-requests, calls are refused at once with RESOURCE_EXHAUSTED; health still answers.
#[tokio::test]
async fn overload_is_shed_not_queued() {
    let server = ServerProcess::start_with(&["--max-concurrent-requests", "2"]).await;
    let channel = server.channel().await;
    let mut holders = Vec::new();
    let mut calls = Vec::new();
    for i in 0..2 {
        let (tx, body) = open_upload(&format!("held-{i}"));
        let mut client = ArtifactsClient::new(channel.clone());
        calls.push(tokio::spawn(async move { client.put(body).await }));
        holders.push(tx);
    }
    // Wait until both uploads hold their slot (the in-flight gauge says so).
    let metrics = server.metrics_addr.expect("metrics");
    let deadline = Instant::now() + Duration::from_secs(20);
    while sample_value(
        &parse(&scrape(metrics).await),
        "trove_requests_in_flight",
        &[],
    ) < 2.0
    {
        assert!(
            calls.iter().all(|c| !c.is_finished()),
            "a held upload ended early"
        );
        assert!(
            Instant::now() < deadline,
            "the held uploads never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut client = ArtifactsClient::new(channel.clone());
    let status = client
        .stat(pb::StatArtifactRequest {
            namespace: "ops".into(),
            key: "x".into(),
        })
        .await
        .expect_err("shed");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_concurrent_requests (2)"),
        "{status:?}"
    );
    // Both slots are still held by uploads the test keeps open: a refusal
    // that had queued for a slot could not have come back at all.
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "the refusal came while both slots were still held"
    );
    assert_eq!(
        health_status(server.addr, "").await,
        Some(ServingStatus::Serving)
    );
    for tx in holders {
        tx.send(pb::PutArtifactRequest {
            header: None,
            data: Bytes::from_static(b" end"),
            finish: true,
        })
        .await
        .expect("send");
    }
    for call in calls {
        call.await.expect("join").expect("held upload completes");
    }
    client
        .stat(pb::StatArtifactRequest {
            namespace: "ops".into(),
            key: "held-0".into(),
        })
        .await
        .expect("capacity is back");
}

/// Starts an artifact upload over raw HTTP/2 with a `grpc-timeout` header and
/// never finishes it; returns the grpc-status the server answers with. (The
/// tonic client would enforce the deadline itself; this checks the server.)
async fn raw_upload_with_deadline(
    addr: std::net::SocketAddr,
    timeout: &str,
) -> Option<(i32, String)> {
    use prost::Message;
    use trove_tests::raw;
    let mut conn = raw::connect(addr, std::net::Ipv4Addr::LOCALHOST.into()).await;
    let (response, mut send) =
        raw::start_call(&mut conn, addr, "/trove.v1.Artifacts/Put", Some(timeout)).await;
    let message = header("raw-slow", Bytes::from_static(b"x"), false).encode_to_vec();
    send.send_data(raw::frame(&message), false)
        .expect("send data");
    // The request stays open (never finished) until the answer is read.
    let status = raw::status_of(response).await;
    drop(send);
    status
}

/// A caller's deadline shorter than the work ends the call with DEADLINE_EXCEEDED; so does the server's own limit.
#[tokio::test]
async fn deadlines_are_enforced() {
    let server = ServerProcess::start_with(&["--request-timeout-secs", "2"]).await;
    let (code, message) = raw_upload_with_deadline(server.addr, "300m")
        .await
        .expect("a status");
    assert_eq!(
        code,
        Code::DeadlineExceeded as i32,
        "DEADLINE_EXCEEDED from the server: {message}"
    );
    // The caller's shorter deadline wins over the server's 2 s: the status
    // names the deadline that was applied.
    assert!(message.contains("300 ms"), "{message}");
    let mut client = ArtifactsClient::new(server.channel().await);
    let (tx, body) = open_upload("slower");
    let status = client.put(body).await.expect_err("server limit");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(tx);
    for key in ["raw-slow", "slower"] {
        let stat = client
            .stat(pb::StatArtifactRequest {
                namespace: "ops".into(),
                key: key.into(),
            })
            .await;
        assert_eq!(
            stat.map(|_| ()).map_err(|s| s.code()),
            Err(Code::NotFound),
            "a timed-out upload stores nothing"
        );
    }
    let text = scrape(server.metrics_addr.expect("metrics")).await;
    let timed_out = sample_value(
        &parse(&text),
        "trove_requests_total",
        &[("method", "Put"), ("code", "DEADLINE_EXCEEDED")],
    );
    assert!(timed_out >= 2.0, "{text}");
}

/// gzip- and zstd-compressed calls work both ways.
#[tokio::test]
async fn compressed_calls_work() {
    let server = ServerProcess::start().await;
    let value = Bytes::from("compressible ".repeat(100_000));
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Zstd] {
        let mut client = ArtifactsClient::new(server.channel().await)
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let key = format!("{encoding:?}");
        client
            .put(futures::stream::iter(vec![header(
                &key,
                value.clone(),
                true,
            )]))
            .await
            .expect("compressed put");
        let mut stream = client
            .get(pb::GetArtifactRequest {
                namespace: "ops".into(),
                key,
            })
            .await
            .expect("compressed get")
            .into_inner();
        let mut got = Vec::new();
        while let Some(message) = stream.message().await.expect("message") {
            got.extend_from_slice(&message.data);
        }
        assert_eq!(got, value);
    }
    let text = scrape(server.metrics_addr.expect("metrics")).await;
    let bytes_in = sample_value(
        &parse(&text),
        "trove_request_bytes_total",
        &[("method", "Put")],
    );
    assert!(
        bytes_in < value.len() as f64,
        "compressed on the wire: {bytes_in} bytes for two {}-byte values",
        value.len()
    );
}

/// On SIGTERM health turns NOT_SERVING during the grace period, the in-flight call completes, and the exit code is 0.
#[tokio::test]
async fn drain_reports_not_serving_and_finishes_calls() {
    let mut server = ServerProcess::start_with(&["--drain-grace-secs", "2"]).await;
    let mut client = ArtifactsClient::new(server.channel().await);
    let (tx, body) = open_upload("in-flight");
    let call = tokio::spawn(async move { client.put(body).await });
    tx.send(pb::PutArtifactRequest {
        header: None,
        data: Bytes::from(vec![1u8; 100_000]),
        finish: false,
    })
    .await
    .expect("send");
    let staging = server.data_dir.join("staging");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "upload never reached the server");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.send_sigterm();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if health_status(server.addr, "").await == Some(ServingStatus::NotServing) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health never reported NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the grace period the server stops taking new calls; only then
    // does the in-flight upload finish, so the drain itself is exercised.
    let deadline = Instant::now() + Duration::from_secs(20);
    while health_status(server.addr, "").await.is_some() {
        assert!(Instant::now() < deadline, "the server kept accepting calls");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !call.is_finished(),
        "the in-flight upload must still be open when the drain starts"
    );
    tx.send(pb::PutArtifactRequest {
        header: None,
        data: Bytes::from_static(b"tail"),
        finish: true,
    })
    .await
    .expect("send");
    drop(tx);
    let reply = call
        .await
        .expect("join")
        .expect("in-flight call completes")
        .into_inner();
    assert_eq!(reply.info.map(|i| i.size), Some(5 + 100_000 + 4));
    let (status, server) = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit(Duration::from_secs(30));
        (status, server)
    })
    .await
    .expect("join");
    assert_eq!(status.code(), Some(0), "{}", server.log());
}

/// With --log-format json every call logs one JSON line with method, status, duration and sizes, never the payload.
#[tokio::test]
async fn json_request_logs_without_payloads() {
    let server = ServerProcess::start_with(&["--log-format", "json"]).await;
    let mut artifacts = ArtifactsClient::new(server.channel().await);
    artifacts
        .put(futures::stream::iter(vec![header(
            "logged",
            Bytes::from_static(b"SECRET-PAYLOAD-DO-NOT-LOG"),
            true,
        )]))
        .await
        .expect("put");
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let log = server.log();
        let found = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["method"] == "Put" && v["fields"]["message"] == "request");
        if let Some(line) = found {
            assert!(
                !log.contains("SECRET-PAYLOAD"),
                "payload leaked into the log"
            );
            break line;
        }
        assert!(Instant::now() < deadline, "no JSON request line in:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fields = &line["fields"];
    assert_eq!(fields["service"], "trove.v1.Artifacts");
    assert_eq!(fields["status"], "OK");
    assert!(fields["duration_ms"].is_u64(), "{line}");
    assert!(fields["bytes_in"].as_u64().unwrap_or(0) > 25, "{line}");
    assert_eq!(line["level"], "INFO");
}

/// With --reflection false the reflection service is not offered.
#[tokio::test]
async fn reflection_can_be_turned_off() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let server = ServerProcess::start_with(&["--reflection", "false"]).await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let result = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await;
    assert_eq!(
        result.map(|_| ()).map_err(|s| s.code()),
        Err(Code::Unimplemented)
    );
    assert_eq!(
        health_status(server.addr, "").await,
        Some(ServingStatus::Serving)
    );
}

/// A download whose reader stalls past the deadline gives its concurrency slot back.
#[tokio::test]
async fn stalled_download_gives_back_its_slot() {
    let server = ServerProcess::start_with(&[
        "--request-timeout-secs",
        "1",
        "--max-concurrent-requests",
        "1",
    ])
    .await;
    let client = server.client().await;
    let ns = trove_proto::types::Namespace::new("ops").expect("ns");
    let key = trove_proto::types::Name::new("key", "big").expect("key");
    use trove_proto::ArtifactStore;
    client
        .put_artifact(
            &ns,
            &key,
            trove_proto::artifacts::PutOptions::default(),
            trove_tests::generated_stream(1, 32 << 20, 1 << 20),
        )
        .await
        .expect("put");
    let mut raw = ArtifactsClient::new(server.channel().await);
    // The put's slot is given back when the server drops its response, which
    // can be just after the caller has read it; until then the only slot is
    // still taken, so the download is retried until it is admitted.
    let admitted_by = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        let get = raw
            .get(pb::GetArtifactRequest {
                namespace: "ops".into(),
                key: "big".into(),
            })
            .await;
        match get {
            Ok(response) => break response.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(Instant::now() < admitted_by, "the put kept its slot");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    };
    stream.message().await.expect("first message");
    // The reader stalls while holding the only slot; after the 1 s deadline
    // another call must get through instead of being shed forever.
    let mut other = ArtifactsClient::new(server.channel().await);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stat = other
            .stat(pb::StatArtifactRequest {
                namespace: "ops".into(),
                key: "big".into(),
            })
            .await;
        match stat {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    Instant::now() < deadline,
                    "the stalled download kept its slot"
                );
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(stream);
}

/// While the store opens, health says NOT_SERVING and calls get UNAVAILABLE.
/// The opening is held open by an object store that accepts connections and
/// never answers, so the start-up lasts exactly as long as the test wants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_reports_not_serving() {
    use std::io::{BufRead, BufReader};
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            connections.push(stream);
        }
    });
    let temp = tempfile::tempdir().expect("dir");
    let mut child = Command::new(server_binary())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--store", "s3://held/startup", "--s3-endpoint", &endpoint])
        .arg("--data-dir")
        .arg(temp.path().join("data"))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let addr: std::net::SocketAddr = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("listening on ")
                    .and_then(|a| a.trim().parse().ok())
            })
    })
    .await
    .expect("join")
    .expect("address");
    // The listener is bound before the store opens, and the store cannot
    // open while its object store stays silent.
    assert_eq!(
        health_status(addr, "").await,
        Some(ServingStatus::NotServing)
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let stat = ArtifactsClient::new(channel)
        .stat(pb::StatArtifactRequest {
            namespace: "ops".into(),
            key: "k".into(),
        })
        .await;
    assert!(
        matches!(&stat, Err(s) if s.code() == Code::Unavailable),
        "a call during start-up should be UNAVAILABLE: {stat:?}"
    );
    assert_eq!(
        health_status(addr, "").await,
        Some(ServingStatus::NotServing)
    );
    let _ = child.kill();
    let _ = child.wait();
    held.abort();
}

/// Staged files a crash left behind are reclaimed when the store opens.
#[tokio::test]
async fn leftover_staging_is_reclaimed_at_start() {
    let temp = tempfile::tempdir().expect("dir");
    let data = temp.path().join("data");
    let staging = data.join("staging");
    std::fs::create_dir_all(&staging).expect("staging");
    for i in 0..2_000u32 {
        std::fs::write(staging.join(format!("{i:016x}.tmp")), b"leftover").expect("leftover");
    }
    let _server = ServerProcess::start_in(&data, &[]).await;
    assert_eq!(
        std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0),
        0,
        "leftovers reclaimed"
    );
}

/// `/metrics` shows what the sled engine holds, exactly: items by kind,
/// payload bytes and bytes on disk, measured at start (and every minute).
#[tokio::test]
async fn store_gauges_on_sled() {
    let mut server = ServerProcess::start().await;
    let ns = Namespace::new("gauges").expect("valid namespace");
    let payload = store_one_of_each(&server.client().await, &ns).await;
    server.restart().await;
    let metrics = server.metrics_addr.expect("metrics enabled");
    let gauges = wait_store_gauges(metrics, Duration::from_secs(30), |g| {
        g.items.get("artifact") == Some(&2.0)
    })
    .await;
    for (kind, count) in [
        ("object", 1.0),
        ("stream", 1.0),
        ("artifact", 2.0),
        ("cassette", 1.0),
        ("entry", 3.0),
        ("cache_archive", 1.0),
    ] {
        assert_eq!(gauges.items.get(kind), Some(&count), "{kind}: {gauges:?}");
    }
    #[allow(clippy::cast_precision_loss)]
    let payload = payload as f64;
    assert_eq!(gauges.logical_bytes, Some(payload), "{gauges:?}");
    assert!(gauges.disk_bytes.is_some_and(|b| b > 0.0), "{gauges:?}");
}

/// No per-call task outlives its call: after 2,000 calls that each carried
/// a deadline, the server runs about as many tasks as before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_task_outlives_its_call() {
    let server = ServerProcess::start().await;
    let metrics = server.metrics_addr.expect("metrics");
    let tasks = |text: String| -> f64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("trove_runtime_alive_tasks "))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum()
    };
    let mut client = ArtifactsClient::new(server.channel().await);
    let stat = |client: &mut ArtifactsClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        async move {
            // Every call has a deadline (the server's 300 s at least).
            let _ = client
                .stat(pb::StatArtifactRequest {
                    namespace: "ops".into(),
                    key: "missing".into(),
                })
                .await;
        }
    };
    stat(&mut client).await;
    let before = tasks(scrape(metrics).await);
    for _ in 0..2_000 {
        stat(&mut client).await;
    }
    let after = tasks(scrape(metrics).await);
    println!("alive tasks: {before} before 2,000 calls, {after} after");
    assert!(before > 0.0, "the gauge is exported");
    assert!(
        after < before + 100.0,
        "tasks grew from {before} to {after} over 2,000 finished calls"
    );
}

/// On an object store, a reclaim grace that a call could outlive is refused at
/// start (exit 2, naming both settings), before the store is even contacted:
/// otherwise a long upload's staged body could be deleted before publishing.
#[test]
fn object_store_refuses_a_grace_shorter_than_the_longest_call() {
    let dir = tempfile::tempdir().expect("temp dir");
    for extra in [
        &["--request-timeout-secs", "0"][..],
        &[
            "--request-timeout-secs",
            "600",
            "--reclaim-grace-secs",
            "60",
        ][..],
    ] {
        let out = Command::new(server_binary())
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .args(["--store", "s3://unreachable-bucket/prefix", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(extra)
            .output()
            .expect("run trove-server");
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for flag in ["--request-timeout-secs", "--reclaim-grace-secs"] {
            assert!(stderr.contains(flag), "{flag} missing from: {stderr}");
        }
    }
}

/// Every manifest that runs the embedded store fits its worst-case memory
/// (the README's sum: database cache, budget for partly received messages,
/// per slot one uncharged 64 KiB message and two download chunks, and a
/// 32 MiB baseline) in its container's limit, and keeps the database cache
/// to a quarter of it: sled's own default (1 GiB) would get the 512Mi
/// sidecar killed for memory under load.
#[test]
fn manifests_fit_their_worst_case_memory() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s");
    for manifest in ["sidecar-pod.yaml", "shared-service.yaml"] {
        let text = std::fs::read_to_string(deploy.join(manifest)).expect("manifest");
        let setting = |name: &str, default: u64| -> u64 {
            text.split_once(&format!("{name}, value: \""))
                .map_or(default, |(_, rest)| {
                    rest.split('"')
                        .next()
                        .expect("quoted")
                        .parse()
                        .expect("number")
                })
        };
        let cache = setting("TROVE_DB_CACHE_BYTES", 0);
        assert!(cache > 0, "{manifest} does not set TROVE_DB_CACHE_BYTES");
        let budget = setting("TROVE_MAX_PENDING_MESSAGE_BYTES", 256 << 20);
        let slots = setting("TROVE_MAX_CONCURRENT_REQUESTS", 1024);
        let chunk = setting("TROVE_CHUNK_BYTES", 1 << 20);
        let (_, limits) = text.split_once("limits:").expect("a memory limit");
        let (_, memory) = limits.split_once("memory: ").expect("memory limit");
        let memory = memory.split(['}', '\n']).next().expect("value").trim();
        let limit = match memory.split_at(memory.len() - 2) {
            (n, "Mi") => n.parse::<u64>().expect("MiB") << 20,
            (n, "Gi") => n.parse::<u64>().expect("GiB") << 30,
            other => panic!("{manifest}: unexpected memory limit {other:?}"),
        };
        // A tier holds up to three more chunks per call: two queued for its
        // local copy and one arriving from the upstream.
        let per_call = if text.contains("TROVE_UPSTREAM,") {
            (64 << 10) + 5 * chunk
        } else {
            (64 << 10) + 2 * chunk
        };
        let worst = cache + budget + slots * per_call + (32 << 20);
        println!(
            "{manifest}: worst case {} MiB of {} MiB",
            worst >> 20,
            limit >> 20
        );
        assert!(
            cache <= limit / 4,
            "{manifest}: a {cache}-byte database cache in a {limit}-byte container"
        );
        assert!(
            worst <= limit,
            "{manifest}: worst case {worst} bytes over the {limit}-byte limit"
        );
    }
}
