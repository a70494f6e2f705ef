//! Exact usage through `trove.v1.Admin/Usage`, against the real binary:
//! figures per namespace and group, and the same figures after a `kill -9`
//! and a restart.

use std::time::Duration;

use bytes::Bytes;
use trove_proto::admin::{UsageRow, GROUP_ARTIFACTS, GROUP_CASSETTES, GROUP_ENTRIES};
use trove_proto::entries::NewEntry;
use trove_proto::types::{Name, Namespace};
use trove_proto::{ArtifactStore, EntryStore, UsageStore};
use trove_tests::bytes_stream;
use trove_tests::harness::{wait_store_gauges, ServerProcess};

fn figures(rows: &[UsageRow], ns: &str, group: &str) -> (u64, u64) {
    rows.iter()
        .find(|r| r.namespace == ns && r.group == group)
        .map_or((0, 0), |r| (r.items, r.logical_bytes))
}

/// Writes in two namespaces are counted exactly, each namespace can be
/// asked alone, and a `kill -9` changes nothing in the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_exact_and_survives_kill9() {
    let mut server = ServerProcess::start().await;
    let client = server.client().await;
    let (a, b) = (
        Namespace::new("usage-a").expect("ns"),
        Namespace::new("usage-b").expect("ns"),
    );
    for (ns, key, size) in [(&a, "one", 1000usize), (&a, "two", 2000), (&b, "one", 10)] {
        client
            .put_artifact(
                ns,
                &Name::new("key", key).expect("key"),
                Default::default(),
                bytes_stream(vec![Bytes::from(vec![7u8; size])]),
            )
            .await
            .expect("put");
    }
    client
        .delete_artifact(&a, &Name::new("key", "two").expect("key"))
        .await
        .expect("delete");
    let entry = NewEntry::parse("entry", Bytes::from_static(b"{\"n\":1}"), Some(1)).expect("entry");
    client
        .append_entries(
            &b,
            &Name::new("cassette", "c").expect("cassette"),
            vec![entry],
            Default::default(),
        )
        .await
        .expect("append");

    let before = client.namespace_usage(None).await.expect("usage");
    assert_eq!(figures(&before, "usage-a", GROUP_ARTIFACTS), (1, 1000));
    assert_eq!(figures(&before, "usage-b", GROUP_ARTIFACTS), (1, 10));
    assert_eq!(figures(&before, "usage-b", GROUP_CASSETTES), (1, 0));
    assert_eq!(figures(&before, "usage-b", GROUP_ENTRIES), (1, 7));
    let only_a = client.namespace_usage(Some(&a)).await.expect("usage of a");
    assert!(
        !only_a.is_empty() && only_a.iter().all(|r| r.namespace == "usage-a"),
        "{only_a:?}"
    );

    server.restart().await;
    let client = server.client().await;
    let after = client
        .namespace_usage(None)
        .await
        .expect("usage after restart");
    assert_eq!(after, before);

    // The same counters reach /metrics, one series per namespace and group.
    let metrics = server.metrics_addr.expect("metrics listener");
    let key = |ns: &str, group: &str| (ns.to_owned(), group.to_owned(), String::new());
    let gauges = wait_store_gauges(metrics, Duration::from_secs(30), |g| {
        g.usage.contains_key(&key("usage-b", GROUP_ENTRIES))
    })
    .await;
    assert_eq!(
        gauges.usage[&key("usage-a", GROUP_ARTIFACTS)],
        (1.0, 1000.0)
    );
    assert_eq!(gauges.usage[&key("usage-b", GROUP_ENTRIES)], (1.0, 7.0));
}

