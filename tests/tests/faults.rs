//! Fault injection at the storage boundary: a failing blob write, a full disk
//! and a failing flush each give the caller a clear status, leave nothing
//! partial behind, and the store serves again as soon as the fault clears.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use trove_proto::artifacts::PutOptions;
use trove_proto::types::{Name, Namespace};
use trove_proto::{ArtifactStore, Error};
use trove_server::engine::sled::{Faults, SledStore, StoreOptions};
use trove_tests::target::{sled_target, Target};
use trove_tests::{bytes_stream, collect_bytes, generated_stream};

async fn faulty() -> (Target<SledStore>, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let target = sled_target(StoreOptions {
        faults: Some(Arc::clone(&faults)),
        ..Default::default()
    })
    .await;
    (target, faults)
}

fn key() -> Name {
    Name::new("key", "precious").expect("key")
}

async fn read(t: &Target<SledStore>) -> Vec<u8> {
    let (_, body) = t
        .store
        .get_artifact(&Namespace::default(), &key())
        .await
        .expect("get");
    collect_bytes(body).await.expect("read")
}

/// A failing blob write is UNAVAILABLE, keeps the old value, stages nothing, and clears.
#[tokio::test]
async fn failing_blob_write() {
    let (t, faults) = faulty().await;
    let ns = Namespace::default();
    t.store
        .put_artifact(
            &ns,
            &key(),
            PutOptions::default(),
            bytes_stream(vec![Bytes::from_static(b"v1")]),
        )
        .await
        .expect("put v1");
    faults.fail_blob_write.store(true, Ordering::SeqCst);
    let err = t
        .store
        .put_artifact(
            &ns,
            &key(),
            PutOptions::default(),
            generated_stream(1, 500_000, 65_536),
        )
        .await
        .expect_err("injected failure");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("stage upload"), "{err}");
    assert_eq!(read(&t).await, b"v1");
    t.assert_disk_settles(0).await;
    // Small values never touch blob files and keep working during the fault.
    t.store
        .put_artifact(
            &ns,
            &Name::new("key", "small").expect("key"),
            PutOptions::default(),
            bytes_stream(vec![Bytes::from_static(b"s")]),
        )
        .await
        .expect("inline put during the fault");
    faults.fail_blob_write.store(false, Ordering::SeqCst);
    t.store
        .put_artifact(
            &ns,
            &key(),
            PutOptions::default(),
            generated_stream(2, 500_000, 65_536),
        )
        .await
        .expect("serves again once the fault clears");
    assert_eq!(read(&t).await.len(), 500_000);
}

/// A full disk is RESOURCE_EXHAUSTED naming disk space, and nothing changes.
#[tokio::test]
async fn disk_full() {
    let (t, faults) = faulty().await;
    let ns = Namespace::default();
    faults.disk_full.store(true, Ordering::SeqCst);
    let err = t
        .store
        .put_artifact(
            &ns,
            &key(),
            PutOptions::default(),
            generated_stream(3, 300_000, 65_536),
        )
        .await
        .expect_err("disk full");
    match &err {
        Error::ResourceExhausted { limit, .. } => assert_eq!(limit, "disk space"),
        other => panic!("expected ResourceExhausted, got {other:?}"),
    }
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::ResourceExhausted
    );
    assert!(matches!(
        t.store.stat_artifact(&ns, &key()).await,
        Err(Error::NotFound { .. })
    ));
    t.assert_disk_settles(0).await;
    faults.disk_full.store(false, Ordering::SeqCst);
    t.store
        .put_artifact(
            &ns,
            &key(),
            PutOptions::default(),
            generated_stream(3, 300_000, 65_536),
        )
        .await
        .expect("serves again");
}

/// A failing fdatasync of the log is UNAVAILABLE: the write is undone (never
/// visible), writes are refused until the log is reopened on a fresh
/// segment, and they resume once the fault clears.
#[tokio::test]
async fn failing_flush() {
    let (t, faults) = faulty().await;
    let ns = Namespace::default();
    faults.fail_flush.store(true, Ordering::SeqCst);
    let err = t
        .store
        .put_artifact(
            &ns,
            &key(),
            PutOptions::default(),
            generated_stream(4, 200_000, 65_536),
        )
        .await
        .expect_err("flush fails");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("undone"), "{err}");
    let absent = t.store.get_artifact(&ns, &key()).await;
    assert!(
        matches!(absent, Err(Error::NotFound { .. })),
        "a write whose fdatasync failed must be undone: {:?}",
        absent.map(|(info, _)| info)
    );
    let refused = t
        .store
        .put_artifact(&ns, &key(), PutOptions::default(), bytes_stream(vec![]))
        .await
        .expect_err("refused while the log cannot be reopened");
    assert!(refused.to_string().contains("reopened"), "{refused}");
    faults.fail_flush.store(false, Ordering::SeqCst);
    // The log reopens in the background (a refused write asks it to try at
    // once); poll until it has.
    let mut attempts = 0;
    loop {
        let put = t
            .store
            .put_artifact(
                &ns,
                &key(),
                PutOptions::default(),
                bytes_stream(vec![Bytes::from_static(b"after")]),
            )
            .await;
        match put {
            Ok(_) => break,
            Err(Error::Unavailable { .. }) if attempts < 200 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            Err(other) => panic!("writes did not resume once the fault cleared: {other:?}"),
        }
    }
    assert_eq!(read(&t).await, b"after");
}
