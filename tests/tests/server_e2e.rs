//! End-to-end behaviour of the real `trove-server` binary: health, reflection,
//! input validation on the wire, limits, shutdown and crash recovery.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use trove_proto::artifacts::PutOptions;
use trove_proto::pb;
use trove_proto::pb::artifacts_client::ArtifactsClient;
use trove_proto::pb::objects_client::ObjectsClient;
use trove_proto::types::{ListPage, Name, Namespace};
use trove_proto::{ArtifactStore, ObjectStore};
use trove_tests::harness::{health_status, ServerProcess};
use trove_tests::{bytes_stream, collect_bytes, generated_stream};

fn put_msg(ns: &str, key: &str, data: &'static [u8], finish: bool) -> pb::PutArtifactRequest {
    pb::PutArtifactRequest {
        header: Some(pb::PutArtifactHeader {
            namespace: ns.into(),
            key: key.into(),
            content_type: String::new(),
            size: None,
        }),
        data: Bytes::from_static(data),
        finish,
    }
}

fn data_msg(data: &'static [u8], finish: bool) -> pb::PutArtifactRequest {
    pb::PutArtifactRequest {
        header: None,
        data: Bytes::from_static(data),
        finish,
    }
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "message {:?} should mention {needle:?}",
                status.message()
            );
        }
        Ok(value) => panic!("expected {code:?}, got {value:?}"),
    }
}

async fn assert_namespace_empty(server: &ServerProcess, ns: &str) {
    let client = server.client().await;
    let ns = Namespace::new(ns).expect("ns");
    let artifacts = client
        .list_artifacts(&ns, &ListPage::first(""), false)
        .await
        .expect("list");
    assert!(
        artifacts.items.is_empty(),
        "artifacts written: {artifacts:?}"
    );
    let objects = client
        .list_objects(&ns, &ListPage::first(""))
        .await
        .expect("list");
    assert!(objects.items.is_empty(), "objects written: {objects:?}");
}

/// The server reports SERVING and lists every trove.v1 service through reflection (v1 and v1alpha).
#[tokio::test]
async fn health_and_reflection() {
    let server = ServerProcess::start().await;
    for service in [
        "",
        "trove.v1.Objects",
        "trove.v1.Artifacts",
        "trove.v1.Entries",
        "trove.v1.Cache",
        "trove.v1.Admin",
    ] {
        assert_eq!(
            health_status(server.addr, service).await,
            Some(ServingStatus::Serving),
            "{service}"
        );
    }
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "trove.v1.Objects",
        "trove.v1.Artifacts",
        "trove.v1.Entries",
        "trove.v1.Cache",
        "trove.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    // Older tools speak only v1alpha.
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    let mut alpha = AlphaClient::new(server.channel().await);
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut replies = alpha
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    assert!(replies.message().await.expect("reply").is_some());
}

