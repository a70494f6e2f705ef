//! Cassettes through the real binary: wire-level validation, Replace streams
//! cut short, and the buffered writer across a server outage.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tonic::Code;
use trove_client::{CassetteWriter, WriterConfig};
use trove_proto::entries::{NewEntry, ReadOptions};
use trove_proto::pb;
use trove_proto::pb::entries_client::EntriesClient;
use trove_proto::types::{Name, Namespace};
use trove_proto::EntryStore;
use trove_tests::harness::ServerProcess;

fn entry(json: &'static str) -> pb::Entry {
    pb::Entry {
        json: Bytes::from_static(json.as_bytes()),
        recorded_at: None,
    }
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "{:?} should mention {needle:?}",
                status.message()
            );
        }
        Ok(value) => panic!("expected {code:?}, got {value:?}"),
    }
}

async fn stored(
    client: &mut EntriesClient<tonic::transport::Channel>,
    cassette: &str,
) -> Vec<String> {
    let mut stream = client
        .read(pb::ReadRequest {
            namespace: "bad".into(),
            cassette: cassette.into(),
            ..Default::default()
        })
        .await
        .expect("read")
        .into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.message().await.expect("message") {
        out.extend(
            message
                .entries
                .into_iter()
                .map(|e| String::from_utf8_lossy(&e.json).into_owned()),
        );
    }
    out
}

