//! Eviction: order with uses, tiers, records, the ceiling, older stores
//! and reads racing eviction.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use sha2::Digest;
use trove_proto::artifacts::PutOptions;
use trove_proto::cache::{BranchRefsKey, BranchRefsWrite, CacheScope, UploadOptions};
use trove_proto::types::{ByteStream, Name, Namespace};
use trove_proto::{ArtifactStore, CacheStore, Error, ObjectStore};

use super::super::{SledStore, StoreOptions};
use crate::engine::quota::{NamespaceQuota, OnFull, Quotas};

fn evicting(ns: &str, max_bytes: u64) -> Arc<Quotas> {
    Arc::new(Quotas {
        max_disk_bytes: None,
        namespaces: [(
            ns.to_owned(),
            NamespaceQuota {
                max_bytes,
                on_full: OnFull::Evict,
            },
        )]
        .into(),
        min_free_disk_bytes: 0,
        every_namespace: None,
    })
}

fn options(quotas: Arc<Quotas>) -> StoreOptions {
    StoreOptions {
        quotas,
        ..StoreOptions::default()
    }
}

fn open(dir: &std::path::Path, quotas: Arc<Quotas>) -> SledStore {
    SledStore::open(dir, options(quotas)).expect("open")
}

/// Opens on a thread of its own, outside the runtime: no maintenance task
/// runs, so passes happen exactly where a test calls `run_eviction`.
fn open_without_task(dir: &std::path::Path, options: StoreOptions) -> SledStore {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || SledStore::open(&dir, options))
        .join()
        .expect("open thread")
        .expect("open")
}

/// Opens on the runtime's blocking pool: the eviction thread starts.
async fn open_with_task(dir: &std::path::Path, quotas: Arc<Quotas>) -> SledStore {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || open(&dir, quotas))
        .await
        .expect("open task")
}

/// The eviction index holds exactly one entry per evictable value (every
/// object and every cached ref), and its two trees agree; the usage
/// counters agree with a recount.
async fn assert_consistent(store: &SledStore) {
    let eviction = &store.inner.eviction;
    let mut expected: Vec<Vec<u8>> = Vec::new();
    for key in store.inner.objects.iter().keys() {
        let key = key.expect("key");
        if key.last() == Some(&super::schema::KIND_OBJECT) {
            expected.push([&[super::SOURCE_OBJECT][..], &key].concat());
        }
    }
    for key in store.inner.cache.ref_time.iter().keys() {
        expected.push([&[super::SOURCE_CACHE][..], &key.expect("key")].concat());
    }
    expected.sort();
    let mut indexed: Vec<Vec<u8>> = Vec::new();
    for item in eviction.lru_at.iter() {
        let (key, value) = item.expect("entry");
        if key.is_empty() {
            continue;
        }
        let (class, stamp) = super::index::parse_at(&value).expect("entry value");
        let (_, ns_key) = super::classify(key[0], &key[1..]).expect("evictable key");
        let index_key = super::index::index_key(&ns_key, class, stamp, &key);
        assert!(
            eviction.lru.contains_key(index_key).expect("lookup"),
            "lru_at entry without its lru entry"
        );
        indexed.push(key.to_vec());
    }
    assert_eq!(indexed, expected, "the index and the data differ");
    assert_eq!(eviction.lru.len(), indexed.len(), "stray lru entries");
    super::super::accounting::tests::recount(store).await;
}

fn ns(name: &str) -> Namespace {
    Namespace::new(name).expect("namespace")
}

/// A body of `len` bytes that differs for every `seed`, and its hash name.
fn content(seed: usize, len: usize) -> (Name, Bytes) {
    let mut data = format!("value {seed} ").into_bytes();
    data.resize(len, b'.');
    let hash = hex::encode(sha2::Sha256::digest(&data));
    (Name::new("hash", &hash).expect("hash"), Bytes::from(data))
}

fn stream(data: Bytes) -> ByteStream {
    futures::stream::iter([Ok(data)]).boxed()
}

async fn put(store: &SledStore, namespace: &Namespace, seed: usize, len: usize) -> Name {
    let (hash, data) = content(seed, len);
    store
        .put_object(namespace, &hash, Some(len as u64), stream(data))
        .await
        .expect("put object");
    hash
}