/// Bad keys, hashes and page tokens are INVALID_ARGUMENT naming the field, and nothing is written.
#[tokio::test]
async fn invalid_input_is_rejected_and_writes_nothing() {
    let server = ServerProcess::start().await;
    let mut artifacts = ArtifactsClient::new(server.channel().await);
    let mut objects = ObjectsClient::new(server.channel().await);
    let ns = "hostile";
    let long_key = "k".repeat(2048);
    for (key, needle) in [
        ("", "header.key"),
        (long_key.as_str(), "header.key"),
        ("a\0b", "header.key"),
    ] {
        let msg = pb::PutArtifactRequest {
            header: Some(pb::PutArtifactHeader {
                namespace: ns.into(),
                key: key.into(),
                content_type: String::new(),
                size: None,
            }),
            data: Bytes::from_static(b"x"),
            finish: true,
        };
        let result = artifacts.put(futures::stream::iter(vec![msg])).await;
        assert_status(result, Code::InvalidArgument, needle);
    }
    let result = artifacts
        .get(pb::GetArtifactRequest {
            namespace: ns.into(),
            key: "\0".into(),
        })
        .await;
    assert_status(result.map(|_| ()), Code::InvalidArgument, "key");
    let result = artifacts
        .stat(pb::StatArtifactRequest {
            namespace: ns.into(),
            key: long_key.clone(),
        })
        .await;
    assert_status(result, Code::InvalidArgument, "1024 bytes");
    let result = artifacts
        .list(pb::ListArtifactsRequest {
            namespace: ns.into(),
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::InvalidArgument, "page_token");
    let result = artifacts
        .delete(pb::DeleteArtifactRequest {
            namespace: "a\0".into(),
            key: "k".into(),
        })
        .await;
    assert_status(result, Code::InvalidArgument, "namespace");
    let result = objects
        .find_missing(pb::FindMissingRequest {
            namespace: ns.into(),
            hashes: vec!["ok".into(), String::new()],
        })
        .await;
    assert_status(result, Code::InvalidArgument, "hashes[1]");
    // Wrong hash: content does not match the SHA-256 it claims.
    let msg = pb::PutObjectRequest {
        header: Some(pb::PutObjectHeader {
            namespace: ns.into(),
            hash: "0".repeat(64),
            size: None,
        }),
        data: Bytes::from_static(b"not zero"),
        finish: true,
    };
    assert_status(
        objects.put(futures::stream::iter(vec![msg])).await,
        Code::InvalidArgument,
        "hash",
    );
    assert_namespace_empty(&server, ns).await;
}

/// Malformed upload streams (no header, header twice, no finish, data after finish, empty) store nothing.
#[tokio::test]
async fn malformed_upload_streams_store_nothing() {
    let server = ServerProcess::start().await;
    let mut artifacts = ArtifactsClient::new(server.channel().await);
    let ns = "streams";
    let cases: Vec<(Vec<pb::PutArtifactRequest>, &str)> = vec![
        (vec![], "header"),
        (vec![data_msg(b"no header", true)], "header"),
        (
            vec![put_msg(ns, "k", b"a", false), put_msg(ns, "k", b"b", true)],
            "header",
        ),
        (
            vec![put_msg(ns, "k", b"a", false), data_msg(b"b", false)],
            "finish",
        ),
        (
            vec![put_msg(ns, "k", b"a", true), data_msg(b"late", false)],
            "finish",
        ),
    ];
    for (messages, needle) in cases {
        let result = artifacts.put(futures::stream::iter(messages)).await;
        assert_status(result, Code::InvalidArgument, needle);
    }
    assert_namespace_empty(&server, ns).await;
    // The well-formed version of the same upload works.
    let ok = artifacts
        .put(futures::stream::iter(vec![
            put_msg(ns, "k", b"a", false),
            data_msg(b"b", true),
        ]))
        .await
        .expect("valid upload");
    assert_eq!(ok.into_inner().info.map(|i| i.size), Some(2));
}

/// A message over --max-message-bytes is RESOURCE_EXHAUSTED naming the limit, streamed or unary.
#[tokio::test]
async fn oversize_messages_are_resource_exhausted() {
    let server = ServerProcess::start_with(&["--max-message-bytes", "1048576"]).await;
    let mut artifacts = ArtifactsClient::new(server.channel().await);
    let big: &'static [u8] = Box::leak(vec![1u8; 2 * 1024 * 1024].into_boxed_slice());
    let result = artifacts
        .put(futures::stream::iter(vec![put_msg("big", "k", big, true)]))
        .await;
    assert_status(result, Code::ResourceExhausted, "max_message_bytes");
    let mut objects = ObjectsClient::new(server.channel().await);
    let hashes: Vec<String> = (0..3000).map(|i| format!("{i:0>1000}")).collect();
    let result = objects
        .find_missing(pb::FindMissingRequest {
            namespace: "big".into(),
            hashes,
        })
        .await;
    assert_status(result, Code::ResourceExhausted, "max_message_bytes");
    assert_namespace_empty(&server, "big").await;
    // The same data in small messages is fine.
    let client = server.client().await.with_chunk_bytes(256 * 1024);
    let ns = Namespace::new("big").expect("ns");
    client
        .put_artifact(
            &ns,
            &Name::new("key", "k").expect("key"),
            PutOptions::default(),
            bytes_stream(vec![Bytes::from_static(big)]),
        )
        .await
        .expect("chunked upload");
}

/// SIGTERM lets an in-flight upload finish, then the server exits 0 with the upload durable.
#[tokio::test]
async fn sigterm_drains_in_flight_calls_and_exits_zero() {
    let mut server = ServerProcess::start().await;
    let client = server.client().await;
    let ns = Namespace::new("drain").expect("ns");
    let key = Name::new("key", "in-flight").expect("key");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, trove_proto::Error>>(4);
    let upload = {
        let (client, ns, key) = (client.clone(), ns.clone(), key.clone());
        tokio::spawn(async move {
            let body = tokio_stream_from(rx);
            client
                .put_artifact(&ns, &key, PutOptions::default(), body)
                .await
        })
    };
    // 200 KB exceeds the inline limit, so a staging file shows the server has the upload in hand.
    tx.send(Ok(Bytes::from(vec![3u8; 200_000])))
        .await
        .expect("send");
    let staging = server.data_dir.join("staging");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "upload never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.send_sigterm();
    tx.send(Ok(Bytes::from(vec![4u8; 100_000])))
        .await
        .expect("send");
    drop(tx);
    let info = upload
        .await
        .expect("join")
        .expect("in-flight upload completes during drain");
    assert_eq!(info.size, 300_000);
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit(Duration::from_secs(30));
        (status, server)
    })
    .await
    .expect("join");
    let (status, mut server) = status;
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    server.restart().await;
    let client = server.client().await;
    let (_, body) = client
        .get_artifact(&ns, &key)
        .await
        .expect("durable after restart");
    assert_eq!(collect_bytes(body).await.expect("read").len(), 300_000);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, trove_proto::Error>>,
) -> trove_proto::types::ByteStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Acknowledged writes survive kill -9; staged and orphaned files are reclaimed at restart.
#[tokio::test]
async fn acknowledged_writes_survive_kill9_and_orphans_are_reclaimed() {
    let mut server = ServerProcess::start().await;
    let client = server.client().await;
    let ns = Namespace::new("crash").expect("ns");
    let mut expected = Vec::new();
    for i in 0..20u64 {
        let key = Name::new("key", format!("k{i}")).expect("key");
        let size = if i % 5 == 0 { 300_000 } else { 100 + i };
        let info = client
            .put_artifact(
                &ns,
                &key,
                PutOptions::default(),
                generated_stream(i, size, 65_536),
            )
            .await
            .expect("put");
        expected.push((key, info.sha256));
    }
    server.kill9();
    // Leftovers as a crash mid-upload would leave them.
    std::fs::write(
        server.data_dir.join("staging").join("00000000deadbeef.tmp"),
        b"partial",
    )
    .expect("staged");
    let orphan_dir = server.data_dir.join("blobs").join("ef");
    std::fs::create_dir_all(&orphan_dir).expect("dir");
    std::fs::write(orphan_dir.join("00000000000000ef"), b"orphan").expect("orphan");
    server.restart().await;
    let client = server.client().await;
    for (key, sha) in &expected {
        let info = client
            .stat_artifact(&ns, key)
            .await
            .expect("acknowledged write survived");
        assert_eq!(&info.sha256, sha);
        let (_, body) = client.get_artifact(&ns, key).await.expect("get");
        let data = collect_bytes(body).await.expect("read");
        assert_eq!(&trove_tests::sha256_hex(&data), sha);
    }
    assert!(!server
        .data_dir
        .join("staging")
        .join("00000000deadbeef.tmp")
        .exists());
    assert!(!orphan_dir.join("00000000000000ef").exists());
    assert!(!server.log().contains("panicked"));
}