/// Non-object JSON, invalid JSON, oversize entries and bad names are rejected whole.
#[tokio::test]
async fn bad_entries_are_rejected_and_nothing_is_written() {
    let server = ServerProcess::start_with(&["--max-message-bytes", "1048576"]).await;
    let mut client = EntriesClient::new(server.channel().await);
    let append = |cassette: &str, entries: Vec<pb::Entry>| pb::AppendRequest {
        namespace: "bad".into(),
        cassette: cassette.into(),
        entries,
        idempotency_key: String::new(),
    };
    let cases = [
        (vec![entry(r#"{"ok":1}"#), entry("[1,2]")], "entries[1]"),
        (vec![entry(r#"{"ok":1}"#), entry("42")], "JSON object"),
        (vec![entry("{not json")], "not valid JSON"),
        (vec![entry("")], "entries[0]"),
        (vec![], "at least one"),
    ];
    for (entries, needle) in cases {
        assert_status(
            client.append(append("c", entries)).await,
            Code::InvalidArgument,
            needle,
        );
    }
    let huge = pb::Entry {
        json: Bytes::from(format!("{{\"body\":\"{}\"}}", "x".repeat(2 * 1024 * 1024))),
        recorded_at: None,
    };
    assert_status(
        client.append(append("c", vec![huge])).await,
        Code::ResourceExhausted,
        "max_message_bytes",
    );
    for bad_name in ["", "a\0b"] {
        assert_status(
            client.append(append(bad_name, vec![entry("{}")])).await,
            Code::InvalidArgument,
            "cassette",
        );
    }
    let long = "n".repeat(1025);
    assert_status(
        client
            .exists(pb::ExistsRequest {
                namespace: "bad".into(),
                cassette: long,
            })
            .await,
        Code::InvalidArgument,
        "cassette",
    );
    assert_status(
        client
            .read(pb::ReadRequest {
                namespace: "bad".into(),
                cassette: "c".into(),
                after: "garbage".into(),
                limit: 0,
            })
            .await
            .map(|_| ()),
        Code::InvalidArgument,
        "after",
    );
    assert!(stored(&mut client, "c").await.is_empty());
    let exists = client
        .exists(pb::ExistsRequest {
            namespace: "bad".into(),
            cassette: "c".into(),
        })
        .await
        .expect("exists");
    assert!(
        !exists.into_inner().exists,
        "a rejected append must not create the cassette"
    );
}

/// A Replace stream that ends without `finish`, or carries a bad entry, leaves the old content.
#[tokio::test]
async fn cut_short_or_invalid_replace_changes_nothing() {
    let server = ServerProcess::start().await;
    let mut client = EntriesClient::new(server.channel().await);
    client
        .append(pb::AppendRequest {
            namespace: "bad".into(),
            cassette: "c".into(),
            entries: vec![entry(r#"{"v":"old"}"#)],
            idempotency_key: String::new(),
        })
        .await
        .expect("append");
    let header = || pb::ReplaceRequest {
        header: Some(pb::ReplaceHeader {
            namespace: "bad".into(),
            cassette: "c".into(),
        }),
        entries: vec![entry(r#"{"v":"new"}"#)],
        finish: false,
    };
    let no_finish = vec![header()];
    assert_status(
        client.replace(futures::stream::iter(no_finish)).await,
        Code::InvalidArgument,
        "finish",
    );
    let bad_entry = vec![
        header(),
        pb::ReplaceRequest {
            header: None,
            entries: vec![entry("[]")],
            finish: true,
        },
    ];
    assert_status(
        client.replace(futures::stream::iter(bad_entry)).await,
        Code::InvalidArgument,
        "entries[1]",
    );
    assert_eq!(stored(&mut client, "c").await, [r#"{"v":"old"}"#]);
}

fn new_entry(n: i64) -> NewEntry {
    NewEntry::parse("entry", Bytes::from(format!("{{\"n\":{n}}}")), Some(n)).expect("entry")
}

/// The writer reports a failed flush during an outage and stores everything once the server is back.
#[tokio::test]
async fn writer_survives_a_server_outage() {
    let mut server = ServerProcess::start().await;
    let client = Arc::new(server.client().await);
    let config = WriterConfig {
        namespace: Namespace::new("writer").expect("ns"),
        batch_size: 5,
        batch_timeout: Duration::from_millis(20),
    };
    let writer = CassetteWriter::new(Arc::clone(&client), config.clone());
    let cassette = Name::new("cassette", "outage.json").expect("name");
    for n in 0..7 {
        writer.write(&cassette, new_entry(n)).expect("write");
    }
    writer.flush(&cassette).await.expect("flush while up");
    server.kill9();
    for n in 7..19 {
        writer
            .write(&cassette, new_entry(n))
            .expect("write returns at once even while down");
    }
    let err = writer
        .flush(&cassette)
        .await
        .expect_err("flush must report the outage");
    assert!(
        matches!(
            err,
            trove_proto::Error::Unavailable { .. }
                | trove_proto::Error::Internal { .. }
                | trove_proto::Error::Cancelled { .. }
        ),
        "{err:?}"
    );
    assert_eq!(
        writer.pending(&cassette).await.expect("pending"),
        12,
        "entries stay pending"
    );
    server.restart_same_address().await;
    let mut flushed = writer.flush(&cassette).await;
    // The channel may need a moment to notice the new server; retry a few times.
    for _ in 0..50 {
        if flushed.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        flushed = writer.flush(&cassette).await;
    }
    flushed.expect("flush after the server is back");
    writer.shutdown().await.expect("shutdown");
    let stream = client
        .read_entries(&config.namespace, &cassette, ReadOptions::default())
        .await
        .expect("read");
    let times: Vec<i64> = stream
        .map(|e| e.expect("entry").recorded_at)
        .collect()
        .await;
    assert_eq!(
        times,
        (0..19).collect::<Vec<_>>(),
        "nothing lost, nothing duplicated"
    );
}

/// An Append retried with the same idempotency key is stored once; a new key appends again.
#[tokio::test]
async fn idempotent_append_retries_store_once() {
    let server = ServerProcess::start().await;
    let mut client = EntriesClient::new(server.channel().await);
    let request = |key: &str| pb::AppendRequest {
        namespace: "bad".into(),
        cassette: "once".into(),
        entries: vec![entry(r#"{"n":1}"#), entry(r#"{"n":2}"#)],
        idempotency_key: key.into(),
    };
    for _ in 0..3 {
        let reply = client
            .append(request("batch-1"))
            .await
            .expect("append")
            .into_inner();
        assert_eq!(reply.appended, 2);
    }
    assert_eq!(stored(&mut client, "once").await.len(), 2);
    client.append(request("batch-2")).await.expect("append");
    assert_eq!(stored(&mut client, "once").await.len(), 4);
    let bad = pb::AppendRequest {
        idempotency_key: "a\0".into(),
        ..request("x")
    };
    assert_status(
        client.append(bad).await,
        Code::InvalidArgument,
        "idempotency_key",
    );
}

/// Idempotency keys are collected with the cassette generation they were
/// applied to: after many cycles of append-with-key then delete, the data
/// directory holds no key at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_collected_with_their_cassette() {
    use trove_proto::entries::AppendOptions;
    let mut server = ServerProcess::start().await;
    let client = server.client().await;
    let ns = Namespace::new("keys").expect("ns");
    let cassette = Name::new("cassette", "cycled").expect("name");
    for cycle in 0..300 {
        let entry =
            NewEntry::parse("entry", bytes::Bytes::from_static(b"{\"n\":1}"), None).expect("entry");
        let options = AppendOptions {
            idempotency_key: Some(Name::new("key", format!("batch-{cycle}")).expect("key")),
        };
        client
            .append_entries(&ns, &cassette, vec![entry], options)
            .await
            .expect("append");
        assert!(client
            .delete_cassette(&ns, &cassette)
            .await
            .expect("delete"));
    }
    server.kill9();
    let data_dir = server.data_dir.clone();
    let stats = tokio::task::spawn_blocking(move || {
        trove_server::SledStore::open(&data_dir, Default::default()).and_then(|s| s.stats())
    })
    .await
    .expect("join")
    .expect("open the data directory");
    assert_eq!(
        stats.keys, 0,
        "keys left after every cassette was deleted: {stats:?}"
    );
}