/// Puts one value of `len` bytes per seed; returns their hashes in order.
async fn put_many(
    store: &SledStore,
    namespace: &Namespace,
    seeds: std::ops::Range<usize>,
    len: usize,
) -> Vec<Name> {
    let mut hashes = Vec::new();
    for seed in seeds {
        hashes.push(put(store, namespace, seed, len).await);
    }
    hashes
}

/// Reads an object once: a use that eviction counts.
async fn use_object(store: &SledStore, namespace: &Namespace, hash: &Name) {
    let (_, body) = store.get_object(namespace, hash).await.expect("get");
    drop(body);
}

async fn present(store: &SledStore, namespace: &Namespace, hash: &Name) -> bool {
    match store.stat_object(namespace, hash).await {
        Ok(_) => true,
        Err(Error::NotFound { .. }) => false,
        Err(other) => panic!("stat: {other:?}"),
    }
}

async fn held(store: &SledStore, namespace: &str) -> u64 {
    let key = super::keys::key(&[namespace.as_bytes()]);
    super::super::accounting::namespace_logical(&store.inner.usage.usage, &key).expect("usage")
}

/// The least recently used objects go first; a Get and a FindMissing that
/// finds an object both count as uses; eviction stops at the low watermark.
#[tokio::test]
async fn least_recently_used_objects_go_first_and_uses_count() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open_without_task(dir.path(), options(evicting("c", 10_000)));
    let c = ns("c");
    let mut hashes = put_many(&store, &c, 0..10, 1000).await;
    use_object(&store, &c, &hashes[0]).await;
    let missing = store
        .find_missing(&c, &[hashes[1].clone()])
        .await
        .expect("find missing");
    assert!(missing.is_empty());
    hashes.push(put(&store, &c, 10, 1000).await);
    store.run_eviction().expect("evict");
    let mut gone = Vec::new();
    for (seed, hash) in hashes.iter().enumerate() {
        if !present(&store, &c, hash).await {
            gone.push(seed);
        }
    }
    assert_eq!(gone, vec![2, 3], "evicted: {gone:?}");
    assert_eq!(held(&store, "c").await, 9000, "stops at the low watermark");
    assert_eq!(store.evicted_total(), 2);
    assert_consistent(&store).await;
}

/// Values used since the last flush of uses are not candidates (a pass
/// running meanwhile must keep them), and do not take a batch's places;
/// when only such values are left, the caller learns it.
#[tokio::test]
async fn values_used_during_a_pass_are_skipped_not_counted() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open_without_task(dir.path(), options(evicting("c", 10_000)));
    let c = ns("c");
    let hashes = put_many(&store, &c, 0..4, 1000).await;
    let ns_key = super::keys::key(&[b"c"]);
    let (first, skipped) = store.candidates(&ns_key, u64::MAX, 1).expect("scan");
    assert!(!skipped);
    assert_eq!(first.len(), 1);
    // Using the oldest value (not yet flushed) moves the batch of one on.
    use_object(&store, &c, &hashes[0]).await;
    let (next, skipped) = store.candidates(&ns_key, u64::MAX, 1).expect("scan");
    assert!(skipped);
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].source_key, first[0].source_key);
    // With every value used, nothing is a candidate, and the caller knows why.
    for hash in &hashes[1..] {
        use_object(&store, &c, hash).await;
    }
    let (none, skipped) = store.candidates(&ns_key, u64::MAX, 8).expect("scan");
    assert!(none.is_empty() && skipped);
}

/// A quota for every namespace (`[namespaces."*"]`) holds each namespace
/// to it on its own, and evicts in every namespace over it; a namespace
/// with a quota of its own keeps that one.
#[tokio::test]
async fn a_quota_for_every_namespace_evicts_each_namespace_on_its_own() {
    let dir = tempfile::tempdir().expect("dir");
    let mut quotas = (*evicting("own", 20_000)).clone();
    quotas.every_namespace = Some(NamespaceQuota {
        max_bytes: 5_000,
        on_full: OnFull::Evict,
    });
    let store = open_without_task(dir.path(), options(Arc::new(quotas)));
    let mut seed = 0;
    // Six values each: the sixth starts at the quota, so it is accepted
    // (see `NamespaceQuota::ceiling`).
    for name in ["a", "b", "own"] {
        for _ in 0..6 {
            put(&store, &ns(name), seed, 1000).await;
            seed += 1;
        }
    }
    store.run_eviction().expect("evict");
    assert_eq!(held(&store, "a").await, 4000, "a down to its low watermark");
    assert_eq!(held(&store, "b").await, 4000, "b down to its low watermark");
    assert_eq!(held(&store, "own").await, 6000, "under its own quota");
    assert_consistent(&store).await;
}

