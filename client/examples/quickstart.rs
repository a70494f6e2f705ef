//! A tour of the objects, streams and artifacts operations through the Rust
//! client. Start a server first (`cargo run --release -p trove-server`), then
//! `cargo run -p trove-client --example quickstart [ADDR]`.

use bytes::Bytes;
use futures::StreamExt;
use trove_client::TroveClient;
use trove_proto::artifacts::PutOptions;
use trove_proto::objects::StreamChunk;
use trove_proto::types::{ByteStream, ListPage, Name, Namespace};
use trove_proto::{ArtifactStore, ObjectStore};

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
    Ok(())
}