/// A namespace quota from the config file, through the real binary: a put
/// that would pass it is RESOURCE_EXHAUSTED naming the namespace, and the
/// usage shows that nothing was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_quota_refuses_over_grpc() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("trove.toml");
    std::fs::write(
        &config,
        "[namespaces.\"capped\"]\nmax_bytes = 1000\non_full = \"reject\"\n",
    )
    .expect("config");
    let server = ServerProcess::start_with(&["--config", config.to_str().expect("path")]).await;
    let client = server.client().await;
    let capped = Namespace::new("capped").expect("ns");
    let put = |key: &'static str, size: usize| {
        let (client, capped) = (client.clone(), capped.clone());
        async move {
            client
                .put_artifact(
                    &capped,
                    &Name::new("key", key).expect("key"),
                    Default::default(),
                    bytes_stream(vec![Bytes::from(vec![1u8; size])]),
                )
                .await
        }
    };
    put("first", 600).await.expect("fits");
    let err = put("second", 600).await.expect_err("over the quota");
    match &err {
        trove_proto::Error::ResourceExhausted { limit, message } => {
            assert!(limit.contains("capped"), "{limit}");
            assert!(message.contains("1000"), "{message}");
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    let rows = client.namespace_usage(Some(&capped)).await.expect("usage");
    assert_eq!(figures(&rows, "capped", GROUP_ARTIFACTS), (1, 600));
}

/// An evicting namespace through the real binary: uploads past the quota
/// are accepted, the server evicts in the background down to the low
/// watermark (polled through Admin/Usage, never slept for), the least
/// recently used objects go first while one that was read stays, and the
/// figures are the same after a `kill -9` and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_namespace_evicts_least_recently_used_over_grpc() {
    use sha2::Digest;
    use trove_proto::admin::GROUP_OBJECTS;
    use trove_proto::ObjectStore;

    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("trove.toml");
    std::fs::write(
        &config,
        "[namespaces.\"cache\"]\nmax_bytes = 20000\non_full = \"evict\"\n",
    )
    .expect("config");
    let mut server = ServerProcess::start_with(&["--config", config.to_str().expect("path")]).await;
    let client = server.client().await;
    let cache = Namespace::new("cache").expect("ns");
    let mut hashes = Vec::new();
    for n in 0..30u32 {
        let mut value = format!("value {n} ").into_bytes();
        value.resize(1000, b'.');
        let hash = Name::new("hash", hex::encode(sha2::Sha256::digest(&value))).expect("hash");
        // Past the quota plus 10%, a put waits for eviction: RESOURCE_EXHAUSTED
        // "retry shortly", which a client retries.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let body = bytes_stream(vec![Bytes::from(value.clone())]);
            match client.put_object(&cache, &hash, Some(1000), body).await {
                Ok(_) => break,
                Err(trove_proto::Error::ResourceExhausted { message, .. })
                    if message.contains("retry shortly")
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::task::yield_now().await;
                }
                Err(other) => panic!("put {n}: {other:?}"),
            }
        }
        hashes.push(hash);
        if n == 15 {
            // Read the first value before the quota is reached: it is used
            // now, after values 1..15, so eviction takes those first.
            let (_, body) = client.get_object(&cache, &hashes[0]).await.expect("get");
            drop(body);
        }
    }
    // A pass goes on to the low watermark in batches with rests of up to
    // 50 ms between them, so usage and presence are read until a pass is
    // over: usage under `max_bytes` and unchanged across a window longer
    // than a rest, with the presence check inside it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (rows, gone) = loop {
        let rows = client.namespace_usage(Some(&cache)).await.expect("usage");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let missing = client
            .find_missing(&cache, &hashes)
            .await
            .expect("find missing");
        let again = client.namespace_usage(Some(&cache)).await.expect("usage");
        if figures(&rows, "cache", GROUP_OBJECTS).1 <= 20_000
            && figures(&rows, "cache", GROUP_OBJECTS) == figures(&again, "cache", GROUP_OBJECTS)
        {
            let gone: Vec<usize> = hashes
                .iter()
                .enumerate()
                .filter(|(_, h)| missing.contains(h))
                .map(|(n, _)| n)
                .collect();
            break (rows, gone);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "eviction did not reach the low watermark: {rows:?}"
        );
        tokio::task::yield_now().await;
    };
    // Eviction ran one or more times while the uploads went on; each pass
    // stopped at 18,000 bytes, so between 10 and 12 values went.
    let (items, bytes) = figures(&rows, "cache", GROUP_OBJECTS);
    assert_eq!(bytes, items * 1000);
    assert!((18..=20).contains(&items), "{rows:?}");
    let evicted = 30 - usize::try_from(items).expect("items");
    assert_eq!(
        gone,
        (1..=evicted).collect::<Vec<_>>(),
        "not least recently used first"
    );

    server.kill9();
    server.restart().await;
    let client = server.client().await;
    let after = client.namespace_usage(Some(&cache)).await.expect("usage");
    assert_eq!(after, rows);
}
