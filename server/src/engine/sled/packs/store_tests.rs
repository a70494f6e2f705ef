//! Packs through the store: which values go where, reads after a restart,
//! and compaction reclaiming the space of deleted and replaced values.

use bytes::Bytes;
use futures::StreamExt;
use trove_proto::artifacts::PutOptions;
use trove_proto::types::{ByteStream, Name, Namespace};
use trove_proto::{ArtifactStore, Error};

use crate::engine::record::{self, Body};
use crate::engine::sled::schema::artifact_key;
use crate::engine::sled::{SledStore, StoreOptions};

fn body(bytes: Vec<u8>) -> ByteStream {
    futures::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed()
}

/// A value no other value in a test equals.
fn value(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(131) ^ i.wrapping_mul(7)).to_le_bytes()[0])
        .collect()
}

fn key(i: usize) -> Name {
    Name::new("key", format!("k{i:04}")).expect("name")
}

/// Opens the store in `dir`. A store dropped just before may still be held
/// for a moment by sled's I/O threads: the open is tried again for a few
/// seconds.
pub(super) async fn open(dir: &std::path::Path, pack_bytes: u64) -> SledStore {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let options = StoreOptions {
                pack_bytes,
                ..StoreOptions::default()
            };
            match SledStore::open(&dir, options) {
                Err(Error::Unavailable { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other.expect("open"),
            }
        }
    })
    .await
    .expect("open task")
}

async fn put(store: &SledStore, ns: &Namespace, key: &Name, bytes: Vec<u8>) {
    store
        .put_artifact(ns, key, PutOptions::default(), body(bytes))
        .await
        .expect("put");
}

async fn get(store: &SledStore, ns: &Namespace, key: &Name) -> Result<Vec<u8>, Error> {
    let (_, mut stream) = store.get_artifact(ns, key).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

fn body_of(store: &SledStore, ns: &Namespace, key: &Name) -> Body {
    let bytes = store
        .inner
        .artifacts
        .get(artifact_key(ns, key))
        .expect("get")
        .expect("present");
    record::decode(&bytes).expect("decode").body
}

pub(super) fn pack_files(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir.join("packs"))
        .expect("packs folder")
        .map(|e| e.expect("entry"))
        .map(|e| {
            let len = e.metadata().expect("metadata").len();
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    files.sort();
    files
}

/// Overwrites bytes 100.. of the first pack with garbage.
pub(super) fn damage_first_pack(dir: &std::path::Path) {
    let (name, _) = pack_files(dir).remove(0);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("packs").join(name))
        .expect("open pack");
    std::os::unix::fs::FileExt::write_all_at(&file, b"garbage", 100).expect("damage");
}

/// Runs one compaction pass of `store`.
pub(super) async fn compact(store: &SledStore) -> super::CompactionPass {
    let compacting = store.clone();
    tokio::task::spawn_blocking(move || compacting.compact_packs())
        .await
        .expect("task")
        .expect("compaction pass")
}

#[tokio::test]
async fn values_go_inline_packed_or_to_blobs_by_size_and_read_back_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("ns").expect("namespace");
    let sizes = [10, 1024, 60_000, 100_000];
    {
        let store = open(dir.path(), super::PACK_BYTES).await;
        for (i, size) in sizes.iter().enumerate() {
            put(&store, &ns, &key(i), value(i, *size)).await;
        }
        assert!(matches!(body_of(&store, &ns, &key(0)), Body::Inline(_)));
        assert!(matches!(body_of(&store, &ns, &key(1)), Body::Packed { .. }));
        assert!(matches!(body_of(&store, &ns, &key(2)), Body::Packed { .. }));
        assert!(matches!(body_of(&store, &ns, &key(3)), Body::Blob(_)));
        for (i, size) in sizes.iter().enumerate() {
            assert_eq!(
                get(&store, &ns, &key(i)).await.expect("get"),
                value(i, *size)
            );
        }
    }
    let store = open(dir.path(), super::PACK_BYTES).await;
    for (i, size) in sizes.iter().enumerate() {
        assert_eq!(
            get(&store, &ns, &key(i)).await.expect("get after restart"),
            value(i, *size)
        );
    }
    let packed: u64 = pack_files(dir.path()).iter().map(|(_, len)| len).sum();
    assert_eq!(
        packed,
        1024 + 60_000,
        "the packs hold the two packed values once"
    );
}

#[tokio::test]
async fn a_packed_value_that_fails_its_checksum_is_data_loss() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("ns").expect("namespace");
    let store = open(dir.path(), super::PACK_BYTES).await;
    put(&store, &ns, &key(1), value(1, 2048)).await;
    damage_first_pack(dir.path());
    match get(&store, &ns, &key(1)).await {
        Err(Error::DataLoss { message }) => {
            assert!(message.contains("checksum"), "{message}");
            assert!(message.contains("k0001"), "{message}");
        }
        other => panic!("damage was not reported: {other:?}"),
    }
}