fn scope(branch: &str) -> CacheScope {
    CacheScope {
        namespace: ns("ci"),
        prefix: "app".to_owned(),
        branch: Name::new("branch", branch).expect("branch"),
        default_branch: Name::new("branch", "main").expect("branch"),
        test_suite_id: String::new(),
    }
}

async fn upload(store: &SledStore, branch: &str, reference: &str, len: usize) {
    let (_, data) = content(reference.len() * 7919 + len, len);
    let options = UploadOptions {
        tree_sha: Some(Name::new("tree_sha", format!("tree-{reference}")).expect("tree")),
        ..UploadOptions::default()
    };
    store
        .upload(
            &scope(branch),
            &Name::new("reference", reference).expect("ref"),
            options,
            stream(data),
        )
        .await
        .expect("upload");
}

async fn downloadable(store: &SledStore, branch: &str, reference: &str) -> bool {
    store
        .download(&scope(branch), reference, None)
        .await
        .expect("download")
        .is_some()
}

async fn by_tree(store: &SledStore, branch: &str, reference: &str) -> bool {
    let tree = Name::new("tree_sha", format!("tree-{reference}")).expect("tree");
    store
        .download(&scope(branch), "", Some(&tree))
        .await
        .expect("download")
        .is_some()
}

async fn write_map(store: &SledStore, branch: &str) {
    let write = BranchRefsWrite {
        namespace: ns("ci"),
        prefix: "app".to_owned(),
        target: Some((branch.to_owned(), [("abc".to_owned(), 1)].into())),
    };
    assert!(store.write_branch_refs(&write).await.expect("map"));
}

async fn has_map(store: &SledStore, branch: &str) -> bool {
    let key = BranchRefsKey::new(ns("ci"), "app", branch).expect("key");
    !store.branch_refs(&key).await.expect("map").is_empty()
}

/// A storm of pull-request uploads is evicted before the default branch's
/// archives, however old those are; a branch whose refs all went loses its
/// tree pointers and its branch map, a branch that keeps some keeps both.
#[tokio::test]
async fn the_main_tier_survives_a_storm_of_branch_uploads() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open_without_task(dir.path(), options(evicting("ci", 10_000)));
    for n in 0..4 {
        upload(&store, "main", &format!("main-{n}"), 1000).await;
    }
    write_map(&store, "pr-0").await;
    for n in 0..40 {
        upload(
            &store,
            &format!("pr-{}", n % 8),
            &format!("pr-ref-{n}"),
            1000,
        )
        .await;
        if n == 39 {
            // Its earlier refs are gone by now: the map of a branch that
            // still has a ref after this pass must stay.
            write_map(&store, "pr-7").await;
        }
        store.run_eviction().expect("evict");
        assert!(held(&store, "ci").await <= 10_000, "eviction left it over");
    }
    for n in 0..4 {
        assert!(
            downloadable(&store, "main", &format!("main-{n}")).await,
            "main-{n} was evicted"
        );
    }
    // Branch pr-0 (refs 0, 8, .., 32) is all gone; pr-7 keeps ref 39.
    assert!(!downloadable(&store, "pr-0", "pr-ref-32").await);
    assert!(
        !by_tree(&store, "pr-0", "pr-ref-32").await,
        "dangling pointer"
    );
    assert!(
        !has_map(&store, "pr-0").await,
        "the empty branch kept its map"
    );
    assert!(downloadable(&store, "pr-7", "pr-ref-39").await);
    assert!(by_tree(&store, "pr-7", "pr-ref-39").await);
    assert!(has_map(&store, "pr-7").await);
    assert_consistent(&store).await;
}

