//! Long cassette entries and branch maps through the store: where they
//! go, reads after a restart, usage, and compaction moving them.

use std::collections::BTreeMap;

use futures::StreamExt;
use trove_proto::cache::{BranchRefsKey, BranchRefsWrite};
use trove_proto::entries::{AppendOptions, NewEntry, ReadOptions};
use trove_proto::types::{Name, Namespace};
use trove_proto::{CacheStore, EntryStore};

use super::spill::{Spilled, SPILL_MIN_BYTES};
use super::store_tests::{compact, damage_first_pack, open, pack_files};
use crate::engine::sled::SledStore;

/// A JSON object of about `len` bytes, different for each `seed`.
fn json(seed: usize, len: usize) -> Vec<u8> {
    let filler: String = (0..len.saturating_sub(40))
        .map(|i| char::from(b"abcdefghijklmnopqrstuvwxyz"[(seed * 7 + i) % 26]))
        .collect();
    format!(r#"{{"seed":{seed},"recorded_at":{seed},"body":"{filler}"}}"#).into_bytes()
}

fn cassette(name: &str) -> Name {
    Name::new("cassette", name).expect("name")
}

async fn append(store: &SledStore, ns: &Namespace, name: &str, entries: &[Vec<u8>]) {
    let entries = entries
        .iter()
        .map(|j| NewEntry::parse("entry", bytes::Bytes::from(j.clone()), None).expect("entry"))
        .collect();
    store
        .append_entries(ns, &cassette(name), entries, AppendOptions::default())
        .await
        .expect("append");
}

async fn read(store: &SledStore, ns: &Namespace, name: &str) -> Vec<Vec<u8>> {
    let mut stream = store
        .read_entries(ns, &cassette(name), ReadOptions::default())
        .await
        .expect("read");
    let mut out = Vec::new();
    while let Some(entry) = stream.next().await {
        out.push(entry.expect("entry").json.to_vec());
    }
    out
}

/// The stored values of the entries tree, in key order.
fn stored_entries(store: &SledStore) -> Vec<sled::IVec> {
    store
        .inner
        .entry_trees
        .entries
        .iter()
        .values()
        .map(|v| v.expect("value"))
        .collect()
}

fn big_map() -> BTreeMap<String, i64> {
    (0..400).map(|i| (format!("{i:040x}"), i)).collect()
}

#[tokio::test]
async fn long_entries_and_branch_maps_spill_and_read_back_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("ns").expect("namespace");
    let entries = vec![
        json(1, 100),
        json(2, 20_000),
        json(3, SPILL_MIN_BYTES + 100),
        json(4, 3000),
    ];
    let key = BranchRefsKey::new(ns.clone(), "app", "feature").expect("key");
    let write = BranchRefsWrite {
        namespace: ns.clone(),
        prefix: "app".to_owned(),
        target: Some(("feature".to_owned(), big_map())),
    };
    {
        let store = open(dir.path(), super::PACK_BYTES).await;
        append(&store, &ns, "c", &entries).await;
        assert!(store.write_branch_refs(&write).await.expect("map"));
        let stored = stored_entries(&store);
        let spilled: Vec<bool> = stored
            .iter()
            .map(|v| Spilled::decode(v).is_some())
            .collect();
        // Read order is recorded_at: the seeds.
        assert_eq!(spilled, [false, true, true, false]);
        let map = store
            .inner
            .cache
            .branch_refs
            .iter()
            .values()
            .next()
            .expect("a map")
            .expect("value");
        assert!(Spilled::decode(&map).is_some(), "a map of 400 refs spills");
        assert_eq!(read(&store, &ns, "c").await, entries);
        assert_eq!(store.branch_refs(&key).await.expect("map"), big_map());
        let (_, count, bytes) = store.inner.entry_trees.usage().expect("usage");
        assert_eq!(count, 4);
        assert_eq!(bytes, entries.iter().map(|e| e.len() as u64).sum::<u64>());
    }
    let store = open(dir.path(), super::PACK_BYTES).await;
    assert_eq!(read(&store, &ns, "c").await, entries);
    assert_eq!(store.branch_refs(&key).await.expect("map"), big_map());
    let packed: u64 = pack_files(dir.path()).iter().map(|(_, len)| len).sum();
    let map_len = crate::engine::values::branch_refs_to_json(&big_map())
        .expect("json")
        .len() as u64;
    assert_eq!(
        packed,
        (entries[1].len() + entries[2].len()) as u64 + map_len,
        "the packs hold the two long entries and the map once"
    );
}