#[tokio::test]
async fn compaction_moves_live_values_and_deletes_mostly_dead_packs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("ns").expect("namespace");
    let pack_bytes = 16 * 1024;
    let store = open(dir.path(), pack_bytes).await;
    let count = 64;
    for i in 0..count {
        put(&store, &ns, &key(i), value(i, 1024)).await;
    }
    // Three of every four go; two of the kept ones are replaced.
    for i in (0..count).filter(|i| i % 4 != 0) {
        assert!(store.delete_artifact(&ns, &key(i)).await.expect("delete"));
    }
    put(&store, &ns, &key(0), value(1000, 1500)).await;
    put(&store, &ns, &key(4), value(1004, 700)).await;
    let expected = |i: usize| match i {
        0 => value(1000, 1500),
        4 => value(1004, 700),
        i => value(i, 1024),
    };
    let before = pack_files(dir.path());
    let pass = compact(&store).await;
    let after = pack_files(dir.path());
    assert!(pass.packs_removed >= 3, "{pass:?}: {before:?} -> {after:?}");
    assert!(pass.values_moved > 0 && pass.values_moved <= 16, "{pass:?}");
    let (bytes_before, bytes_after): (u64, u64) = (
        before.iter().map(|(_, len)| len).sum(),
        after.iter().map(|(_, len)| len).sum(),
    );
    assert!(
        bytes_after * 2 < bytes_before,
        "{bytes_before} -> {bytes_after} bytes"
    );
    for i in 0..count {
        let read = get(&store, &ns, &key(i)).await;
        if i % 4 == 0 {
            assert_eq!(read.expect("a kept value reads"), expected(i), "key {i}");
        } else {
            assert!(matches!(read, Err(Error::NotFound { .. })), "key {i}");
        }
    }
    // A second pass finds nothing more to do.
    let again = compact(&store).await;
    assert_eq!(again.packs_removed, 0, "{again:?}");
    drop(store);
    let store = open(dir.path(), pack_bytes).await;
    for i in (0..count).filter(|i| i % 4 == 0) {
        assert_eq!(
            get(&store, &ns, &key(i)).await.expect("read after restart"),
            expected(i)
        );
    }
}

#[tokio::test]
async fn a_value_replaced_while_compaction_reads_it_keeps_the_new_value() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("ns").expect("namespace");
    let store = open(dir.path(), super::PACK_BYTES).await;
    put(&store, &ns, &key(1), value(1, 1024)).await;
    let Body::Packed { pack, offset, crc } = body_of(&store, &ns, &key(1)) else {
        panic!("a 1 KiB value is packed");
    };
    let loc = super::PackLoc { pack, offset };
    let old = store
        .inner
        .packs
        .read(loc, 1024, crc)
        .expect("read")
        .expect("present");
    // What compaction read, then a replace before its write.
    let batch = vec![(sled::IVec::from(artifact_key(&ns, &key(1))), loc, old, crc)];
    put(&store, &ns, &key(1), value(2, 700)).await;
    let mover = store.clone();
    let artifacts = store.inner.artifacts.clone();
    let (moved, _) = tokio::task::spawn_blocking(move || mover.move_batch(&artifacts, &batch))
        .await
        .expect("task")
        .expect("move");
    assert_eq!(moved, 0, "a replaced value was moved");
    assert_eq!(get(&store, &ns, &key(1)).await.expect("get"), value(2, 700));
}

#[tokio::test]
async fn a_value_whose_pack_is_missing_is_data_loss_not_a_retry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("ns").expect("namespace");
    {
        let store = open(dir.path(), super::PACK_BYTES).await;
        put(&store, &ns, &key(1), value(1, 2048)).await;
        // Checkpointed, so that no replay writes the value back.
        store.flush().await.expect("flush");
    }
    let (name, _) = pack_files(dir.path()).remove(0);
    std::fs::remove_file(dir.path().join("packs").join(name)).expect("remove the pack");
    let store = open(dir.path(), super::PACK_BYTES).await;
    match get(&store, &ns, &key(1)).await {
        Err(Error::DataLoss { message }) => {
            assert!(message.contains("missing"), "{message}");
            assert!(message.contains("backup"), "{message}");
        }
        other => panic!("a missing pack was not reported: {other:?}"),
    }
    let listed = store
        .list_artifacts(
            &ns,
            &trove_proto::types::ListPage::new("", 100, "").expect("page"),
            true,
        )
        .await;
    assert!(
        matches!(listed, Err(Error::DataLoss { .. })),
        "a listing with values hid the loss: {listed:?}"
    );
}
