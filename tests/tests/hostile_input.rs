//! Hostile input over every RPC, sent as raw protobuf bytes so that nothing a
//! client library would refuse to send is off the table: empty, NUL-carrying,
//! over-long and non-UTF-8 names, boundary lengths, extreme numbers, malformed
//! upload streams, oversize messages, and thousands of aborted uploads. Each
//! case checks the exact status; afterwards the server is healthy, logged no
//! panic, and nothing was written.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use trove_proto::pb;
use trove_tests::harness::{health_status, ServerProcess};

/// Passes message bytes through untouched.
#[derive(Debug, Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
}

/// Calls `path` with raw messages; returns the status code (OK when it succeeded).
async fn call(channel: &Channel, kind: Kind, path: &'static str, messages: Vec<Bytes>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    if grpc.ready().await.is_err() {
        return Code::Unavailable;
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let result = match kind {
        Kind::Unary => grpc
            .unary(
                tonic::Request::new(messages.into_iter().next().unwrap_or_default()),
                path,
                RawCodec,
            )
            .await
            .map(|_| ()),
        Kind::ServerStream => {
            let request = tonic::Request::new(messages.into_iter().next().unwrap_or_default());
            match grpc.server_streaming(request, path, RawCodec).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => break Ok(()),
                            Err(status) => break Err(status),
                        }
                    }
                }
                Err(status) => Err(status),
            }
        }
        Kind::ClientStream => grpc
            .client_streaming(
                tonic::Request::new(futures::stream::iter(messages)),
                path,
                RawCodec,
            )
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn enc<M: Message>(m: M) -> Bytes {
    Bytes::from(m.encode_to_vec())
}

/// A message whose string field `field` holds bytes that are not UTF-8.
fn non_utf8(field: u32) -> Bytes {
    let mut out = Vec::new();
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(2, &mut out);
    out.extend_from_slice(&[0xFF, 0xFE]);
    Bytes::from(out)
}

const NS: &str = "hostile";

/// Every way to spell a bad name, with the status each must get.
fn bad_names() -> Vec<(String, Code)> {
    vec![
        (String::new(), Code::InvalidArgument),
        ("a\0b".into(), Code::InvalidArgument),
        ("x".repeat(1025), Code::InvalidArgument),
    ]
}

fn scope(branch: &str) -> Option<pb::CacheScope> {
    Some(pb::CacheScope {
        namespace: NS.into(),
        prefix: "p".into(),
        branch: branch.into(),
        default_branch: "main".into(),
        test_suite_id: String::new(),
    })
}

