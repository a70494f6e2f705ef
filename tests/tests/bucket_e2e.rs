//! Stateless servers on one bucket: two `trove-server` processes on the S3
//! cluster serve the same data, concurrent writers through both apply in
//! some serial order, and losing a volume server mid-load loses no
//! acknowledged write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use trove_client::TroveClient;
use trove_proto::artifacts::PutOptions;
use trove_proto::cache::{CacheScope, PruneOptions, UploadOptions};
use trove_proto::entries::{AppendOptions, NewEntry, ReadOptions};
use trove_proto::types::{Name, Namespace};
use trove_proto::{ArtifactStore, CacheStore, EntryStore, Error, ObjectStore};
use trove_tests::harness::{wait_store_gauges, ServerProcess};
use trove_tests::seaweedfs::Cluster;
use trove_tests::target::{s3_cluster, s3_test_url};
use trove_tests::{
    bytes_stream, collect_bytes, generated_sha256, generated_stream, sha256_hex, store_one_of_each,
};

fn name(s: &str) -> Name {
    Name::new("name", s).expect("valid name")
}

fn ns() -> Namespace {
    Namespace::new("two-servers").expect("valid namespace")
}

/// Two servers on one fresh root of the shared test cluster.
async fn two_servers() -> Option<(ServerProcess, ServerProcess)> {
    let (endpoint, bucket) = s3_cluster()?;
    let url = s3_test_url(&bucket, "two-servers");
    // Both keep a local blob cache: it must never change what they serve.
    let args = [
        "--store",
        url.as_str(),
        "--s3-endpoint",
        endpoint.as_str(),
        "--blob-cache-bytes",
        "67108864",
    ];
    let a = ServerProcess::start_with(&args).await;
    let b = ServerProcess::start_with(&args).await;
    Some((a, b))
}

async fn read_artifact(client: &TroveClient, key: &str) -> Result<Vec<u8>, Error> {
    read_artifact_in(client, &ns(), key).await
}

async fn read_artifact_in(
    client: &TroveClient,
    ns: &Namespace,
    key: &str,
) -> Result<Vec<u8>, Error> {
    let (_, stream) = client.get_artifact(ns, &name(key)).await?;
    collect_bytes(stream).await
}

/// What one server writes, the other reads at once, for every group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_server_read_your_writes() {
    let Some((a, b)) = two_servers().await else {
        return;
    };
    let (ca, cb) = (a.client().await, b.client().await);
    for round in 0..20 {
        let (writer, reader) = if round % 2 == 0 {
            (&ca, &cb)
        } else {
            (&cb, &ca)
        };
        let value = format!("value {round}");
        writer
            .put_artifact(
                &ns(),
                &name("shared"),
                PutOptions::default(),
                bytes_stream(vec![value.clone().into()]),
            )
            .await
            .expect("put");
        assert_eq!(
            read_artifact(reader, "shared").await.expect("get"),
            value.as_bytes()
        );
    }
    // Large values (blobs, cached by the reader) too: an overwrite or a
    // delete through one server is what the other serves next.
    for round in 0..3u64 {
        let value = generated_stream(round, 300_000, 65_536);
        ca.put_artifact(&ns(), &name("big"), PutOptions::default(), value)
            .await
            .expect("put big");
        let want = generated_sha256(round, 300_000, 65_536).await;
        for _ in 0..2 {
            let got = read_artifact(&cb, "big").await.expect("get big");
            assert_eq!(sha256_hex(&got), want, "round {round}");
        }
    }
    assert!(ca
        .delete_artifact(&ns(), &name("big"))
        .await
        .expect("delete big"));
    assert!(matches!(
        read_artifact(&cb, "big").await,
        Err(Error::NotFound { .. })
    ));
    let sha = generated_sha256(9, 3_000_000, 65_536).await;
    ca.put_object(
        &ns(),
        &name(&sha),
        None,
        generated_stream(9, 3_000_000, 65_536),
    )
    .await
    .expect("put object");
    assert!(cb
        .find_missing(&ns(), &[name(&sha)])
        .await
        .expect("find")
        .is_empty());
    let (_, stream) = cb.get_object(&ns(), &name(&sha)).await.expect("get object");
    assert_eq!(sha256_hex(&collect_bytes(stream).await.expect("read")), sha);
    assert!(cb
        .delete_artifact(&ns(), &name("shared"))
        .await
        .expect("delete"));
    assert!(matches!(
        read_artifact(&ca, "shared").await,
        Err(Error::NotFound { .. })
    ));
    a.log()
        .contains("panicked")
        .then(|| panic!("server a panicked"));
    b.log()
        .contains("panicked")
        .then(|| panic!("server b panicked"));
}

