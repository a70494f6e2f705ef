//! Quotas: refusals, concurrency and the server-wide limit.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use trove_proto::artifacts::PutOptions;
use trove_proto::entries::NewEntry;
use trove_proto::types::{ByteStream, Name};
use trove_proto::{ArtifactStore, EntryStore, UsageStore};

use super::super::{SledStore, StoreOptions};
use super::*;
use crate::engine::quota::{NamespaceQuota, OnFull};

fn limited(quotas: Quotas) -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = StoreOptions {
        quotas: Arc::new(quotas),
        ..StoreOptions::default()
    };
    let store = SledStore::open(dir.path(), options).expect("open");
    (dir, store)
}

fn quota(ns: &str, max_bytes: u64) -> Quotas {
    Quotas {
        max_disk_bytes: None,
        namespaces: [(
            ns.to_owned(),
            NamespaceQuota {
                max_bytes,
                on_full: OnFull::Reject,
            },
        )]
        .into(),
        min_free_disk_bytes: 0,
        every_namespace: None,
    }
}

fn body(len: usize) -> ByteStream {
    futures::stream::iter([Ok(Bytes::from(vec![b'x'; len]))]).boxed()
}

async fn put(
    store: &SledStore,
    ns: &Namespace,
    key: &str,
    len: usize,
    declared: bool,
) -> Result<(), Error> {
    let options = PutOptions {
        expected_size: declared.then_some(len as u64),
        ..PutOptions::default()
    };
    store
        .put_artifact(ns, &Name::new("key", key).expect("key"), options, body(len))
        .await
        .map(|_| ())
}

async fn logical(store: &SledStore, ns: &Namespace) -> u64 {
    store
        .namespace_usage(Some(ns))
        .await
        .expect("usage")
        .iter()
        .map(|r| r.logical_bytes)
        .sum()
}

/// A write that would pass the quota is RESOURCE_EXHAUSTED naming the
/// namespace, its quota and its usage, and stores nothing, whether its
/// size was declared (refused before any byte) or not; writes that fit
/// (a smaller overwrite, another namespace, a delete) go on.
#[tokio::test]
async fn a_quota_refuses_what_would_pass_it_and_stores_nothing() {
    let (_dir, store) = limited(quota("capped", 100));
    let capped = Namespace::new("capped").expect("ns");
    let free = Namespace::new("free").expect("ns");
    put(&store, &capped, "a", 60, false).await.expect("fits");
    for declared in [true, false] {
        let err = put(&store, &capped, "b", 50, declared)
            .await
            .expect_err("passes the quota");
        let Error::ResourceExhausted { limit, message } = &err else {
            panic!("expected RESOURCE_EXHAUSTED, got {err:?}");
        };
        assert!(limit.contains("capped"), "{limit}");
        assert!(
            message.contains("100") && message.contains("60"),
            "{message}"
        );
        assert_eq!(logical(&store, &capped).await, 60);
        assert!(store
            .stat_artifact(&capped, &Name::new("key", "b").expect("key"))
            .await
            .is_err());
    }
    put(&store, &capped, "a", 100, true)
        .await
        .expect("an overwrite that fits");
    put(&store, &free, "big", 5000, false)
        .await
        .expect("no quota");
    let entry = NewEntry::parse("entry", Bytes::from_static(b"{\"n\":1}"), Some(1)).expect("entry");
    let err = store
        .append_entries(
            &capped,
            &Name::new("c", "c").expect("c"),
            vec![entry],
            Default::default(),
        )
        .await
        .expect_err("entries count too");
    assert!(matches!(err, Error::ResourceExhausted { .. }), "{err:?}");
    store
        .delete_artifact(&capped, &Name::new("key", "a").expect("key"))
        .await
        .expect("deletes always go through");
    assert_eq!(logical(&store, &capped).await, 0);
    put(&store, &capped, "b", 50, true)
        .await
        .expect("room again");
}

/// Concurrent writers never pass the quota: each write is checked
/// against the counters in the same logged write that changes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_stop_exactly_at_the_quota() {
    let (_dir, store) = limited(quota("capped", 95));
    let capped = Namespace::new("capped").expect("ns");
    let writes: Vec<_> = (0..20)
        .map(|i| {
            let (store, capped) = (store.clone(), capped.clone());
            tokio::spawn(async move { put(&store, &capped, &format!("k{i}"), 10, false).await })
        })
        .collect();
    let mut stored = 0;
    for write in writes {
        match write.await.expect("join") {
            Ok(()) => stored += 1,
            Err(Error::ResourceExhausted { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stored, 9);
    assert_eq!(logical(&store, &capped).await, 90);
}

/// The server-wide limit counts every namespace's stored bytes.
#[tokio::test]
async fn the_server_limit_counts_every_namespace() {
    let (_dir, store) = limited(Quotas {
        max_disk_bytes: Some(100),
        namespaces: Default::default(),
        min_free_disk_bytes: 0,
        every_namespace: None,
    });
    let (a, b) = (
        Namespace::new("a").expect("ns"),
        Namespace::new("b").expect("ns"),
    );
    put(&store, &a, "k", 70, false).await.expect("fits");
    let err = put(&store, &b, "k", 40, false)
        .await
        .expect_err("server full");
    assert!(
        matches!(&err, Error::ResourceExhausted { limit, .. } if limit == "max_disk_bytes"),
        "{err:?}"
    );
    put(&store, &b, "k", 30, true).await.expect("fits exactly");
}