/// Records are never evicted: when they fill the quota, writes are refused
/// with a message that says so, and nothing is stored.
#[tokio::test]
async fn records_that_fill_the_quota_refuse_writes() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open_without_task(dir.path(), options(evicting("c", 5000)));
    let c = ns("c");
    let key = Name::new("key", "report").expect("key");
    let options = PutOptions {
        expected_size: Some(4500),
        ..PutOptions::default()
    };
    store
        .put_artifact(&c, &key, options, stream(Bytes::from(vec![b'r'; 4500])))
        .await
        .expect("artifact");
    let (hash, data) = content(1, 1000);
    let err = store
        .put_object(&c, &hash, None, stream(data))
        .await
        .expect_err("records leave no room");
    let Error::ResourceExhausted { message, .. } = &err else {
        panic!("expected RESOURCE_EXHAUSTED, got {err:?}");
    };
    assert!(message.contains("never evicted"), "{message}");
    assert!(!present(&store, &c, &hash).await);
    assert_eq!(held(&store, "c").await, 4500);
    // Room for a value that fits beside the records.
    put(&store, &c, 2, 400).await;
}

/// With the eviction thread running, a write that would pass the ceiling
/// waits for eviction to make room instead of being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The pass lock is held across awaits on purpose: it keeps eviction behind
// while the write arrives.
#[allow(clippy::await_holding_lock)]
async fn a_write_past_the_ceiling_waits_for_running_eviction() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open_with_task(dir.path(), evicting("c", 10_000)).await;
    assert!(store
        .inner
        .eviction
        .running
        .load(std::sync::atomic::Ordering::Acquire));
    let c = ns("c");
    let held_back = store.inner.eviction.pass.lock().expect("pass lock");
    for seed in 0..11 {
        put(&store, &c, seed, 1000).await;
    }
    let (hash, data) = content(11, 1000);
    let write = {
        let (store, c, hash) = (store.clone(), c.clone(), hash.clone());
        tokio::spawn(async move { store.put_object(&c, &hash, Some(1000), stream(data)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!write.is_finished(), "the write did not wait for eviction");
    let waiting = || {
        store
            .inner
            .eviction
            .waiting_writes
            .load(std::sync::atomic::Ordering::Acquire)
    };
    assert_eq!(waiting(), 1, "the pass must know a write waits (no rests)");
    drop(held_back);
    write
        .await
        .expect("write task")
        .expect("room made by eviction");
    assert!(present(&store, &c, &hash).await);
    assert!(held(&store, "c").await <= 11_000);
    assert_eq!(waiting(), 0);
}

/// A pass rests between batches only while callers are being served and
/// no write waits for the room it makes; an idle store is evicted at full
/// speed, and no rest is longer than the cap.
#[tokio::test]
async fn a_pass_rests_only_while_calls_are_served_and_no_write_waits() {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("dir");
    let store = open_without_task(dir.path(), options(evicting("c", 10_000)));
    let eviction = &store.inner.eviction;
    let took = Duration::from_millis(4);
    let before = eviction.calls.load(Relaxed);
    assert_eq!(eviction.rest_after(before, took), Duration::ZERO, "idle");
    // A caller's read is what makes the store busy.
    let (hash, _) = content(1, 10);
    assert!(!present(&store, &ns("c"), &hash).await);
    assert!(eviction.calls.load(Relaxed) > before);
    assert_eq!(
        eviction.rest_after(before, took),
        took * super::BUSY_REST_FACTOR
    );
    assert_eq!(
        eviction.rest_after(before, Duration::from_secs(5)),
        super::MAX_REST
    );
    {
        let _waiting = eviction.waiting_write();
        assert_eq!(
            eviction.rest_after(before, took),
            Duration::ZERO,
            "a write waits"
        );
    }
    assert_eq!(
        eviction.rest_after(before, took),
        took * super::BUSY_REST_FACTOR
    );
    // A write that starts waiting ends a rest early.
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        let resting = scope.spawn(|| eviction.rest(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        let _waiting = eviction.waiting_write();
        resting.join().expect("rest thread");
    });
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a waiting write did not end the rest"
    );
    // The pass's own writes are not calls: a pass alone never rests.
    for seed in 0..11 {
        put(&store, &ns("c"), seed, 1000).await;
    }
    let before = eviction.calls.load(Relaxed);
    let store_for_pass = store.clone();
    let pass = tokio::task::spawn_blocking(move || store_for_pass.run_eviction())
        .await
        .expect("pass task")
        .expect("pass");
    assert!(pass.evicted > 0);
    assert_eq!(
        eviction.calls.load(Relaxed),
        before,
        "eviction counted as a call"
    );
}

/// Once the eviction thread ends (here: its store is gone), the flag that
/// makes writes wait for it is cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_flag_ends_with_the_eviction_thread() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open_with_task(dir.path(), evicting("c", 10_000)).await;
    let running = Arc::clone(&store.inner.eviction.running);
    assert!(running.load(std::sync::atomic::Ordering::Acquire));
    drop(store);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while running.load(std::sync::atomic::Ordering::Acquire) {
        assert!(
            std::time::Instant::now() < deadline,
            "the flag outlived the thread"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Without eviction running, writes pass the quota up to the bounded
/// overshoot (10%) and no further; once eviction ran they are accepted
/// again.
#[test]
fn writes_stop_at_the_ceiling_until_eviction_catches_up() {
    let dir = tempfile::tempdir().expect("dir");
    // Opened outside a runtime: no maintenance task, eviction runs only
    // when asked.
    let store = open(dir.path(), evicting("c", 10_000));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let c = ns("c");
    runtime.block_on(async {
        for seed in 0..11 {
            put(&store, &c, seed, 1000).await;
        }
        assert_eq!(held(&store, "c").await, 11_000);
        let (hash, data) = content(11, 1000);
        let err = store
            .put_object(&c, &hash, Some(1000), stream(data.clone()))
            .await
            .expect_err("past the ceiling");
        let Error::ResourceExhausted { message, .. } = &err else {
            panic!("expected RESOURCE_EXHAUSTED, got {err:?}");
        };
        assert!(message.contains("retry shortly"), "{message}");
        assert_eq!(held(&store, "c").await, 11_000, "nothing stored");
        let pass = store.run_eviction().expect("evict");
        assert_eq!(pass.evicted, 2);
        store
            .put_object(&c, &hash, Some(1000), stream(data))
            .await
            .expect("room again");
    });
}

/// A value larger than the overshoot is accepted while the namespace is
/// at or under its quota, and eviction then makes room by removing older
/// values, not the new one.
#[tokio::test]
async fn a_value_larger_than_the_overshoot_is_accepted_under_the_quota() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open_without_task(dir.path(), options(evicting("c", 10_000)));
    let c = ns("c");
    let hashes = put_many(&store, &c, 0..9, 1000).await;
    let big = put(&store, &c, 100, 3000).await;
    assert_eq!(held(&store, "c").await, 12_000);
    store.run_eviction().expect("evict");
    assert!(present(&store, &c, &big).await, "the new value was evicted");
    for (seed, hash) in hashes.iter().enumerate() {
        assert_eq!(present(&store, &c, hash).await, seed >= 3, "value {seed}");
    }
    assert_eq!(held(&store, "c").await, 9000);
    assert_consistent(&store).await;
}

/// A store written before the index existed (or without an evicting
/// quota) is indexed by the first pass, and then evicted in write order.
#[tokio::test]
async fn an_older_store_is_indexed_then_evicted() {
    let dir = tempfile::tempdir().expect("dir");
    let c = ns("c");
    let mut hashes = Vec::new();
    {
        let store = open(dir.path(), Arc::default());
        for seed in 0..6 {
            hashes.push(put(&store, &c, seed, 1000).await);
        }
        // As if written by a version without the index.
        store.inner.eviction.lru.clear().expect("clear");
        store.inner.eviction.lru_at.clear().expect("clear");
        store.flush().await.expect("flush");
    }
    let store = open_without_task(dir.path(), options(evicting("c", 5000)));
    store.run_eviction().expect("evict");
    assert!(!present(&store, &c, &hashes[0]).await);
    assert!(!present(&store, &c, &hashes[1]).await);
    for hash in &hashes[2..] {
        assert!(present(&store, &c, hash).await);
    }
    assert!(store.inner.eviction.indexed().expect("marker"));
    assert_consistent(&store).await;
}

/// Readers racing eviction (values in blob files, whose files go once the
/// removal is durable) get either the whole value, verified, or NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_eviction_get_whole_values_or_not_found() {
    const LEN: usize = 100 * 1024;
    let dir = tempfile::tempdir().expect("dir");
    let store = open_without_task(dir.path(), options(evicting("c", 20 * LEN as u64)));
    let c = ns("c");
    let hashes = put_many(&store, &c, 0..20, LEN).await;
    let hashes = Arc::new(hashes);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for reader in 0..4 {
        let (store, c, hashes, done) = (
            store.clone(),
            c.clone(),
            Arc::clone(&hashes),
            Arc::clone(&done),
        );
        readers.push(tokio::spawn(async move {
            let (mut whole, mut missing) = (0u64, 0u64);
            let mut n = reader;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                // A NOT_FOUND answers without awaiting anything: yield, or
                // four readers on two workers starve the writer's tasks.
                tokio::task::yield_now().await;
                let hash = &hashes[n % hashes.len()];
                n += 1;
                match store.get_object(&c, hash).await {
                    Ok((_, body)) => {
                        let chunks: Vec<Bytes> = body
                            .map(|chunk| chunk.expect("a read began must finish"))
                            .collect()
                            .await;
                        let digest = sha2::Sha256::digest(chunks.concat());
                        assert_eq!(hex::encode(digest), hash.as_str(), "torn value");
                        whole += 1;
                    }
                    Err(Error::NotFound { .. }) => missing += 1,
                    Err(other) => panic!("read failed: {other:?}"),
                }
            }
            (whole, missing)
        }));
    }
    for seed in 20..40 {
        put(&store, &c, seed, LEN).await;
        let evicting = store.clone();
        tokio::task::spawn_blocking(move || evicting.run_eviction())
            .await
            .expect("join")
            .expect("evict");
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut whole, mut missing) = (0, 0);
    for reader in readers {
        let (w, m) = reader.await.expect("reader");
        whole += w;
        missing += m;
    }
    assert!(whole > 0 && missing > 0, "whole {whole}, missing {missing}");
    assert!(store.evicted_total() >= 18);
    assert_consistent(&store).await;
}