/// Objects written through one client are visible through another, and survive a restart.
#[tokio::test]
async fn restart_keeps_everything() {
    let mut server = ServerProcess::start().await;
    let client = server.client().await;
    let ns = Namespace::new("restart").expect("ns");
    let data = b"persisted";
    let hash = Name::new("hash", trove_tests::sha256_hex(data)).expect("hash");
    client
        .put_object(
            &ns,
            &hash,
            None,
            bytes_stream(vec![Bytes::from_static(data)]),
        )
        .await
        .expect("put");
    server.restart().await;
    let client = server.client().await;
    let (info, body) = client.get_object(&ns, &hash).await.expect("get");
    assert!(info.verified);
    assert_eq!(collect_bytes(body).await.expect("read"), data);
}

/// The README's Rust example (client/examples/quickstart.rs) runs cleanly against the server.
#[tokio::test]
async fn readme_quickstart_runs() {
    let server = ServerProcess::start().await;
    let exe = std::env::current_exe().expect("exe");
    let example = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|d| d.join("examples").join("quickstart"))
        .expect("examples dir");
    assert!(example.exists(), "{} not built", example.display());
    let addr = server.addr.to_string();
    let out =
        tokio::task::spawn_blocking(move || std::process::Command::new(example).arg(addr).output())
            .await
            .expect("join")
            .expect("run quickstart");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quickstart failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified: true"), "{stdout}");
    assert!(stdout.contains("variants/thumbnail"), "{stdout}");
    assert!(stdout.contains("entry at 10\nentry at 20"), "{stdout}");
    assert!(
        stdout.contains("cache hit from tier 1 ref 4f2a9c1"),
        "{stdout}"
    );
}