/// Appends to one cassette through both servers at once: none lost or
/// doubled, each writer's entries in its own order, and both servers read
/// back the same sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_through_two_servers() {
    let Some((a, b)) = two_servers().await else {
        return;
    };
    let clients = [a.client().await, b.client().await];
    let cassette = name("shared-cassette");
    const WRITERS: usize = 6;
    const BATCHES: usize = 15;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let client = clients[w % 2].clone();
            let cassette = cassette.clone();
            tokio::spawn(async move {
                for i in 0..BATCHES {
                    let entries = (0..2)
                        .map(|j| {
                            let json = format!(r#"{{"writer":{w},"n":{}}}"#, i * 2 + j);
                            NewEntry::parse("entries[0]", Bytes::from(json), None).expect("entry")
                        })
                        .collect();
                    client
                        .append_entries(&ns(), &cassette, entries, AppendOptions::default())
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    let mut sequences = Vec::new();
    for client in &clients {
        let entries: Vec<_> = client
            .read_entries(&ns(), &cassette, ReadOptions::default())
            .await
            .expect("read")
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(|e| e.expect("entry"))
            .collect();
        let parsed: Vec<(u64, u64)> = entries
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_slice(&e.json).expect("json");
                (
                    v["writer"].as_u64().expect("writer"),
                    v["n"].as_u64().expect("n"),
                )
            })
            .collect();
        sequences.push(parsed);
    }
    assert_eq!(
        sequences[0], sequences[1],
        "both servers read the same order"
    );
    let all = &sequences[0];
    assert_eq!(all.len(), WRITERS * BATCHES * 2, "every entry exactly once");
    for w in 0..WRITERS as u64 {
        let mine: Vec<u64> = all
            .iter()
            .filter(|(writer, _)| *writer == w)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            mine,
            (0..(BATCHES * 2) as u64).collect::<Vec<_>>(),
            "writer {w} in order"
        );
    }
}

/// An acknowledged write: key, content seed, size, and the phase it was made in.
type Acked = (String, u64, u64, usize);

fn scope(branch: &str) -> CacheScope {
    CacheScope {
        namespace: ns(),
        prefix: "ci".into(),
        branch: name(branch),
        default_branch: name("main"),
        test_suite_id: String::new(),
    }
}

/// Uploads of one ref through both servers at once leave one complete
/// archive, the same one on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_of_one_ref_leave_one_archive() {
    let Some((a, b)) = two_servers().await else {
        return;
    };
    let clients = [a.client().await, b.client().await];
    let uploads: Vec<_> = (0..12u64)
        .map(|i| {
            let client = clients[(i % 2) as usize].clone();
            tokio::spawn(async move {
                let size = 90_000 + i * 7_000;
                client
                    .upload(
                        &scope("main"),
                        &name("same-ref"),
                        UploadOptions::default(),
                        generated_stream(i, size, 16_384),
                    )
                    .await
                    .expect("upload");
                (generated_sha256(i, size, 16_384).await, size)
            })
        })
        .collect();
    let mut candidates = Vec::new();
    for upload in uploads {
        candidates.push(upload.await.expect("join"));
    }
    let mut served = Vec::new();
    for client in &clients {
        let (found, stream) = client
            .download(&scope("main"), "same-ref", None)
            .await
            .expect("download")
            .expect("hit");
        let data = collect_bytes(stream).await.expect("read");
        let got = (sha256_hex(&data), data.len() as u64);
        assert!(candidates.contains(&got), "one complete upload");
        assert_eq!(found.sha256, got.0);
        assert_eq!(
            client
                .list_refs(&scope("main"), 0, "")
                .await
                .expect("list")
                .items
                .len(),
            1
        );
        served.push(got);
    }
    assert_eq!(served[0], served[1], "both servers serve the same archive");
}

