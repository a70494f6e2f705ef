//! A tour of every operation group (objects, streams, artifacts, cassettes
//! and the test cache) through the Rust client. Start a server first (`cargo run --release -p trove-server`), then
//! `cargo run -p trove-client --example quickstart [ADDR]`.

use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use trove_client::TroveClient;

use trove_client::{CassetteWriter, WriterConfig};
use trove_proto::artifacts::PutOptions;
use trove_proto::cache::{CacheScope, PruneOptions, UploadOptions};
use trove_proto::entries::{NewEntry, ReadOptions};
use trove_proto::objects::StreamChunk;
use trove_proto::types::{ByteStream, ListPage, Name, Namespace};
use trove_proto::{ArtifactStore, CacheStore, EntryStore, ObjectStore};

fn body(data: &'static [u8]) -> ByteStream {
    futures::stream::iter([Ok(Bytes::from_static(data))]).boxed()
}

#[tokio::main]
async fn main() -> Result<(), trove_proto::Error> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".into());
    let trove = TroveClient::connect(&addr).await?;
    let ns = Namespace::new("quickstart")?;

    // Objects: content-addressed, verified against the SHA-256 in the hash.
    let hash = Name::new(
        "hash",
        "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9",
    )?;
    trove
        .put_object(&ns, &hash, None, body(b"hello world"))
        .await?;
    let (info, mut content) = trove.get_object(&ns, &hash).await?;
    while let Some(chunk) = content.next().await {
        println!("object chunk: {:?}", chunk?);
    }
    println!("verified: {}", info.verified);
    println!(
        "missing: {:?}",
        trove.find_missing(&ns, std::slice::from_ref(&hash)).await?
    );

    // Streams: timestamped chunk lists under a hash.
    let chunks = vec![StreamChunk {
        data: Bytes::from_static(b"data: 1\n\n"),
        timestamp: Some(17),
    }];
    let chunks = futures::stream::iter(chunks.into_iter().map(Ok)).boxed();
    trove.put_stream(&ns, &hash, chunks).await?;

    // Artifacts: mutable values under keys; list a prefix with values at boot.
    let key = Name::new("key", "variants/thumbnail")?;
    let options = PutOptions::new("application/json", None)?;
    trove
        .put_artifact(&ns, &key, options, body(br#"{"w":64}"#))
        .await?;
    let page = trove
        .list_artifacts(&ns, &ListPage::first("variants/"), true)
        .await?;
    for item in page.items {
        println!("{:?} = {:?}", item.info.map(|i| i.key), item.value);
    }
    trove.delete_artifact(&ns, &key).await?;

    // Cassettes: append out of order, read back in recorded order.
    let cassette = Name::new("cassette", "tests/login.json")?;
    let entry =
        |ts: i64| NewEntry::parse("entry", format!(r#"{{"recorded_at":{ts}}}"#).into(), None);
    trove
        .append_entries(
            &ns,
            &cassette,
            vec![entry(20)?, entry(10)?],
            Default::default(),
        )
        .await?;
    let mut entries = trove
        .read_entries(&ns, &cassette, ReadOptions::default())
        .await?;
    while let Some(stored) = entries.next().await {
        println!("entry at {}", stored?.recorded_at);
    }
    // Recorders write through a non-blocking, batching writer.
    let writer = CassetteWriter::new(
        Arc::new(trove.clone()),
        WriterConfig {
            namespace: ns.clone(),
            ..Default::default()
        },
    );
    writer.write(&cassette, entry(30)?)?;
    writer.shutdown().await?;

    // Test cache: a PR build reads its own tier, then main.
    let scope = |branch: &str| -> Result<CacheScope, trove_proto::Error> {
        Ok(CacheScope {
            namespace: ns.clone(),
            prefix: "ci".into(),
            branch: Name::new("branch", branch)?,
            default_branch: Name::new("default_branch", "main")?,
            test_suite_id: String::new(),
        })
    };
    let commit = Name::new("ref", "4f2a9c1")?;
    trove
        .upload(
            &scope("main")?,
            &commit,
            UploadOptions::default(),
            body(b"archive"),
        )
        .await?;
    if let Some((served, _archive)) = trove
        .download(&scope("feature/login")?, "4f2a9c1", None)
        .await?
    {
        println!("cache hit from tier {} ref {}", served.tier, served.r#ref);
    }
    let removed = trove
        .prune(
            &scope("main")?,
            PruneOptions {
                count: 100,
                ..Default::default()
            },
        )
        .await?;
    println!("pruned {removed} refs");
    Ok(())
}
