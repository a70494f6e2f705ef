//! Counters against every group, a recount and a restart.

use bytes::Bytes;
use futures::StreamExt;
use trove_proto::cache::{CacheScope, UploadOptions};
use trove_proto::entries::NewEntry;
use trove_proto::types::{ByteStream, Name};
use trove_proto::{ArtifactStore, CacheStore, EntryStore, ObjectStore, UsageStore};

use super::super::{SledStore, StoreOptions};
use super::*;

fn store() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path(), StoreOptions::default()).expect("open");
    (dir, store)
}

fn body(bytes: &'static [u8]) -> ByteStream {
    futures::stream::iter([Ok(Bytes::from_static(bytes))]).boxed()
}

fn name(raw: &str) -> Name {
    Name::new("name", raw).expect("name")
}

fn entry(json: &'static str, at: i64) -> NewEntry {
    NewEntry::parse("entry", Bytes::from_static(json.as_bytes()), Some(at)).expect("entry")
}

fn row<'a>(rows: &'a [UsageRow], ns: &str, group: &str) -> Option<&'a UsageRow> {
    rows.iter().find(|r| r.namespace == ns && r.group == group)
}

fn figures(rows: &[UsageRow], ns: &str, group: &str) -> (u64, u64) {
    row(rows, ns, group).map_or((0, 0), |r| (r.items, r.logical_bytes))
}

/// Forgets the counters and counts the store again from scratch.
pub(in crate::engine::sled) async fn recount(store: &SledStore) -> Vec<UsageRow> {
    let trees = &store.inner.usage;
    let counters = |tree: &sled::Tree| -> Vec<(IVec, IVec)> {
        tree.iter().collect::<Result<_, _>>().expect("counters")
    };
    let before = (counters(&trees.usage), counters(&trees.entry_usage));
    trees.usage.clear().expect("clear");
    trees.entry_usage.clear().expect("clear");
    let entries = &store.inner.entry_trees;
    trees
        .prepare(&Sources {
            objects: &store.inner.objects,
            artifacts: &store.inner.artifacts,
            cache_refs: &store.inner.cache.refs,
            cassettes: &entries.cassettes,
            entries: &entries.entries,
        })
        .expect("recount");
    let after = (counters(&trees.usage), counters(&trees.entry_usage));
    assert_eq!(
        after, before,
        "kept counters and totals differ from a recount"
    );
    store.namespace_usage(None).await.expect("rows")
}

/// Writes, overwrites and deletes in every group move the counters by
/// exactly what they stored, and a recount from scratch agrees.
#[tokio::test]
async fn counters_follow_every_group_and_match_a_recount() {
    let (_dir, store) = store();
    let (a, b) = (
        Namespace::new("team-a").expect("ns"),
        Namespace::new("team-b").expect("ns"),
    );
    let put = |ns: Namespace, key: &'static str, value: &'static [u8]| {
        let store = store.clone();
        async move {
            store
                .put_artifact(&ns, &name(key), Default::default(), body(value))
                .await
                .expect("put")
        }
    };
    put(a.clone(), "one", b"0123456789").await;
    put(a.clone(), "two", b"01234567890123456789").await;
    put(a.clone(), "one", b"abc").await;
    put(b.clone(), "x", b"xyz").await;
    store
        .delete_artifact(&a, &name("two"))
        .await
        .expect("delete");
    let hash = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    store
        .put_object(&a, &name(hash), None, body(b"abc"))
        .await
        .expect("object");
    store
        .append_entries(
            &a,
            &name("cassette"),
            vec![entry(r#"{"n":1}"#, 1), entry(r#"{"n":22}"#, 2)],
            Default::default(),
        )
        .await
        .expect("append");
    store
        .append_entries(
            &a,
            &name("cassette"),
            vec![entry(r#"{"n":3}"#, 3)],
            Default::default(),
        )
        .await
        .expect("append again");
    store
        .append_entries(
            &a,
            &name("gone"),
            vec![entry(r#"{"n":4}"#, 4)],
            Default::default(),
        )
        .await
        .expect("append");
    store
        .delete_cassette(&a, &name("gone"))
        .await
        .expect("delete cassette");
    let replacement = futures::stream::iter([Ok(entry(r#"{"n":5}"#, 5))]).boxed();
    store
        .replace_entries(&b, &name("swapped"), replacement)
        .await
        .expect("replace");
    let scope = |branch: &str| CacheScope {
        namespace: a.clone(),
        prefix: "ci".into(),
        branch: name(branch),
        default_branch: name("main"),
        test_suite_id: String::new(),
    };
    store
        .upload(
            &scope("main"),
            &name("r1"),
            UploadOptions::default(),
            body(b"archive"),
        )
        .await
        .expect("upload main");
    store
        .upload(
            &scope("feature"),
            &name("r2"),
            UploadOptions::default(),
            body(b"pr"),
        )
        .await
        .expect("upload pr");

    let rows = store.namespace_usage(None).await.expect("rows");
    assert_eq!(figures(&rows, "team-a", ARTIFACTS), (1, 3));
    assert_eq!(figures(&rows, "team-b", ARTIFACTS), (1, 3));
    assert_eq!(figures(&rows, "team-a", OBJECTS), (1, 3));
    assert_eq!(figures(&rows, "team-a", CASSETTES), (1, 0));
    assert_eq!(figures(&rows, "team-a", ENTRIES), (3, 7 + 8 + 7));
    assert_eq!(figures(&rows, "team-b", CASSETTES), (1, 0));
    assert_eq!(figures(&rows, "team-b", ENTRIES), (1, 7));
    let cache: Vec<_> = rows.iter().filter(|r| r.group == CACHE).collect();
    assert_eq!(cache.len(), 2, "{cache:?}");
    let main = cache.iter().find(|r| !r.pr_tier).expect("main tier");
    assert_eq!(
        (main.prefix.as_str(), main.items, main.logical_bytes),
        ("ci", 1, 7)
    );
    let pr = cache.iter().find(|r| r.pr_tier).expect("PR tier");
    assert_eq!(
        (pr.branch.as_str(), pr.items, pr.logical_bytes),
        ("feature", 1, 2)
    );
    let only_b = store.namespace_usage(Some(&b)).await.expect("rows of b");
    assert!(only_b.iter().all(|r| r.namespace == "team-b"), "{only_b:?}");

    assert_eq!(recount(&store).await, rows);
}

/// The counters are written with the data: a reopened store reports
/// the same figures without counting again.
#[tokio::test]
async fn counters_survive_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Namespace::new("team").expect("ns");
    let before = {
        let store = SledStore::open(dir.path(), StoreOptions::default()).expect("open");
        store
            .put_artifact(&ns, &name("k"), Default::default(), body(b"12345"))
            .await
            .expect("put");
        store.namespace_usage(None).await.expect("rows")
    };
    let store = SledStore::open(dir.path(), StoreOptions::default()).expect("reopen");
    assert!(store.inner.usage.ready().expect("ready"));
    assert_eq!(store.namespace_usage(None).await.expect("rows"), before);
    assert_eq!(figures(&before, "team", ARTIFACTS), (1, 5));
}