/// An eviction whose log `fdatasync` fails is undone like any write: the
/// values come back, and once the log is reopened a new pass evicts them,
/// with the index and the counters consistent throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_whose_log_fails_is_undone_and_done_again() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().expect("dir");
    let faults = Arc::new(super::super::Faults::default());
    let store = open_without_task(
        dir.path(),
        StoreOptions {
            faults: Some(Arc::clone(&faults)),
            ..options(evicting("c", 10_000))
        },
    );
    let c = ns("c");
    let hashes = put_many(&store, &c, 0..11, 1000).await;
    faults.fail_flush.store(true, Ordering::SeqCst);
    let ticket = store.ticket();
    let evicting = store.clone();
    // The pass itself may see the failure (its later writes are refused)
    // or not (it does not wait for durability): either way it is undone.
    let _ = tokio::task::spawn_blocking(move || evicting.run_eviction())
        .await
        .expect("join");
    store
        .inner
        .wal
        .barrier(ticket)
        .await
        .expect_err("the eviction was not durable");
    faults.fail_flush.store(false, Ordering::SeqCst);
    for hash in &hashes {
        assert!(present(&store, &c, hash).await, "an undone eviction stuck");
    }
    let mut evicted = 0;
    for _ in 0..200 {
        let evicting = store.clone();
        match tokio::task::spawn_blocking(move || evicting.run_eviction())
            .await
            .expect("join")
        {
            Ok(pass) if pass.evicted > 0 => {
                evicted = pass.evicted;
                break;
            }
            // Refused until the log is reopened on a fresh segment.
            _ => tokio::time::sleep(std::time::Duration::from_millis(25)).await,
        }
    }
    assert_eq!(evicted, 2, "eviction never resumed");
    store.flush().await.expect("durable");
    assert_eq!(held(&store, "c").await, 9000);
    assert_consistent(&store).await;
}