/// Retention applied through one server is what the other sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_from_one_server_is_seen_by_the_other() {
    let Some((a, b)) = two_servers().await else {
        return;
    };
    let (ca, cb) = (a.client().await, b.client().await);
    let base = trove_proto::types::now_micros() - 3_600_000_000;
    for i in 0..6i64 {
        let options = UploadOptions {
            uploaded_at: Some(base + i * 1_000_000),
            ..Default::default()
        };
        ca.upload(
            &scope("main"),
            &name(&format!("ref-{i}")),
            options,
            bytes_stream(vec![format!("archive {i}").into()]),
        )
        .await
        .expect("upload");
    }
    let removed = cb
        .prune(
            &scope("main"),
            PruneOptions {
                count: 2,
                ..Default::default()
            },
        )
        .await
        .expect("prune");
    assert_eq!(removed, 4);
    let listed: Vec<String> = ca
        .list_refs(&scope("main"), 0, "")
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|r| r.r#ref)
        .collect();
    assert_eq!(listed, ["ref-5", "ref-4"]);
    assert!(ca
        .download(&scope("main"), "ref-0", None)
        .await
        .expect("download")
        .is_none());
    assert!(ca
        .download(&scope("main"), "ref-5", None)
        .await
        .expect("download")
        .is_some());
}