/// Waits until no generation awaits collection (a deleted cassette's
/// entries go in the background once the delete is durable).
async fn collected(store: &SledStore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !store.inner.entry_trees.gc.is_empty() {
        assert!(std::time::Instant::now() < deadline, "collection never ran");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn compaction_moves_spilled_entries_and_reclaims_a_deleted_cassettes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("ns").expect("namespace");
    // Packs of three entries each: one kept, two to be deleted.
    let pack_bytes = 30 * 1024;
    let store = open(dir.path(), pack_bytes).await;
    let (mut kept, mut gone) = (Vec::new(), Vec::new());
    for i in 0..12 {
        kept.push(json(i, 10_000));
        gone.push(json(100 + i, 10_000));
        gone.push(json(200 + i, 10_000));
        append(&store, &ns, "kept", &kept[i..]).await;
        append(&store, &ns, "gone", &gone[2 * i..]).await;
    }
    assert!(store
        .delete_cassette(&ns, &cassette("gone"))
        .await
        .expect("delete"));
    collected(&store).await;
    let before = pack_files(dir.path());
    let pass = compact(&store).await;
    let after = pack_files(dir.path());
    assert!(
        pass.packs_removed >= 10,
        "{pass:?}: {before:?} -> {after:?}"
    );
    assert!(pass.values_moved > 0, "{pass:?}");
    let (bytes_before, bytes_after): (u64, u64) = (
        before.iter().map(|(_, len)| len).sum(),
        after.iter().map(|(_, len)| len).sum(),
    );
    assert!(
        bytes_after * 2 < bytes_before,
        "{bytes_before} -> {bytes_after} bytes"
    );
    assert_eq!(read(&store, &ns, "kept").await, kept);
    assert!(read(&store, &ns, "gone").await.is_empty());
    drop(store);
    let store = open(dir.path(), pack_bytes).await;
    assert_eq!(read(&store, &ns, "kept").await, kept);
}

#[tokio::test]
async fn a_damaged_spilled_entry_is_data_loss_naming_the_cassette() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("ns").expect("namespace");
    let store = open(dir.path(), super::PACK_BYTES).await;
    append(&store, &ns, "c", &[json(1, 20_000)]).await;
    damage_first_pack(dir.path());
    let mut stream = store
        .read_entries(&ns, &cassette("c"), ReadOptions::default())
        .await
        .expect("read");
    match stream.next().await {
        Some(Err(trove_proto::Error::DataLoss { message })) => {
            assert!(message.contains("ns/c"), "{message}");
            assert!(message.contains("checksum"), "{message}");
        }
        other => panic!("expected DATA_LOSS, got {other:?}"),
    }
}

#[tokio::test]
async fn compaction_moves_a_branch_map_and_a_prune_that_read_it_before_still_removes_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("ns").expect("namespace");
    // Two maps per pack: the first pack holds `feature` and the first
    // `other`, which three rewrites leave dead.
    let store = open(dir.path(), 48 * 1024).await;
    for branch in ["feature", "other", "other", "other", "other"] {
        let write = BranchRefsWrite {
            namespace: ns.clone(),
            prefix: "app".to_owned(),
            target: Some((branch.to_owned(), big_map())),
        };
        assert!(store.write_branch_refs(&write).await.expect("map"));
    }
    let maps = &store.inner.cache.branch_refs;
    let seen: Vec<(sled::IVec, sled::IVec)> = maps.iter().map(|m| m.expect("map")).collect();
    let pass = compact(&store).await;
    assert!(pass.packs_removed >= 2, "{pass:?}");
    assert_eq!(pass.values_moved, 1, "{pass:?}");
    let key = BranchRefsKey::new(ns.clone(), "app", "feature").expect("key");
    assert_eq!(store.branch_refs(&key).await.expect("map"), big_map());
    // A prune read both maps before the move: both still go.
    for (map_key, value) in seen {
        store
            .remove_map_if_unchanged(&map_key, Some(value))
            .expect("remove");
    }
    assert!(
        maps.is_empty(),
        "a moved map is still the one the prune read"
    );
}