/// The cases: (what, kind, path, messages, expected status).
fn cases() -> Vec<(String, Kind, &'static str, Vec<Bytes>, Code)> {
    use Kind::*;
    let mut cases: Vec<(String, Kind, &'static str, Vec<Bytes>, Code)> = Vec::new();
    let fin = |b: Bytes| b;
    for (name, code) in bad_names() {
        let n = name.clone();
        let label = |rpc: &str| {
            format!(
                "{rpc} with name {:?}",
                if n.len() > 20 {
                    format!("{} bytes", n.len())
                } else {
                    n.clone()
                }
            )
        };
        cases.push((
            label("Objects.Get"),
            ServerStream,
            "/trove.v1.Objects/Get",
            vec![enc(pb::GetObjectRequest {
                namespace: NS.into(),
                hash: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Objects.Delete"),
            Unary,
            "/trove.v1.Objects/Delete",
            vec![enc(pb::DeleteObjectRequest {
                namespace: NS.into(),
                hash: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Objects.Stat"),
            Unary,
            "/trove.v1.Objects/Stat",
            vec![enc(pb::StatObjectRequest {
                namespace: NS.into(),
                hash: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Objects.FindMissing"),
            Unary,
            "/trove.v1.Objects/FindMissing",
            vec![enc(pb::FindMissingRequest {
                namespace: NS.into(),
                hashes: vec![name.clone()],
            })],
            code,
        ));
        cases.push((
            label("Objects.GetStream"),
            ServerStream,
            "/trove.v1.Objects/GetStream",
            vec![enc(pb::GetStreamRequest {
                namespace: NS.into(),
                hash: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Objects.Put"),
            ClientStream,
            "/trove.v1.Objects/Put",
            vec![enc(pb::PutObjectRequest {
                header: Some(pb::PutObjectHeader {
                    namespace: NS.into(),
                    hash: name.clone(),
                    size: None,
                }),
                data: Bytes::from_static(b"x"),
                finish: true,
            })],
            code,
        ));
        cases.push((
            label("Objects.PutStream"),
            ClientStream,
            "/trove.v1.Objects/PutStream",
            vec![enc(pb::PutStreamRequest {
                header: Some(pb::PutStreamHeader {
                    namespace: NS.into(),
                    hash: name.clone(),
                }),
                chunks: vec![],
                finish: true,
            })],
            code,
        ));
        cases.push((
            label("Artifacts.Put"),
            ClientStream,
            "/trove.v1.Artifacts/Put",
            vec![fin(enc(pb::PutArtifactRequest {
                header: Some(pb::PutArtifactHeader {
                    namespace: NS.into(),
                    key: name.clone(),
                    content_type: String::new(),
                    size: None,
                }),
                data: Bytes::from_static(b"x"),
                finish: true,
            }))],
            code,
        ));
        cases.push((
            label("Artifacts.Get"),
            ServerStream,
            "/trove.v1.Artifacts/Get",
            vec![enc(pb::GetArtifactRequest {
                namespace: NS.into(),
                key: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Artifacts.Delete"),
            Unary,
            "/trove.v1.Artifacts/Delete",
            vec![enc(pb::DeleteArtifactRequest {
                namespace: NS.into(),
                key: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Artifacts.Stat"),
            Unary,
            "/trove.v1.Artifacts/Stat",
            vec![enc(pb::StatArtifactRequest {
                namespace: NS.into(),
                key: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Entries.Append"),
            Unary,
            "/trove.v1.Entries/Append",
            vec![enc(pb::AppendRequest {
                namespace: NS.into(),
                cassette: name.clone(),
                entries: vec![pb::Entry {
                    json: Bytes::from_static(b"{}"),
                    recorded_at: None,
                }],
                idempotency_key: String::new(),
            })],
            code,
        ));
        cases.push((
            label("Entries.Read"),
            ServerStream,
            "/trove.v1.Entries/Read",
            vec![enc(pb::ReadRequest {
                namespace: NS.into(),
                cassette: name.clone(),
                after: String::new(),
                limit: 0,
            })],
            code,
        ));
        cases.push((
            label("Entries.Replace"),
            ClientStream,
            "/trove.v1.Entries/Replace",
            vec![enc(pb::ReplaceRequest {
                header: Some(pb::ReplaceHeader {
                    namespace: NS.into(),
                    cassette: name.clone(),
                }),
                entries: vec![],
                finish: true,
            })],
            code,
        ));
        cases.push((
            label("Entries.Delete"),
            Unary,
            "/trove.v1.Entries/Delete",
            vec![enc(pb::DeleteCassetteRequest {
                namespace: NS.into(),
                cassette: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Entries.Exists"),
            Unary,
            "/trove.v1.Entries/Exists",
            vec![enc(pb::ExistsRequest {
                namespace: NS.into(),
                cassette: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Entries.Ensure"),
            Unary,
            "/trove.v1.Entries/Ensure",
            vec![enc(pb::EnsureRequest {
                namespace: NS.into(),
                cassette: name.clone(),
            })],
            code,
        ));
        cases.push((
            label("Cache.Upload"),
            ClientStream,
            "/trove.v1.Cache/Upload",
            vec![enc(pb::UploadRequest {
                header: Some(pb::UploadHeader {
                    scope: scope("main"),
                    r#ref: name.clone(),
                    tree_sha: None,
                    uploaded_at: None,
                    size: None,
                }),
                data: Bytes::from_static(b"x"),
                finish: true,
            })],
            code,
        ));
        cases.push((
            label("Cache.Upload branch"),
            ClientStream,
            "/trove.v1.Cache/Upload",
            vec![enc(pb::UploadRequest {
                header: Some(pb::UploadHeader {
                    scope: scope(&name),
                    r#ref: "r".into(),
                    tree_sha: None,
                    uploaded_at: None,
                    size: None,
                }),
                data: Bytes::from_static(b"x"),
                finish: true,
            })],
            code,
        ));
        cases.push((
            label("Cache.Prune branch"),
            Unary,
            "/trove.v1.Cache/Prune",
            vec![enc(pb::PruneRequest {
                scope: scope(&name),
                count: 1,
                duration_seconds: 0,
                pr_branch_ttl_seconds: 0,
            })],
            code,
        ));
        cases.push((
            label("Cache.ListRefs branch"),
            Unary,
            "/trove.v1.Cache/ListRefs",
            vec![enc(pb::ListRefsRequest {
                scope: scope(&name),
                page_size: 0,
                page_token: String::new(),
            })],
            code,
        ));
        // The tool's contract: a blank ref is a miss and a blank branch is empty or a no-op.
        let download = if name.is_empty() { Code::Ok } else { code };
        cases.push((
            label("Cache.Download"),
            ServerStream,
            "/trove.v1.Cache/Download",
            vec![enc(pb::DownloadRequest {
                scope: scope("main"),
                r#ref: name.clone(),
                tree_sha: None,
            })],
            download,
        ));
        let blank_ok = if name.is_empty() { Code::Ok } else { code };
        cases.push((
            label("Cache.BranchRefs"),
            Unary,
            "/trove.v1.Cache/BranchRefs",
            vec![enc(pb::BranchRefsRequest {
                namespace: NS.into(),
                prefix: "p".into(),
                branch: name.clone(),
            })],
            blank_ok,
        ));
        cases.push((
            label("Cache.WriteBranchRefs"),
            Unary,
            "/trove.v1.Cache/WriteBranchRefs",
            vec![enc(pb::WriteBranchRefsRequest {
                namespace: NS.into(),
                prefix: "p".into(),
                branch: name.clone(),
                default_branch: "main".into(),
                refs: [("sha".to_string(), 1i64)].into(),
            })],
            blank_ok,
        ));
        let list_prefix = if name.is_empty() { Code::Ok } else { code };
        cases.push((
            label("Objects.List prefix"),
            Unary,
            "/trove.v1.Objects/List",
            vec![enc(pb::ListObjectsRequest {
                namespace: NS.into(),
                prefix: name.clone(),
                page_size: 0,
                page_token: String::new(),
            })],
            list_prefix,
        ));
        cases.push((
            label("Artifacts.List prefix"),
            Unary,
            "/trove.v1.Artifacts/List",
            vec![enc(pb::ListArtifactsRequest {
                namespace: NS.into(),
                prefix: name.clone(),
                page_size: 0,
                page_token: String::new(),
                with_values: true,
            })],
            list_prefix,
        ));
        cases.push((
            label("Entries.List prefix"),
            Unary,
            "/trove.v1.Entries/List",
            vec![enc(pb::ListCassettesRequest {
                namespace: NS.into(),
                prefix: name.clone(),
                page_size: 0,
                page_token: String::new(),
            })],
            list_prefix,
        ));
        cases.push((
            label("Cache.PruneAll prefix"),
            Unary,
            "/trove.v1.Cache/PruneAll",
            vec![enc(pb::PruneAllRequest {
                namespace: NS.into(),
                prefix: name.clone(),
                pr_branch_ttl_seconds: 1,
            })],
            if name.is_empty() { Code::Ok } else { code },
        ));
    }
    // Names of exactly 1024 bytes are fine; reads of them are misses.
    let edge = "k".repeat(1024);
    cases.push((
        "Artifacts.Stat with a 1024-byte key".into(),
        Unary,
        "/trove.v1.Artifacts/Stat",
        vec![enc(pb::StatArtifactRequest {
            namespace: NS.into(),
            key: edge.clone(),
        })],
        Code::NotFound,
    ));
    cases.push((
        "Entries.Exists with a 1024-byte name".into(),
        Unary,
        "/trove.v1.Entries/Exists",
        vec![enc(pb::ExistsRequest {
            namespace: NS.into(),
            cassette: edge,
        })],
        Code::Ok,
    ));
    // Bytes that are not UTF-8 where a string belongs are not valid protobuf:
    // INTERNAL, as the gRPC status-code guide prescribes for unparseable requests.
    for (path, kind) in [
        ("/trove.v1.Objects/Stat", Unary),
        ("/trove.v1.Artifacts/Delete", Unary),
        ("/trove.v1.Entries/Exists", Unary),
        ("/trove.v1.Cache/BranchRefs", Unary),
        ("/trove.v1.Artifacts/Get", ServerStream),
    ] {
        cases.push((
            format!("{path} with a non-UTF-8 string"),
            kind,
            path,
            vec![non_utf8(2)],
            Code::Internal,
        ));
    }
    // In an upload the key sits inside the header message (field 1).
    let inner = non_utf8(2);
    let mut header = Vec::new();
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut header);
    prost::encoding::encode_varint(inner.len() as u64, &mut header);
    header.extend_from_slice(&inner);
    cases.push((
        "Artifacts.Put with a non-UTF-8 key".into(),
        ClientStream,
        "/trove.v1.Artifacts/Put",
        vec![Bytes::from(header)],
        Code::Internal,
    ));
    cases.push((
        "garbage bytes".into(),
        Unary,
        "/trove.v1.Objects/Stat",
        vec![Bytes::from_static(&[0xFF; 16])],
        Code::Internal,
    ));
    // Bad namespaces, in unary calls and in upload headers.
    for (namespace, code) in [
        ("a\0b".to_owned(), Code::InvalidArgument),
        ("n".repeat(1025), Code::InvalidArgument),
    ] {
        let shown = if namespace.len() > 20 {
            format!("{} bytes", namespace.len())
        } else {
            format!("{namespace:?}")
        };
        cases.push((
            format!("Objects.Stat in namespace {shown}"),
            Unary,
            "/trove.v1.Objects/Stat",
            vec![enc(pb::StatObjectRequest {
                namespace: namespace.clone(),
                hash: "h".into(),
            })],
            code,
        ));
        cases.push((
            format!("Entries.Exists in namespace {shown}"),
            Unary,
            "/trove.v1.Entries/Exists",
            vec![enc(pb::ExistsRequest {
                namespace: namespace.clone(),
                cassette: "c".into(),
            })],
            code,
        ));
        cases.push((
            format!("Cache.BranchRefs in namespace {shown}"),
            Unary,
            "/trove.v1.Cache/BranchRefs",
            vec![enc(pb::BranchRefsRequest {
                namespace: namespace.clone(),
                prefix: "p".into(),
                branch: "b".into(),
            })],
            code,
        ));
        cases.push((
            format!("Artifacts.Put in namespace {shown}"),
            ClientStream,
            "/trove.v1.Artifacts/Put",
            vec![enc(pb::PutArtifactRequest {
                header: Some(pb::PutArtifactHeader {
                    namespace: namespace.clone(),
                    key: "k".into(),
                    content_type: String::new(),
                    size: None,
                }),
                data: Bytes::from_static(b"x"),
                finish: true,
            })],
            code,
        ));
    }
    cases.push((
        "Artifacts.Get in a non-UTF-8 namespace".into(),
        ServerStream,
        "/trove.v1.Artifacts/Get",
        vec![non_utf8(1)],
        Code::Internal,
    ));
    // Extreme numbers: capped or ignored, never an error or a write. They
    // run on a store holding data (see `seed`), which must stay as it was.
    cases.push((
        "List with page_size u32::MAX".into(),
        Unary,
        "/trove.v1.Artifacts/List",
        vec![enc(pb::ListArtifactsRequest {
            namespace: NS.into(),
            prefix: String::new(),
            page_size: u32::MAX,
            page_token: String::new(),
            with_values: true,
        })],
        Code::Ok,
    ));
    cases.push((
        "Read with limit u32::MAX".into(),
        ServerStream,
        "/trove.v1.Entries/Read",
        vec![enc(pb::ReadRequest {
            namespace: NS.into(),
            cassette: "c".into(),
            after: String::new(),
            limit: u32::MAX,
        })],
        Code::Ok,
    ));
    for (count, duration, ttl) in [
        (i64::MIN, i64::MIN, i64::MIN),
        (i64::MAX, i64::MAX, i64::MAX),
        (-1, -1, -1),
    ] {
        cases.push((
            format!("Prune with {count}/{duration}/{ttl}"),
            Unary,
            "/trove.v1.Cache/Prune",
            vec![enc(pb::PruneRequest {
                scope: scope("feature"),
                count,
                duration_seconds: duration,
                pr_branch_ttl_seconds: ttl,
            })],
            Code::Ok,
        ));
    }
    cases.push((
        "PruneAll with i64::MAX".into(),
        Unary,
        "/trove.v1.Cache/PruneAll",
        vec![enc(pb::PruneAllRequest {
            namespace: NS.into(),
            prefix: "p".into(),
            pr_branch_ttl_seconds: i64::MAX,
        })],
        Code::Ok,
    ));
    cases.push((
        "Read with a forged cursor".into(),
        ServerStream,
        "/trove.v1.Entries/Read",
        vec![enc(pb::ReadRequest {
            namespace: NS.into(),
            cassette: "c".into(),
            after: "c1.zzzz".into(),
            limit: 0,
        })],
        Code::InvalidArgument,
    ));
    cases.push((
        "ListRefs with a forged token".into(),
        Unary,
        "/trove.v1.Cache/ListRefs",
        vec![enc(pb::ListRefsRequest {
            scope: scope("main"),
            page_size: 0,
            page_token: "r1.00".into(),
        })],
        Code::InvalidArgument,
    ));
    // Wrong hash, wrong declared size.
    cases.push((
        "Objects.Put with a wrong SHA-256".into(),
        ClientStream,
        "/trove.v1.Objects/Put",
        vec![enc(pb::PutObjectRequest {
            header: Some(pb::PutObjectHeader {
                namespace: NS.into(),
                hash: "a".repeat(64),
                size: None,
            }),
            data: Bytes::from_static(b"x"),
            finish: true,
        })],
        Code::InvalidArgument,
    ));
    cases.push((
        "Artifacts.Put with a short body".into(),
        ClientStream,
        "/trove.v1.Artifacts/Put",
        vec![enc(pb::PutArtifactRequest {
            header: Some(pb::PutArtifactHeader {
                namespace: NS.into(),
                key: "k".into(),
                content_type: String::new(),
                size: Some(1_000_000),
            }),
            data: Bytes::from_static(b"x"),
            finish: true,
        })],
        Code::InvalidArgument,
    ));
    // Malformed streams on every streamed upload.
    for (path, header, data) in [
        (
            "/trove.v1.Objects/Put",
            enc(pb::PutObjectRequest {
                header: Some(pb::PutObjectHeader {
                    namespace: NS.into(),
                    hash: "h".into(),
                    size: None,
                }),
                data: Bytes::new(),
                finish: false,
            }),
            enc(pb::PutObjectRequest {
                header: None,
                data: Bytes::from_static(b"d"),
                finish: false,
            }),
        ),
        (
            "/trove.v1.Objects/PutStream",
            enc(pb::PutStreamRequest {
                header: Some(pb::PutStreamHeader {
                    namespace: NS.into(),
                    hash: "h".into(),
                }),
                chunks: vec![],
                finish: false,
            }),
            enc(pb::PutStreamRequest {
                header: None,
                chunks: vec![pb::StreamChunk {
                    data: Bytes::from_static(b"d"),
                    timestamp: None,
                }],
                finish: false,
            }),
        ),
        (
            "/trove.v1.Artifacts/Put",
            enc(pb::PutArtifactRequest {
                header: Some(pb::PutArtifactHeader {
                    namespace: NS.into(),
                    key: "k".into(),
                    content_type: String::new(),
                    size: None,
                }),
                data: Bytes::new(),
                finish: false,
            }),
            enc(pb::PutArtifactRequest {
                header: None,
                data: Bytes::from_static(b"d"),
                finish: false,
            }),
        ),
        (
            "/trove.v1.Entries/Replace",
            enc(pb::ReplaceRequest {
                header: Some(pb::ReplaceHeader {
                    namespace: NS.into(),
                    cassette: "c".into(),
                }),
                entries: vec![],
                finish: false,
            }),
            enc(pb::ReplaceRequest {
                header: None,
                entries: vec![pb::Entry {
                    json: Bytes::from_static(b"{}"),
                    recorded_at: None,
                }],
                finish: false,
            }),
        ),
        (
            "/trove.v1.Cache/Upload",
            enc(pb::UploadRequest {
                header: Some(pb::UploadHeader {
                    scope: scope("main"),
                    r#ref: "r".into(),
                    tree_sha: None,
                    uploaded_at: None,
                    size: None,
                }),
                data: Bytes::new(),
                finish: false,
            }),
            enc(pb::UploadRequest {
                header: None,
                data: Bytes::from_static(b"d"),
                finish: false,
            }),
        ),
    ] {
        cases.push((
            format!("{path}: empty stream"),
            ClientStream,
            path,
            vec![],
            Code::InvalidArgument,
        ));
        cases.push((
            format!("{path}: no header"),
            ClientStream,
            path,
            vec![data.clone()],
            Code::InvalidArgument,
        ));
        cases.push((
            format!("{path}: header twice"),
            ClientStream,
            path,
            vec![header.clone(), header.clone()],
            Code::InvalidArgument,
        ));
        cases.push((
            format!("{path}: ends early (no finish)"),
            ClientStream,
            path,
            vec![header.clone(), data.clone()],
            Code::InvalidArgument,
        ));
        let mut big = vec![0u8; 2 * 1024 * 1024];
        big[0] = 0x12; // field 2, length-delimited: a huge data field
        cases.push((
            format!("{path}: message over the limit"),
            ClientStream,
            path,
            vec![header.clone(), Bytes::from(big)],
            Code::ResourceExhausted,
        ));
    }
    cases
}

/// Every hostile case gets its documented status; the server stays healthy and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_rejects_hostile_input() {
    let mut server = ServerProcess::start_with(&["--max-message-bytes", "1048576"]).await;
    seed(&server).await;
    let before = (snapshot(&server).await, store_stats(&mut server).await);
    let channel = server.channel().await;
    let cases = cases();
    let mut failures = Vec::new();
    for (what, kind, path, messages, expected) in &cases {
        let got = call(&channel, *kind, path, messages.clone()).await;
        if got != *expected {
            failures.push(format!("{what}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    println!(
        "hostile input: {} cases, all with their documented status",
        cases.len()
    );
    assert_eq!(
        health_status(server.addr, "").await,
        Some(ServingStatus::Serving)
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
    let after = (snapshot(&server).await, store_stats(&mut server).await);
    assert_eq!(before, after, "the hostile calls changed what is stored");
}

/// Stores one item of every kind in [`NS`], where the hostile cases aim:
/// an artifact, an object, the cassette `c`, refs on main and on the PR
/// branch `feature` under prefix `p`, and `feature`'s branch ref map.
async fn seed(server: &ServerProcess) {
    let client = server.client().await;
    let ns = trove_proto::types::Namespace::new(NS).expect("ns");
    trove_tests::store_one_of_each(&client, &ns).await;
    let mut cache = pb::cache_client::CacheClient::new(server.channel().await);
    for branch in ["main", "feature"] {
        let upload = pb::UploadRequest {
            header: Some(pb::UploadHeader {
                scope: scope(branch),
                r#ref: format!("seed-{branch}"),
                tree_sha: None,
                uploaded_at: None,
                size: None,
            }),
            data: Bytes::from_static(b"seed archive"),
            finish: true,
        };
        cache
            .upload(futures::stream::iter([upload]))
            .await
            .expect("seed upload");
    }
    cache
        .write_branch_refs(pb::WriteBranchRefsRequest {
            namespace: NS.into(),
            prefix: "p".into(),
            branch: "feature".into(),
            default_branch: "main".into(),
            refs: [("seed".to_owned(), 1)].into(),
        })
        .await
        .expect("seed branch refs");
}

/// What the server shows of [`NS`]: every listing, the cassette's entries,
/// both tiers' refs and the branch map.
async fn snapshot(server: &ServerProcess) -> String {
    use futures::TryStreamExt;
    use trove_proto::types::{ListPage, Name, Namespace};
    use trove_proto::{ArtifactStore, EntryStore, ObjectStore};
    let client = server.client().await;
    let ns = Namespace::new(NS).expect("ns");
    let page = ListPage::first("");
    let artifacts = client.list_artifacts(&ns, &page, true).await.expect("list");
    let objects = client.list_objects(&ns, &page).await.expect("list");
    let cassettes = client.list_cassettes(&ns, &page).await.expect("list");
    let entries: Vec<_> = client
        .read_entries(&ns, &Name::new("c", "c").expect("name"), Default::default())
        .await
        .expect("read")
        .try_collect()
        .await
        .expect("entries");
    let mut cache = pb::cache_client::CacheClient::new(server.channel().await);
    let mut refs = Vec::new();
    for branch in ["main", "feature"] {
        let listed = cache
            .list_refs(pb::ListRefsRequest {
                scope: scope(branch),
                page_size: 0,
                page_token: String::new(),
            })
            .await
            .expect("list refs")
            .into_inner();
        refs.push(listed.refs);
    }
    let map = cache
        .branch_refs(pb::BranchRefsRequest {
            namespace: NS.into(),
            prefix: "p".into(),
            branch: "feature".into(),
        })
        .await
        .expect("branch refs")
        .into_inner();
    let mut map: Vec<_> = map.refs.into_iter().collect();
    map.sort();
    format!("{artifacts:?}\n{objects:?}\n{cassettes:?}\n{entries:?}\n{refs:?}\n{map:?}")
}

/// Every key, blob and staged file of the data directory, counted with the
/// server stopped (then started again on the same data).
async fn store_stats(server: &mut ServerProcess) -> (u64, u64, u64) {
    server.kill9();
    let data_dir = server.data_dir.clone();
    let stats = tokio::task::spawn_blocking(move || {
        trove_server::SledStore::open(&data_dir, Default::default()).and_then(|s| s.stats())
    })
    .await
    .expect("join")
    .expect("open the data directory");
    server.restart().await;
    (stats.keys, stats.blob_files, stats.staged_files)
}

async fn assert_nothing_written(server: &ServerProcess) {
    use trove_proto::types::{ListPage, Namespace};
    use trove_proto::{ArtifactStore, EntryStore, ObjectStore};
    let client = server.client().await;
    let ns = Namespace::new(NS).expect("ns");
    let page = ListPage::first("");
    assert!(
        client
            .list_artifacts(&ns, &page, false)
            .await
            .expect("list")
            .items
            .is_empty(),
        "artifacts written"
    );
    assert!(
        client
            .list_objects(&ns, &page)
            .await
            .expect("list")
            .items
            .is_empty(),
        "objects written"
    );
    assert!(
        client
            .list_cassettes(&ns, &page)
            .await
            .expect("list")
            .items
            .is_empty(),
        "cassettes written"
    );
    let refs = call(
        &server.channel().await,
        Kind::Unary,
        "/trove.v1.Cache/ListRefs",
        vec![enc(pb::ListRefsRequest {
            scope: scope("main"),
            page_size: 0,
            page_token: String::new(),
        })],
    )
    .await;
    assert_eq!(refs, Code::Ok);
    let mut cache = pb::cache_client::CacheClient::new(server.channel().await);
    for branch in ["main", "feature"] {
        let listed = cache
            .list_refs(pb::ListRefsRequest {
                scope: scope(branch),
                page_size: 0,
                page_token: String::new(),
            })
            .await
            .expect("list refs")
            .into_inner();
        assert!(listed.refs.is_empty(), "cache refs written on {branch}");
    }
}

/// Two thousand uploads cancelled midway, over sixteen connections, in
/// rounds of 250 held open until the server counts them in flight: every
/// one reached the server (it records 2,000 cancelled Puts), and the server
/// stays healthy with nothing stored and nothing staged anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_aborted_uploads() {
    const ROUNDS: usize = 8;
    const PER_ROUND: usize = 250;
    let mut server = ServerProcess::start().await;
    let metrics = server.metrics_addr.expect("metrics");
    let mut channels = Vec::new();
    for _ in 0..16 {
        channels.push(server.channel().await);
    }
    let in_flight = |text: &str| -> f64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("trove_requests_in_flight "))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum()
    };
    for round in 0..ROUNDS {
        // The previous round's calls have all ended on the server, so this
        // round never meets the concurrency limit.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let held = in_flight(&trove_tests::harness::scrape(metrics).await);
            if held < 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {held} calls still in flight"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (cancel, cancelled) = tokio::sync::watch::channel(false);
        let uploads: Vec<_> = (0..PER_ROUND)
            .map(|i| {
                let channel = channels[i % channels.len()].clone();
                let mut cancelled = cancelled.clone();
                tokio::spawn(async move {
                    let header = enc(pb::PutArtifactRequest {
                        header: Some(pb::PutArtifactHeader {
                            namespace: NS.into(),
                            key: format!("aborted-{round}-{i}"),
                            content_type: String::new(),
                            size: None,
                        }),
                        data: Bytes::from(vec![7u8; 100_000]),
                        finish: false,
                    });
                    let body = futures::StreamExt::chain(
                        futures::stream::iter(vec![header]),
                        futures::stream::pending(),
                    );
                    let mut grpc = tonic::client::Grpc::new(channel);
                    grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
                    let call = grpc.client_streaming(
                        tonic::Request::new(body),
                        tonic::codegen::http::uri::PathAndQuery::from_static(
                            "/trove.v1.Artifacts/Put",
                        ),
                        RawCodec,
                    );
                    // Held until the test cancels it by dropping the call.
                    tokio::select! {
                        outcome = call => Err(format!("the server ended an unfinished upload: {outcome:?}")),
                        _ = cancelled.wait_for(|c| *c) => Ok(()),
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let held = in_flight(&trove_tests::harness::scrape(metrics).await);
            if held >= PER_ROUND as f64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: only {held} uploads reached the server"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.send(true).expect("cancel");
        for upload in uploads {
            upload
                .await
                .expect("join")
                .expect("an upload held until cancelled");
        }
    }
    // Every upload reached the server and ended unstored: each is recorded
    // once it ends (as CANCELLED, or INVALID_ARGUMENT when the reset shows
    // up as an end of stream without `finish`), and none as OK.
    let total = ROUNDS * PER_ROUND;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = trove_tests::harness::scrape(metrics).await;
        let puts: Vec<(String, f64)> = text
            .lines()
            .filter(|l| {
                l.starts_with("trove_requests_total{")
                    && l.contains("service=\"trove.v1.Artifacts\"")
                    && l.contains("method=\"Put\"")
            })
            .filter_map(|l| {
                let code = l.split("code=\"").nth(1)?.split('"').next()?.to_owned();
                Some((code, l.rsplit(' ').next()?.parse::<f64>().ok()?))
            })
            .collect();
        let ended: f64 = puts.iter().map(|(_, n)| n).sum();
        if ended >= total as f64 {
            assert!((ended - total as f64).abs() < f64::EPSILON, "{puts:?}");
            assert!(puts.iter().all(|(code, _)| code != "OK"), "{puts:?}");
            println!("aborted uploads as the server recorded them: {puts:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ended} of {total} uploads recorded: {puts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        health_status(server.addr, "").await,
        Some(ServingStatus::Serving)
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
    assert_nothing_written(&server).await;
    let (keys, blobs, staged) = store_stats(&mut server).await;
    assert_eq!(
        (keys, blobs, staged),
        (0, 0, 0),
        "keys, blobs and staged files left"
    );
}

/// Hostile `authorization` headers on a server with tokens: malformed,
/// oversized and repeated ones are UNAUTHENTICATED (never a panic, never
/// another principal), an enormous one is refused without harm, the health
/// check ignores them all, and the real token still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_authorization_headers() {
    use sha2::Digest;
    use tonic::metadata::MetadataValue;
    let dir = tempfile::tempdir().expect("temp dir");
    let grants = dir.path().join("grants.toml");
    std::fs::write(
        &grants,
        format!(
            "[[token]]\nname = \"good\"\nsha256 = \"{}\"\nnamespaces = [\"*\"]\npermissions = [\"read\"]\n",
            hex::encode(sha2::Sha256::digest(b"good-token"))
        ),
    )
    .expect("grants");
    let server =
        ServerProcess::start_with(&["--auth-tokens", grants.to_str().expect("path")]).await;
    // A fresh connection per call: the server may reset one that sent a
    // header past the HTTP/2 limits.
    let stat = |headers: Vec<String>| {
        let server = &server;
        async move {
            let mut client = pb::artifacts_client::ArtifactsClient::new(server.channel().await);
            let mut request = tonic::Request::new(pb::StatArtifactRequest {
                namespace: "n".into(),
                key: "k".into(),
            });
            for header in headers {
                let value: MetadataValue<_> = header.parse().expect("ASCII header");
                request.metadata_mut().append("authorization", value);
            }
            match client.stat(request).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            }
        }
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("no scheme", vec!["good-token".into()]),
        ("basic auth", vec!["Basic Z29vZDp0b2tlbg==".into()]),
        ("scheme only", vec!["Bearer".into()]),
        ("empty token", vec!["Bearer ".into()]),
        ("two words", vec!["Bearer good-token extra".into()]),
        ("other scheme", vec!["Token good-token".into()]),
        ("unknown token", vec!["Bearer bad-token".into()]),
        (
            "repeated, both good",
            vec!["Bearer good-token".into(), "Bearer good-token".into()],
        ),
        (
            "repeated, one good",
            vec!["Bearer bad".into(), "Bearer good-token".into()],
        ),
        ("oversized", vec![format!("Bearer {}", "x".repeat(5000))]),
        (
            "oversized, good prefix",
            vec![format!("Bearer good-token{}", "x".repeat(5000))],
        ),
    ];
    for (what, headers) in cases {
        assert_eq!(stat(headers).await, Code::Unauthenticated, "{what}");
    }
    // Far past any header limit: refused one way or another, harmlessly.
    let enormous = stat(vec![format!("Bearer {}", "y".repeat(200_000))]).await;
    assert_ne!(
        enormous,
        Code::Ok,
        "an enormous header must not be accepted"
    );
    // Health ignores credentials; the good token, any case of the scheme, works.
    assert_eq!(
        health_status(server.addr, "").await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(stat(vec!["bearer good-token".into()]).await, Code::NotFound);
    assert_eq!(stat(vec!["Bearer good-token".into()]).await, Code::NotFound);
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
}
