//! Damage on disk, end to end against the real binary: a truncated blob, a
//! flipped byte in an object's blob and in a stream's stored body. Each damaged
//! item answers DATA_LOSS naming it; everything else keeps being served; the
//! health check's integrity status and the metrics say that damage was found.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tonic_health::pb::health_check_response::ServingStatus;
use trove_proto::artifacts::PutOptions;
use trove_proto::objects::StreamChunk;
use trove_proto::types::{Name, Namespace};
use trove_proto::{ArtifactStore, Error, ObjectStore};
use trove_tests::harness::{health_status, scrape, ServerProcess};
use trove_tests::{bytes_stream, collect_bytes, sha256_hex};

fn blob_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(blob_files(&path));
        } else {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// The blob file a write added under `blobs`.
async fn new_blob<F: std::future::Future<Output = ()>>(blobs: &Path, write: F) -> PathBuf {
    let before = blob_files(blobs);
    write.await;
    let added: Vec<PathBuf> = blob_files(blobs)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(added.len(), 1, "one blob per write: {added:?}");
    added[0].clone()
}

/// 200,000 bytes, different for each seed: larger than the inline limit.
fn big(seed: u8) -> Bytes {
    Bytes::from(
        (0..200_000u32)
            .map(|i| i.to_le_bytes()[0] ^ seed)
            .collect::<Vec<_>>(),
    )
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("read blob");
    bytes[at] ^= 0x5A;
    std::fs::write(path, bytes).expect("write blob");
}

#[track_caller]
fn assert_data_loss<T: std::fmt::Debug>(result: Result<T, Error>, names: &[&str]) {
    match result {
        Err(Error::DataLoss { message }) => {
            for name in names {
                assert!(message.contains(name), "{message:?} should name {name:?}");
            }
        }
        other => panic!("expected DATA_LOSS naming {names:?}, got {other:?}"),
    }
}

/// Truncated and bit-flipped bodies are DATA_LOSS naming the item; the rest
/// is served; health and metrics report the damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_bodies_are_data_loss() {
    let server = ServerProcess::start().await;
    let client = server.client().await;
    let ns = Namespace::new("damage").expect("ns");
    let blobs = server.data_dir.join("blobs");

    let truncated = new_blob(&blobs, async {
        client
            .put_artifact(
                &ns,
                &Name::new("key", "truncated").expect("name"),
                PutOptions::default(),
                bytes_stream(vec![big(1)]),
            )
            .await
            .expect("put");
    })
    .await;
    let object = big(2);
    let hash = Name::new("hash", sha256_hex(&object)).expect("hash");
    let flipped_object = new_blob(&blobs, async {
        client
            .put_object(&ns, &hash, None, bytes_stream(vec![object.clone()]))
            .await
            .expect("put object");
    })
    .await;
    let stream_hash = Name::new("hash", "recorded-stream").expect("name");
    let flipped_stream = new_blob(&blobs, async {
        let chunks: Vec<Result<StreamChunk, Error>> = (0..4u8)
            .map(|i| {
                Ok(StreamChunk {
                    data: big(10 + i),
                    timestamp: Some(i64::from(i)),
                })
            })
            .collect();
        client
            .put_stream(&ns, &stream_hash, futures::stream::iter(chunks).boxed())
            .await
            .expect("put stream");
    })
    .await;
    let healthy = Name::new("key", "healthy").expect("name");
    client
        .put_artifact(
            &ns,
            &healthy,
            PutOptions::default(),
            bytes_stream(vec![big(3)]),
        )
        .await
        .expect("put healthy");

    // The damage: a cut-short file, and one flipped byte deep inside data.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .expect("open");
    file.set_len(150_000).expect("truncate");
    flip_byte(&flipped_object, 123_456);
    flip_byte(&flipped_stream, 300_000);

    let read_artifact = |key: &'static str| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let (_, body) = client
                .get_artifact(&ns, &Name::new("key", key).expect("name"))
                .await?;
            collect_bytes(body).await
        }
    };
    assert_data_loss(read_artifact("truncated").await, &["artifact", "truncated"]);
    let object_read = async {
        let (_, body) = client.get_object(&ns, &hash).await?;
        collect_bytes(body).await
    }
    .await;
    assert_data_loss(object_read, &["object", &hash.as_str()[..16]]);
    let stream_read: Result<Vec<StreamChunk>, Error> = async {
        let (_, chunks) = client.get_stream(&ns, &stream_hash).await?;
        chunks.try_collect().await
    }
    .await;
    assert_data_loss(stream_read, &["stream", "recorded-stream"]);

    // Everything else is served, and the server says what it found.
    assert_eq!(
        read_artifact("healthy").await.expect("healthy"),
        big(3).to_vec()
    );
    assert_eq!(
        health_status(server.addr, "").await,
        Some(ServingStatus::Serving)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while health_status(server.addr, "trove.integrity").await != Some(ServingStatus::NotServing) {
        assert!(
            Instant::now() < deadline,
            "the integrity status never reported the damage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = scrape(server.metrics_addr.expect("metrics")).await;
    let damage: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("trove_data_loss_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        damage >= 3.0,
        "trove_data_loss_total counts the damaged reads:\n{metrics}"
    );
    assert!(!server.log().contains("panicked"));
}

/// A server that found no damage reports its integrity as SERVING.
#[tokio::test]
async fn integrity_is_serving_without_damage() {
    let server = ServerProcess::start().await;
    assert_eq!(
        health_status(server.addr, "trove.integrity").await,
        Some(ServingStatus::Serving)
    );
}