/// Writes go on while one of three volume servers is killed and restarted;
/// every acknowledged write is then read back with the right content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_server_loss_loses_no_acknowledged_write() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let url = s3_test_url(&cluster.var("TROVE_S3_BUCKET"), "node-loss");
    let endpoint = cluster.var("TROVE_S3_ENDPOINT");
    let server = ServerProcess::start_with_env(
        &["--store", url.as_str(), "--s3-endpoint", endpoint.as_str()],
        &cluster.server_env(),
    )
    .await;
    let client = server.client().await;

    // phase 0: all up; 1: volume server 2 down; 2: back up.
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let failed: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (client, phase, stop, acked, failed) = (
                client.clone(),
                phase.clone(),
                stop.clone(),
                acked.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("w{w}/{i}");
                    let seed = w * 1_000_000 + i;
                    // Every third value is large enough to be a blob.
                    let size = if i % 3 == 0 { 200_000 } else { 2_000 };
                    let at = phase.load(Ordering::SeqCst);
                    match client
                        .put_artifact(
                            &ns(),
                            &name(&key),
                            PutOptions::default(),
                            generated_stream(seed, size, 32_768),
                        )
                        .await
                    {
                        Ok(_) => acked.lock().expect("lock").push((key, seed, size, at)),
                        Err(_) => {
                            failed[at].fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let acked_in = |p: usize| {
        acked
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.3 == p)
            .count()
    };
    let wait_for = |p: usize, n: usize, what: &'static str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        async move {
            while acked_in(p) < n {
                assert!(
                    Instant::now() < deadline,
                    "{what}: only {} writes acknowledged",
                    acked_in(p)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(0, 40, "before the loss").await;
    tokio::task::block_in_place(|| cluster.kill_volume(2));
    phase.store(1, Ordering::SeqCst);
    wait_for(1, 60, "with a volume server down").await;
    // Reads of what was written before the loss work with the node down.
    let before_loss: Vec<_> = acked
        .lock()
        .expect("lock")
        .iter()
        .filter(|a| a.3 == 0)
        .cloned()
        .collect();
    for (key, seed, size, _) in &before_loss {
        let data = read_artifact(&client, key)
            .await
            .expect("read with a node down");
        assert_eq!(
            sha256_hex(&data),
            generated_sha256(*seed, *size, 32_768).await
        );
    }
    tokio::task::block_in_place(|| cluster.restart_volume(2));
    phase.store(2, Ordering::SeqCst);
    wait_for(2, 40, "after the restart").await;
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.expect("writer");
    }

    let acked = acked.lock().expect("lock").clone();
    let mut lost = Vec::new();
    for (key, seed, size, _) in &acked {
        match read_artifact(&client, key).await {
            Ok(data) if sha256_hex(&data) == generated_sha256(*seed, *size, 32_768).await => {}
            other => lost.push((key.clone(), other.map(|d| d.len()))),
        }
    }
    let per_phase: HashMap<usize, usize> = acked.iter().fold(HashMap::new(), |mut m, a| {
        *m.entry(a.3).or_default() += 1;
        m
    });
    eprintln!(
        "node loss: {} writes acknowledged ({} before, {} with volume server 2 down, {} after its restart); \
         {} attempts failed and were not acknowledged ({} / {} / {}); {} acknowledged writes lost",
        acked.len(),
        per_phase.get(&0).copied().unwrap_or(0),
        per_phase.get(&1).copied().unwrap_or(0),
        per_phase.get(&2).copied().unwrap_or(0),
        failed.iter().map(|f| f.load(Ordering::Relaxed)).sum::<u64>(),
        failed[0].load(Ordering::Relaxed),
        failed[1].load(Ordering::Relaxed),
        failed[2].load(Ordering::Relaxed),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(!server.log().contains("panicked"), "server panicked");
}

/// `/metrics` shows the store gauges on the object-storage engine too: a
/// server started on a bucket root counts what another server stored there,
/// by kind, and the bytes under the root. Entries and logical bytes would
/// take reading every record, so the engine leaves them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_gauges_on_object_storage() {
    let Some((endpoint, bucket)) = s3_cluster() else {
        return;
    };
    let url = s3_test_url(&bucket, "gauges");
    let args = ["--store", url.as_str(), "--s3-endpoint", endpoint.as_str()];
    let a = ServerProcess::start_with(&args).await;
    let ns = Namespace::new("gauges").expect("valid namespace");
    store_one_of_each(&a.client().await, &ns).await;
    // A second server on the same root measures at start.
    let b = ServerProcess::start_with(&args).await;
    let metrics = b.metrics_addr.expect("metrics enabled");
    let gauges = wait_store_gauges(metrics, Duration::from_secs(30), |g| {
        g.items.get("artifact") == Some(&2.0)
    })
    .await;
    for (kind, count) in [
        ("object", 1.0),
        ("stream", 1.0),
        ("artifact", 2.0),
        ("cassette", 1.0),
        ("cache_archive", 1.0),
    ] {
        assert_eq!(gauges.items.get(kind), Some(&count), "{kind}: {gauges:?}");
    }
    assert_eq!(gauges.items.get("entry"), None, "{gauges:?}");
    assert_eq!(gauges.logical_bytes, None, "{gauges:?}");
    assert!(gauges.disk_bytes.is_some_and(|b| b > 0.0), "{gauges:?}");
}

/// A damaged record on object storage (its first byte flipped) is DATA_LOSS
/// naming the item; the other items are served; health's integrity status
/// reports the damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_record_is_data_loss() {
    use object_store::ObjectStoreExt;
    let Some((endpoint, bucket)) = s3_cluster() else {
        return;
    };
    let url = s3_test_url(&bucket, "damage");
    let server =
        ServerProcess::start_with(&["--store", url.as_str(), "--s3-endpoint", endpoint.as_str()])
            .await;
    let client = server.client().await;
    let ns = Namespace::new("damage").expect("ns");
    for key in ["damaged", "healthy"] {
        client
            .put_artifact(
                &ns,
                &name(key),
                PutOptions::default(),
                bytes_stream(vec![Bytes::from_static(b"a small value")]),
            )
            .await
            .expect("put");
    }
    // The same bucket and root, opened in the test, to damage one record.
    let engine = trove_server::engine::bucket::connect(
        &url,
        Some(&endpoint),
        trove_server::engine::bucket::BucketOptions {
            blob_cache: None,
            ..Default::default()
        },
    )
    .await
    .expect("open the bucket");
    let path = engine.path("n/damage/a/damaged!r");
    let mut record = engine
        .bucket()
        .get(&path)
        .await
        .expect("the record exists")
        .bytes()
        .await
        .expect("record bytes")
        .to_vec();
    record[0] ^= 0xFF;
    engine
        .bucket()
        .put(&path, record.into())
        .await
        .expect("write the damaged record");

    match read_artifact_in(&client, &ns, "damaged").await {
        Err(Error::DataLoss { message }) => {
            assert!(
                message.contains("artifact") && message.contains("damaged"),
                "{message}"
            )
        }
        other => panic!("a damaged record must be DATA_LOSS, got {other:?}"),
    }
    assert!(read_artifact_in(&client, &ns, "healthy").await.is_ok());
    let deadline = Instant::now() + Duration::from_secs(10);
    while trove_tests::harness::health_status(server.addr, "trove.integrity").await
        != Some(tonic_health::pb::health_check_response::ServingStatus::NotServing)
    {
        assert!(
            Instant::now() < deadline,
            "the integrity status never reported the damage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
