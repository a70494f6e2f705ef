//! The conformance suite: one `async fn` per documented behaviour of the
//! storage traits, written once and run against every implementation through
//! [`conformance_suite!`](crate::conformance_suite). Each function works in a
//! fresh random namespace, so functions can share a store.

use bytes::Bytes;
use futures::StreamExt;
use trove_proto::artifacts::PutOptions;
use trove_proto::cache::{
    BranchRefsKey, BranchRefsWrite, CacheScope, PruneOptions, Tier, UploadOptions,
};
use trove_proto::entries::{NewEntry, ReadOptions, StoredEntry};
use trove_proto::objects::StreamChunk;
use trove_proto::types::{ListPage, Name, Namespace};
use trove_proto::{ArtifactStore, CacheStore, EntryStore, Error, ObjectStore};

use crate::target::Target;
use crate::{
    bytes_stream, collect_bytes, digest_stream, generated_sha256, generated_stream, sha256_hex,
};

/// Every implementation the suite runs against provides these traits.
pub trait Store: ObjectStore + ArtifactStore + EntryStore + CacheStore {}
impl<T: ObjectStore + ArtifactStore + EntryStore + CacheStore> Store for T {}

/// Generates one test per conformance function for the target built by `$make`.
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@each $make;
            object_round_trip_verifies_sha256,
            object_hash_mismatch_stores_nothing,
            object_opaque_ids_and_rewrites,
            object_size_mismatch_stores_nothing,
            object_missing_is_not_found,
            object_delete_is_idempotent_and_removes_stream,
            object_five_million_bytes,
            object_list_pages_and_prefixes,
            object_find_missing,
            stream_round_trip_exact,
            stream_thousand_chunks,
            stream_empty_and_overwrite,
            artifact_put_get_overwrite_stat,
            artifact_missing_and_idempotent_delete,
            artifact_keys_never_collide_or_leak,
            artifact_list_pages_with_values,
            artifact_list_skips_large_values,
            namespaces_are_isolated,
            aborted_put_keeps_previous_value,
            dropped_put_keeps_previous_value,
            large_value_round_trip,
            cassette_missing_reads_empty,
            cassette_exists_lifecycle,
            cassette_reads_in_recorded_order_across_batches,
            cassette_untimed_entries_keep_arrival_order,
            cassette_concurrent_writers_lose_nothing,
            cassette_large_entry_and_many_entries,
            cassette_paging_walks_once,
            cassette_replace_is_atomic_for_readers,
            cassette_aborted_replace_keeps_old_content,
            cassette_list_and_names,
            cache_backend_contract,
            cache_round_trips_and_fallback,
            cache_suites_are_kept_apart,
            cache_tree_pointer_resolves,
            cache_branch_names_are_opaque,
            cache_prune_by_count,
            cache_prune_by_age,
            cache_prune_dead_branch,
            cache_prune_all_branches,
            cache_concurrent_uploads_leave_one_archive,
            cache_prune_does_not_block_traffic,
            names_at_the_length_limit,
            long_names_list_in_byte_order,
        );
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            /// Conformance: see the function of the same name in `trove_tests::conformance`.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(target) = $crate::target::IntoTarget::into_target($make.await) else {
                    return;
                };
                $crate::conformance::$name(&target).await;
                target.assert_no_panic();
            }
        )*
    };
}

/// A namespace no other test uses.
pub fn fresh_ns() -> Namespace {
    let n: u64 = rand::random();
    Namespace::new(&format!("conformance-{n:016x}")).expect("valid namespace")
}

fn name(s: &str) -> Name {
    Name::new("test", s).expect("valid name")
}

fn one(data: &'static [u8]) -> trove_proto::types::ByteStream {
    bytes_stream(vec![Bytes::from_static(data)])
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Error>, field: &str) {
    match result {
        Err(Error::InvalidArgument { field: f, reason }) => {
            assert!(
                f.contains(field),
                "wrong field {f:?} (reason: {reason}), expected {field:?}"
            )
        }
        other => panic!("expected InvalidArgument on {field}, got {other:?}"),
    }
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(result: Result<T, Error>) {
    match result {
        Err(Error::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

async fn read_object<S: Store>(store: &S, ns: &Namespace, hash: &Name) -> Vec<u8> {
    let (_, stream) = store.get_object(ns, hash).await.expect("get object");
    collect_bytes(stream).await.expect("read object")
}

async fn read_artifact<S: Store>(store: &S, ns: &Namespace, key: &Name) -> Vec<u8> {
    let (_, stream) = store.get_artifact(ns, key).await.expect("get artifact");
    collect_bytes(stream).await.expect("read artifact")
}

/// A 64-hex hash is the content's SHA-256: the object is stored, verified and read back.
pub async fn object_round_trip_verifies_sha256<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let data = b"hello trove";
    let hash = name(&sha256_hex(data));
    let info = t
        .store
        .put_object(&ns, &hash, None, one(data))
        .await
        .expect("put");
    assert!(info.verified);
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.sha256, hash.as_str());
    assert_eq!(read_object(&t.store, &ns, &hash).await, data);
    let stat = t.store.stat_object(&ns, &hash).await.expect("stat");
    assert_eq!((stat.size, stat.created_at), (info.size, info.created_at));
    // Storing the same content again succeeds and changes nothing.
    let again = t
        .store
        .put_object(&ns, &hash, None, one(data))
        .await
        .expect("put again");
    assert_eq!(again.created_at, info.created_at);
}

/// Content that does not match its SHA-256 hash is rejected and nothing is stored.
pub async fn object_hash_mismatch_stores_nothing<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let hash = name(&sha256_hex(b"the real content"));
    let result = t
        .store
        .put_object(&ns, &hash, None, one(b"other content"))
        .await;
    assert_invalid(result, "hash");
    assert_not_found(t.store.stat_object(&ns, &hash).await);
    let listed = t
        .store
        .list_objects(&ns, &ListPage::first(""))
        .await
        .expect("list");
    assert!(listed.items.is_empty(), "{listed:?}");
    // Large mismatching content goes through staging: nothing may remain.
    let big = t
        .store
        .put_object(&ns, &hash, None, generated_stream(1, 300_000, 65_536))
        .await;
    assert_invalid(big, "hash");
    t.assert_disk_settles(0).await;
}

/// Identifiers that are not SHA-256 hex are opaque names; writing one again replaces it.
pub async fn object_opaque_ids_and_rewrites<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    for id in [
        "abc",
        "ABCDEF",
        "sha1:1234",
        &"A".repeat(64),
        "../../etc/passwd",
    ] {
        let id = name(id);
        let info = t
            .store
            .put_object(&ns, &id, None, one(b"v1"))
            .await
            .expect("put");
        assert!(!info.verified, "{id} must not count as verified");
        t.store
            .put_object(&ns, &id, None, one(b"v2"))
            .await
            .expect("rewrite");
        assert_eq!(read_object(&t.store, &ns, &id).await, b"v2");
    }
}

/// A declared size that the body does not match rejects the upload.
pub async fn object_size_mismatch_stores_nothing<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let id = name("sized");
    assert_invalid(
        t.store.put_object(&ns, &id, Some(10), one(b"short")).await,
        "size",
    );
    assert_invalid(
        t.store
            .put_object(&ns, &id, Some(2), one(b"too long"))
            .await,
        "size",
    );
    assert_not_found(t.store.stat_object(&ns, &id).await);
    let ok = t
        .store
        .put_object(&ns, &id, Some(5), one(b"exact"))
        .await
        .expect("exact size");
    assert_eq!(ok.size, 5);
}

/// Get and Stat of a missing object are NotFound; so is a missing stream.
pub async fn object_missing_is_not_found<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let id = name("nothing-here");
    assert_not_found(t.store.get_object(&ns, &id).await.map(|(info, _)| info));
    assert_not_found(t.store.stat_object(&ns, &id).await);
    assert_not_found(t.store.get_stream(&ns, &id).await.map(|(info, _)| info));
}

/// Delete removes the object and the stream under the hash, and is idempotent.
pub async fn object_delete_is_idempotent_and_removes_stream<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let id = name("both");
    t.store
        .put_object(&ns, &id, None, one(b"blob"))
        .await
        .expect("put");
    let chunks = futures::stream::iter(vec![Ok(StreamChunk {
        data: Bytes::from_static(b"c"),
        timestamp: Some(1),
    })])
    .boxed();
    t.store
        .put_stream(&ns, &id, chunks)
        .await
        .expect("put stream");
    assert!(t.store.delete_object(&ns, &id).await.expect("delete"));
    assert_not_found(t.store.stat_object(&ns, &id).await);
    assert_not_found(t.store.get_stream(&ns, &id).await.map(|(i, _)| i));
    assert!(!t.store.delete_object(&ns, &id).await.expect("delete again"));
    assert!(!t
        .store
        .delete_object(&ns, &name("never-existed"))
        .await
        .expect("delete missing"));
}

/// A 5,000,000-byte object round-trips byte for byte through a blob file.
pub async fn object_five_million_bytes<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let total = 5_000_000u64;
    let sha = generated_sha256(5, total, 100_000).await;
    let hash = name(&sha);
    let info = t
        .store
        .put_object(&ns, &hash, Some(total), generated_stream(5, total, 100_000))
        .await
        .expect("put 5 MB");
    assert_eq!((info.size, info.verified), (total, true));
    let (info, stream) = t.store.get_object(&ns, &hash).await.expect("get");
    assert_eq!(info.size, total);
    assert_eq!(digest_stream(stream).await.expect("read"), (total, sha));
    t.assert_disk_settles(1).await;
}

/// Listing returns every hash once, in byte order, across pages, within the prefix.
pub async fn object_list_pages_and_prefixes<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let mut expected = Vec::new();
    for i in 0..23 {
        let id = format!("obj/{i:02}");
        t.store
            .put_object(&ns, &name(&id), None, one(b"x"))
            .await
            .expect("put");
        expected.push(id);
    }
    t.store
        .put_object(&ns, &name("other/1"), None, one(b"x"))
        .await
        .expect("put");
    // A stream-only hash is listed too.
    let empty = futures::stream::iter(Vec::new()).boxed();
    t.store
        .put_stream(&ns, &name("obj/stream-only"), empty)
        .await
        .expect("put stream");
    expected.push("obj/stream-only".into());
    expected.sort();

    let mut seen = Vec::new();
    let mut page = ListPage::new("obj/", 5, "").expect("page");
    loop {
        let result = t.store.list_objects(&ns, &page).await.expect("list");
        assert!(result.items.len() <= 5);
        for item in &result.items {
            assert_eq!(item.has_object, item.hash != "obj/stream-only", "{item:?}");
            assert_eq!(item.has_stream, item.hash == "obj/stream-only", "{item:?}");
            seen.push(item.hash.clone());
        }
        match result.next_page_token {
            Some(token) => page = ListPage::new("obj/", 5, &token).expect("token"),
            None => break,
        }
    }
    assert_eq!(seen, expected);
    let all = t
        .store
        .list_objects(&ns, &ListPage::first(""))
        .await
        .expect("list all");
    assert_eq!(all.items.len(), expected.len() + 1);
    assert!(all.next_page_token.is_none());
}

/// FindMissing returns exactly the hashes without an object, in request order.
pub async fn object_find_missing<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    for id in ["b", "d"] {
        t.store
            .put_object(&ns, &name(id), None, one(b"x"))
            .await
            .expect("put");
    }
    let ask: Vec<Name> = ["e", "b", "a", "d", "c"].iter().map(|s| name(s)).collect();
    let missing = t.store.find_missing(&ns, &ask).await.expect("find missing");
    let missing: Vec<&str> = missing.iter().map(Name::as_str).collect();
    assert_eq!(missing, ["e", "a", "c"]);
    assert!(t
        .store
        .find_missing(&ns, &[])
        .await
        .expect("empty")
        .is_empty());
}

async fn read_stream<S: Store>(store: &S, ns: &Namespace, id: &Name) -> Vec<StreamChunk> {
    let (info, chunks) = store.get_stream(ns, id).await.expect("get stream");
    let chunks: Vec<StreamChunk> = chunks.map(|c| c.expect("chunk")).collect().await;
    assert_eq!(info.chunk_count, chunks.len() as u64);
    chunks
}

/// Chunk order, empty chunks and absent timestamps round-trip exactly.
pub async fn stream_round_trip_exact<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let id = name("sse");
    let chunks = vec![
        StreamChunk {
            data: Bytes::from_static(b"first"),
            timestamp: Some(100),
        },
        StreamChunk {
            data: Bytes::new(),
            timestamp: Some(-7),
        },
        StreamChunk {
            data: Bytes::from_static(b"no time"),
            timestamp: None,
        },
        StreamChunk {
            data: Bytes::from_static(b"\0\xff"),
            timestamp: Some(i64::MAX),
        },
        StreamChunk {
            data: Bytes::from_static(b"zero"),
            timestamp: Some(0),
        },
    ];
    let body = futures::stream::iter(chunks.clone().into_iter().map(Ok)).boxed();
    let info = t
        .store
        .put_stream(&ns, &id, body)
        .await
        .expect("put stream");
    assert_eq!(info.chunk_count, 5);
    assert_eq!(info.total_bytes, 5 + 7 + 2 + 4);
    assert_eq!(read_stream(&t.store, &ns, &id).await, chunks);
}

/// A 1000-chunk stream (with a large chunk among them) round-trips in order.
pub async fn stream_thousand_chunks<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let id = name("long-stream");
    let chunks: Vec<StreamChunk> = (0..1000i64)
        .map(|i| StreamChunk {
            data: if i == 500 {
                Bytes::from(vec![7u8; 200_000])
            } else {
                Bytes::from(format!("event {i}"))
            },
            timestamp: (i % 3 != 0).then_some(i * 1000),
        })
        .collect();
    let body = futures::stream::iter(chunks.clone().into_iter().map(Ok)).boxed();
    let info = t
        .store
        .put_stream(&ns, &id, body)
        .await
        .expect("put stream");
    assert_eq!(info.chunk_count, 1000);
    assert_eq!(read_stream(&t.store, &ns, &id).await, chunks);
}

/// An empty chunk list is stored and read back empty; a second put replaces the first.
pub async fn stream_empty_and_overwrite<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let id = name("s");
    let info = t
        .store
        .put_stream(&ns, &id, futures::stream::iter(Vec::new()).boxed())
        .await
        .expect("empty stream");
    assert_eq!((info.chunk_count, info.total_bytes), (0, 0));
    assert!(read_stream(&t.store, &ns, &id).await.is_empty());
    let replacement = vec![StreamChunk {
        data: Bytes::from_static(b"new"),
        timestamp: None,
    }];
    let body = futures::stream::iter(replacement.clone().into_iter().map(Ok)).boxed();
    t.store.put_stream(&ns, &id, body).await.expect("overwrite");
    assert_eq!(read_stream(&t.store, &ns, &id).await, replacement);
    // A stream does not create an object.
    assert_not_found(t.store.stat_object(&ns, &id).await);
}

/// Put overwrites; Stat reports size, SHA-256, content type and both timestamps.
pub async fn artifact_put_get_overwrite_stat<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let key = name("patch-abc123");
    let opts = PutOptions::new("text/x-diff", None).expect("options");
    let first = t
        .store
        .put_artifact(&ns, &key, opts.clone(), one(b"v1"))
        .await
        .expect("put");
    assert_eq!(read_artifact(&t.store, &ns, &key).await, b"v1");
    let second = t
        .store
        .put_artifact(&ns, &key, PutOptions::default(), one(b"version two"))
        .await
        .expect("overwrite");
    assert_eq!(read_artifact(&t.store, &ns, &key).await, b"version two");
    let stat = t.store.stat_artifact(&ns, &key).await.expect("stat");
    assert_eq!(stat.size, 11);
    assert_eq!(stat.sha256, sha256_hex(b"version two"));
    assert_eq!(stat.content_type, "");
    assert_eq!(
        stat.created_at, first.created_at,
        "created_at survives overwrites"
    );
    assert!(stat.updated_at >= first.updated_at);
    assert_eq!(stat, second);
    assert_eq!(first.content_type, "text/x-diff");
}

/// A missing key is NotFound for Get and Stat; Delete is idempotent.
pub async fn artifact_missing_and_idempotent_delete<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let key = name("k");
    assert_not_found(t.store.get_artifact(&ns, &key).await.map(|(i, _)| i));
    assert_not_found(t.store.stat_artifact(&ns, &key).await);
    assert!(!t
        .store
        .delete_artifact(&ns, &key)
        .await
        .expect("delete missing"));
    t.store
        .put_artifact(&ns, &key, PutOptions::default(), one(b"x"))
        .await
        .expect("put");
    assert!(t.store.delete_artifact(&ns, &key).await.expect("delete"));
    assert!(!t
        .store
        .delete_artifact(&ns, &key)
        .await
        .expect("delete again"));
    assert_not_found(t.store.get_artifact(&ns, &key).await.map(|(i, _)| i));
}

/// Keys with `/`, `..`, unicode and the encoding's separator byte never collide or leak across prefixes.
pub async fn artifact_keys_never_collide_or_leak<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let keys = [
        "a",
        "a/",
        "a/b",
        "a/b/c",
        "a/b/../c",
        "..",
        "../a",
        "a\u{1}",
        "a\u{1}b",
        "a\u{1}\u{1}",
        "ab",
        "a b",
        "ä",
        "a/ü/🦀",
        "\u{ff}",
        "a\u{7f}",
        "a\\b",
        "a//b",
    ];
    for (i, key) in keys.iter().enumerate() {
        let value = format!("value-{i}");
        t.store
            .put_artifact(
                &ns,
                &name(key),
                PutOptions::default(),
                bytes_stream(vec![value.into()]),
            )
            .await
            .expect("put");
    }
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            read_artifact(&t.store, &ns, &name(key)).await,
            format!("value-{i}").as_bytes(),
            "{key:?}"
        );
    }
    let mut sorted: Vec<&str> = keys.to_vec();
    sorted.sort_unstable();
    // Walking one key per page crosses every awkward boundary exactly once.
    let mut walked = Vec::new();
    let mut token = String::new();
    loop {
        let page = ListPage::new("", 1, &token).expect("page");
        let listed = t
            .store
            .list_artifacts(&ns, &page, false)
            .await
            .expect("list");
        walked.extend(
            listed
                .items
                .iter()
                .filter_map(|a| a.info.as_ref())
                .map(|i| i.key.clone()),
        );
        match listed.next_page_token {
            Some(next) => token = next,
            None => break,
        }
    }
    assert_eq!(walked, sorted);
    for prefix in ["", "a", "a/", "a/b", "a\u{1}", "..", "ä", "zzz"] {
        let page = ListPage::new(prefix, 0, "").expect("page");
        let listed = t
            .store
            .list_artifacts(&ns, &page, false)
            .await
            .expect("list");
        let got: Vec<String> = listed
            .items
            .iter()
            .filter_map(|a| a.info.as_ref())
            .map(|i| i.key.clone())
            .collect();
        let want: Vec<String> = sorted
            .iter()
            .filter(|k| k.starts_with(prefix))
            .map(|k| (*k).to_owned())
            .collect();
        assert_eq!(got, want, "prefix {prefix:?}");
    }
}

/// Listing with values walks every key exactly once, in order, with the right values.
pub async fn artifact_list_pages_with_values<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let mut expected = Vec::new();
    for i in 0..25 {
        let key = format!("variants/{i:03}");
        let value = format!("{{\"options\":\"w={i}\"}}");
        t.store
            .put_artifact(
                &ns,
                &name(&key),
                PutOptions::default(),
                bytes_stream(vec![value.clone().into()]),
            )
            .await
            .expect("put");
        expected.push((key, value));
    }
    // A value big enough to live in a blob file is listed with its value too.
    t.store
        .put_artifact(
            &ns,
            &name("variants/zbig"),
            PutOptions::default(),
            generated_stream(9, 200_000, 50_000),
        )
        .await
        .expect("put big");
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ListPage::new("variants/", 7, &token).expect("page");
        let result = t
            .store
            .list_artifacts(&ns, &page, true)
            .await
            .expect("list");
        for item in result.items {
            let info = item.info.expect("info");
            let value = item.value.expect("value included");
            assert_eq!(value.len() as u64, info.size);
            seen.push((info.key, value));
        }
        match result.next_page_token {
            Some(next) => token = next,
            None => break,
        }
    }
    assert_eq!(seen.len(), 26);
    for ((key, value), (want_key, want_value)) in seen.iter().zip(expected.iter()) {
        assert_eq!((key, &value[..]), (want_key, want_value.as_bytes()));
    }
    assert_eq!(seen[25].0, "variants/zbig");
    // Without values, none are sent.
    let bare = t
        .store
        .list_artifacts(&ns, &ListPage::first("variants/"), false)
        .await
        .expect("list");
    assert!(bare.items.iter().all(|a| a.value.is_none()));
}

/// Values over the listing limit are left out of listings but still listed.
pub async fn artifact_list_skips_large_values<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let big = trove_proto::artifacts::MAX_LISTED_VALUE_BYTES + 1;
    t.store
        .put_artifact(
            &ns,
            &name("big"),
            PutOptions::default(),
            generated_stream(3, big, 65_536),
        )
        .await
        .expect("put big");
    t.store
        .put_artifact(&ns, &name("small"), PutOptions::default(), one(b"s"))
        .await
        .expect("put");
    let listed = t
        .store
        .list_artifacts(&ns, &ListPage::first(""), true)
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 2);
    assert!(listed.items[0].value.is_none());
    assert_eq!(listed.items[0].info.as_ref().map(|i| i.size), Some(big));
    assert_eq!(listed.items[1].value.as_deref(), Some(&b"s"[..]));
}

/// Namespaces never see, list or delete each other's items.
pub async fn namespaces_are_isolated<S: Store>(t: &Target<S>) {
    let (a, b) = (fresh_ns(), fresh_ns());
    let key = name("shared-name");
    t.store
        .put_artifact(&a, &key, PutOptions::default(), one(b"in a"))
        .await
        .expect("put a");
    t.store
        .put_object(&a, &key, None, one(b"obj a"))
        .await
        .expect("put obj a");
    assert_not_found(t.store.stat_artifact(&b, &key).await);
    assert_not_found(t.store.stat_object(&b, &key).await);
    assert!(t
        .store
        .list_artifacts(&b, &ListPage::first(""), false)
        .await
        .expect("list")
        .items
        .is_empty());
    assert!(t
        .store
        .list_objects(&b, &ListPage::first(""),)
        .await
        .expect("list")
        .items
        .is_empty());
    t.store
        .put_artifact(&b, &key, PutOptions::default(), one(b"in b"))
        .await
        .expect("put b");
    assert!(t.store.delete_artifact(&b, &key).await.expect("delete b"));
    assert!(!t.store.delete_object(&b, &key).await.expect("delete obj b"));
    assert_eq!(read_artifact(&t.store, &a, &key).await, b"in a");
    assert_eq!(read_object(&t.store, &a, &key).await, b"obj a");
    // The default namespace is a namespace like any other.
    let default = Namespace::new("").expect("default");
    assert_not_found(
        t.store
            .stat_artifact(&default, &name(&format!("{}-missing", a)))
            .await,
    );
}

/// An upload whose body fails midway leaves the previous value intact and nothing staged.
pub async fn aborted_put_keeps_previous_value<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let key = name("precious");
    let original = b"original value".to_vec();
    t.store
        .put_artifact(
            &ns,
            &key,
            PutOptions::default(),
            bytes_stream(vec![original.clone().into()]),
        )
        .await
        .expect("put");
    let blobs_before = t.blob_files().await;
    for size in [1_000usize, 3_000_000] {
        let failing = generated_stream(11, size as u64, 65_536)
            .chain(futures::stream::once(async {
                Err(Error::Cancelled {
                    message: "client gave up".into(),
                })
            }))
            .boxed();
        let result = t
            .store
            .put_artifact(&ns, &key, PutOptions::default(), failing)
            .await;
        assert!(
            result.is_err(),
            "an aborted upload must fail, got {result:?}"
        );
        let obj = name(&format!("obj-{size}"));
        let failing = generated_stream(12, size as u64, 65_536)
            .chain(futures::stream::once(async {
                Err(Error::Cancelled {
                    message: "gone".into(),
                })
            }))
            .boxed();
        assert!(t.store.put_object(&ns, &obj, None, failing).await.is_err());
        assert_not_found(t.store.stat_object(&ns, &obj).await);
    }
    assert_eq!(read_artifact(&t.store, &ns, &key).await, original);
    t.assert_disk_settles(blobs_before).await;
}

/// Dropping an upload's future midway (a cancelled caller) keeps the previous value and stages nothing.
pub async fn dropped_put_keeps_previous_value<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let key = name("dropped");
    let v1 = t
        .store
        .put_artifact(
            &ns,
            &key,
            PutOptions::default(),
            generated_stream(1, 300_000, 65_536),
        )
        .await
        .expect("put v1");
    let blobs_before = t.blob_files().await;
    let (sent_all, all_sent) = tokio::sync::oneshot::channel::<()>();
    let body = generated_stream(2, 500_000, 65_536)
        .chain(futures::stream::once(async move {
            let _ = sent_all.send(());
            futures::future::pending::<Result<Bytes, Error>>().await
        }))
        .boxed();
    let put = t.store.put_artifact(&ns, &key, PutOptions::default(), body);
    tokio::select! {
        result = put => panic!("an upload whose body never ends must not complete: {result:?}"),
        _ = all_sent => {}
    }
    let (info, stream) = t.store.get_artifact(&ns, &key).await.expect("get");
    assert_eq!(info.sha256, v1.sha256);
    assert_eq!(digest_stream(stream).await.expect("read").1, v1.sha256);
    t.assert_disk_settles(blobs_before).await;
}

/// A 256 MiB value streams in and out intact (set TROVE_TEST_LARGE_MIB to change the size).
pub async fn large_value_round_trip<S: Store>(t: &Target<S>) {
    let mib: u64 = std::env::var("TROVE_TEST_LARGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .or(t.large_mib)
        .unwrap_or(256);
    let total = mib * 1024 * 1024;
    let ns = fresh_ns();
    let sha = generated_sha256(256, total, 1 << 20).await;
    let hash = name(&sha);
    let info = t
        .store
        .put_object(&ns, &hash, None, generated_stream(256, total, 1 << 20))
        .await
        .expect("put large object");
    assert_eq!(info.size, total);
    let (_, stream) = t.store.get_object(&ns, &hash).await.expect("get");
    assert_eq!(
        digest_stream(stream).await.expect("read"),
        (total, sha.clone())
    );
    let key = name("large/artifact");
    t.store
        .put_artifact(
            &ns,
            &key,
            PutOptions::default(),
            generated_stream(256, total, 1 << 20),
        )
        .await
        .expect("put large artifact");
    let (info, stream) = t.store.get_artifact(&ns, &key).await.expect("get artifact");
    assert_eq!(info.sha256, sha);
    assert_eq!(digest_stream(stream).await.expect("read"), (total, sha));
    // Disk use stays close to the data: two copies, no amplification.
    t.assert_disk_settles(2).await;
    let on_disk = t.stored_bytes().await;
    assert!(
        on_disk < 2 * total + 64 * 1024 * 1024,
        "{on_disk} bytes on disk for {} bytes of data",
        2 * total
    );
    eprintln!(
        "large_value_round_trip: {} bytes of values, {on_disk} bytes on disk",
        2 * total
    );
    if let Some(server) = &t.server {
        if let Some(peak) = server.peak_rss_bytes() {
            eprintln!("large_value_round_trip: server peak RSS {peak} bytes");
            assert!(
                peak < total / 2,
                "server peak RSS {peak} bytes for a {total}-byte value: not streamed"
            );
        }
    }
}

/// Total size of the files under `dir`.
pub fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                dir_size(&path)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

fn json_entry(tag: &str, recorded_at: Option<i64>) -> NewEntry {
    let json = match recorded_at {
        Some(ts) => serde_json::json!({ "tag": tag, "recorded_at": ts }),
        None => serde_json::json!({ "tag": tag }),
    };
    NewEntry::parse("entry", Bytes::from(json.to_string()), None).expect("valid entry")
}

async fn read_all<S: Store>(store: &S, ns: &Namespace, cassette: &Name) -> Vec<StoredEntry> {
    let stream = store
        .read_entries(ns, cassette, ReadOptions::default())
        .await
        .expect("read");
    stream.map(|e| e.expect("entry")).collect().await
}

fn tags(entries: &[StoredEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_slice(&e.json).expect("json");
            v["tag"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// A cassette never written reads as empty and does not exist.
pub async fn cassette_missing_reads_empty<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let c = name("never/written.json");
    assert!(read_all(&t.store, &ns, &c).await.is_empty());
    assert!(!t.store.cassette_exists(&ns, &c).await.expect("exists"));
    t.store.ensure_cassette(&ns, &c).await.expect("ensure");
    assert!(!t
        .store
        .cassette_exists(&ns, &c)
        .await
        .expect("ensure stores nothing"));
}

/// Exists is true after the first append, stays true when replaced by nothing, and is false after delete.
pub async fn cassette_exists_lifecycle<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let c = name("lifecycle");
    t.store
        .append_entries(&ns, &c, vec![json_entry("a", Some(1))], Default::default())
        .await
        .expect("append");
    assert!(t.store.cassette_exists(&ns, &c).await.expect("exists"));
    let count = t
        .store
        .replace_entries(&ns, &c, futures::stream::iter(vec![]).boxed())
        .await
        .expect("replace");
    assert_eq!(count, 0);
    assert!(t
        .store
        .cassette_exists(&ns, &c)
        .await
        .expect("exists after empty replace"));
    assert!(read_all(&t.store, &ns, &c).await.is_empty());
    assert!(t.store.delete_cassette(&ns, &c).await.expect("delete"));
    assert!(!t
        .store
        .cassette_exists(&ns, &c)
        .await
        .expect("exists after delete"));
    assert!(!t
        .store
        .delete_cassette(&ns, &c)
        .await
        .expect("delete again"));
    assert_invalid(
        t.store
            .append_entries(&ns, &c, vec![], Default::default())
            .await,
        "entries",
    );
}

/// Six entries appended out of order in separate batches read back in recorded_at order.
pub async fn cassette_reads_in_recorded_order_across_batches<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let c = name("ordered");
    for batch in [[50, 10], [60, 20], [40, 30]] {
        let entries = batch
            .iter()
            .map(|ts| json_entry(&format!("t{ts}"), Some(*ts)))
            .collect();
        t.store
            .append_entries(&ns, &c, entries, Default::default())
            .await
            .expect("append");
    }
    let read = read_all(&t.store, &ns, &c).await;
    assert_eq!(tags(&read), ["t10", "t20", "t30", "t40", "t50", "t60"]);
    let times: Vec<i64> = read.iter().map(|e| e.recorded_at).collect();
    assert_eq!(times, [10, 20, 30, 40, 50, 60]);
}

/// Entries without recorded_at (and ties) keep their arrival order.
pub async fn cassette_untimed_entries_keep_arrival_order<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let c = name("untimed");
    t.store
        .append_entries(
            &ns,
            &c,
            vec![json_entry("a", None), json_entry("b", None)],
            Default::default(),
        )
        .await
        .expect("append");
    t.store
        .append_entries(&ns, &c, vec![json_entry("c", None)], Default::default())
        .await
        .expect("append");
    t.store
        .append_entries(
            &ns,
            &c,
            vec![json_entry("d", Some(0)), json_entry("e", None)],
            Default::default(),
        )
        .await
        .expect("append");
    assert_eq!(
        tags(&read_all(&t.store, &ns, &c).await),
        ["a", "b", "c", "d", "e"]
    );
}

/// 50 concurrent writers x 200 entries: everything is read back once, in order.
pub async fn cassette_concurrent_writers_lose_nothing<S: Store + Clone>(t: &Target<S>) {
    let ns = fresh_ns();
    let c = name("crowded");
    let writers: Vec<_> = (0..50i64)
        .map(|w| {
            let (store, ns, c) = (t.store.clone(), ns.clone(), c.clone());
            tokio::spawn(async move {
                for batch in 0..20i64 {
                    let entries = (0..10i64)
                        .map(|i| {
                            let n = batch * 10 + i;
                            json_entry(&format!("{w}-{n}"), Some(n * 50 + w))
                        })
                        .collect();
                    store
                        .append_entries(&ns, &c, entries, Default::default())
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let read = read_all(&t.store, &ns, &c).await;
    assert_eq!(read.len(), 10_000);
    let times: Vec<i64> = read.iter().map(|e| e.recorded_at).collect();
    assert_eq!(
        times,
        (0..10_000).collect::<Vec<i64>>(),
        "complete, unique and ordered"
    );
}

/// A 10 MB entry and a 20,000-entry cassette round-trip.
pub async fn cassette_large_entry_and_many_entries<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let big = name("big-entry");
    let body = "x".repeat(10_000_000);
    let json = Bytes::from(format!("{{\"body\":\"{body}\",\"recorded_at\":5}}"));
    let entry = NewEntry::parse("entry", json.clone(), None).expect("entry");
    t.store
        .append_entries(&ns, &big, vec![entry], Default::default())
        .await
        .expect("append 10 MB");
    let read = read_all(&t.store, &ns, &big).await;
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].json, json);
    // A big entry in the middle of a cassette, and many mid-sized entries:
    // reads must not stop at size-bounded internal batches.
    let mixed = name("mixed");
    let big_entry = NewEntry::parse("entry", json.clone(), None).expect("entry");
    let mut entries = vec![json_entry("before", Some(1)), big_entry];
    entries.extend((0..300).map(|i| {
        let pad = "p".repeat(20_000);
        let value = serde_json::json!({ "tag": "mid", "pad": pad, "recorded_at": 10 + i });
        NewEntry::parse("entry", Bytes::from(value.to_string()), None).expect("entry")
    }));
    t.store
        .append_entries(&ns, &mixed, entries, Default::default())
        .await
        .expect("append mixed");
    let read = read_all(&t.store, &ns, &mixed).await;
    assert_eq!(read.len(), 302, "every entry after the large one is read");
    assert_eq!(read[1].json, json);
    let many = name("many");
    for chunk in 0..20 {
        let entries = (0..1000)
            .map(|i| json_entry("m", Some(chunk * 1000 + i)))
            .collect();
        t.store
            .append_entries(&ns, &many, entries, Default::default())
            .await
            .expect("append");
    }
    let read = read_all(&t.store, &ns, &many).await;
    assert_eq!(read.len(), 20_000);
    assert!(read.windows(2).all(|w| w[0].recorded_at < w[1].recorded_at));
}

/// Paging with after/limit walks a cassette exactly once, in order.
pub async fn cassette_paging_walks_once<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let c = name("paged");
    let entries = (0..95)
        .map(|i| json_entry(&format!("p{i}"), Some(i % 7)))
        .collect();
    t.store
        .append_entries(&ns, &c, entries, Default::default())
        .await
        .expect("append");
    let everything = read_all(&t.store, &ns, &c).await;
    let mut walked = Vec::new();
    let mut after = None;
    loop {
        let page: Vec<StoredEntry> = t
            .store
            .read_entries(
                &ns,
                &c,
                ReadOptions {
                    after,
                    limit: Some(10),
                },
            )
            .await
            .expect("read page")
            .map(|e| e.expect("entry"))
            .collect()
            .await;
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        after =
            Some(trove_proto::entries::EntryCursor::decode("after", &last.cursor).expect("cursor"));
        walked.extend(page);
    }
    assert_eq!(walked, everything);
    assert_eq!(walked.len(), 95);
}

/// Readers during a Replace of a 10,000-entry cassette see all old or all new content.
pub async fn cassette_replace_is_atomic_for_readers<S: Store + Clone>(t: &Target<S>) {
    let ns = fresh_ns();
    let c = name("swapped");
    let old: Vec<NewEntry> = (0..10_000).map(|i| json_entry("old", Some(i))).collect();
    t.store
        .replace_entries(
            &ns,
            &c,
            futures::stream::iter(old.into_iter().map(Ok)).boxed(),
        )
        .await
        .expect("seed");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (store, ns, c, done) = (t.store.clone(), ns.clone(), c.clone(), done.clone());
            tokio::spawn(async move {
                let mut reads = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) || reads == 0 {
                    let read = read_all(&store, &ns, &c).await;
                    let tags = tags(&read);
                    assert_eq!(tags.len(), 10_000, "a reader saw a partial cassette");
                    assert!(
                        tags.iter().all(|t| t == &tags[0]),
                        "a reader saw a mix of old and new"
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let new: Vec<NewEntry> = (0..10_000).map(|i| json_entry("new", Some(i))).collect();
    t.store
        .replace_entries(
            &ns,
            &c,
            futures::stream::iter(new.into_iter().map(Ok)).boxed(),
        )
        .await
        .expect("replace");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    for reader in readers {
        assert!(reader.await.expect("reader") > 0);
    }
    assert!(tags(&read_all(&t.store, &ns, &c).await)
        .iter()
        .all(|t| t == "new"));
}

/// A Replace whose body fails midway leaves the old content intact.
pub async fn cassette_aborted_replace_keeps_old_content<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let c = name("kept");
    t.store
        .append_entries(
            &ns,
            &c,
            vec![json_entry("old", Some(1)), json_entry("old", Some(2))],
            Default::default(),
        )
        .await
        .expect("append");
    let failing = futures::stream::iter((0..500).map(|i| Ok(json_entry("new", Some(i)))))
        .chain(futures::stream::once(async {
            Err(Error::Cancelled {
                message: "recorder crashed".into(),
            })
        }))
        .boxed();
    assert!(t.store.replace_entries(&ns, &c, failing).await.is_err());
    assert_eq!(tags(&read_all(&t.store, &ns, &c).await), ["old", "old"]);
    let missing = name("never-replaced");
    let failing = futures::stream::once(async {
        Err(Error::Cancelled {
            message: "gone".into(),
        })
    })
    .boxed();
    assert!(t
        .store
        .replace_entries(&ns, &missing, failing)
        .await
        .is_err());
    assert!(!t
        .store
        .cassette_exists(&ns, &missing)
        .await
        .expect("exists"));
}

/// Cassette names list in byte order by prefix, paged, with `/` and unicode kept apart.
pub async fn cassette_list_and_names<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let names = [
        "test/a.json",
        "test/a.json/b",
        "test/b",
        "test\u{1}x",
        "tests/c",
        "ü",
    ];
    for n in names {
        t.store
            .append_entries(&ns, &name(n), vec![json_entry(n, None)], Default::default())
            .await
            .expect("append");
    }
    for n in names {
        assert_eq!(tags(&read_all(&t.store, &ns, &name(n)).await), [n]);
    }
    let mut got = Vec::new();
    let mut token = String::new();
    loop {
        let page = t
            .store
            .list_cassettes(&ns, &ListPage::new("test/", 1, &token).expect("page"))
            .await
            .expect("list");
        got.extend(page.items);
        match page.next_page_token {
            Some(next) => token = next,
            None => break,
        }
    }
    assert_eq!(got, ["test/a.json", "test/a.json/b", "test/b"]);
    assert_eq!(
        t.store
            .list_cassettes(&fresh_ns(), &ListPage::first(""))
            .await
            .expect("list")
            .items
            .len(),
        0
    );
}

fn cache_scope(ns: &Namespace, branch: &str, default: &str, suite: &str) -> CacheScope {
    CacheScope {
        namespace: ns.clone(),
        prefix: "rspec-tracer".into(),
        branch: name(branch),
        default_branch: name(default),
        test_suite_id: suite.into(),
    }
}

async fn upload_at<S: Store>(
    store: &S,
    scope: &CacheScope,
    reference: &str,
    data: Vec<u8>,
    at: Option<i64>,
) -> trove_proto::cache::CachedRef {
    let options = UploadOptions {
        uploaded_at: at,
        ..Default::default()
    };
    store
        .upload(
            scope,
            &name(reference),
            options,
            bytes_stream(vec![data.into()]),
        )
        .await
        .expect("upload")
}

async fn download_bytes<S: Store>(
    store: &S,
    scope: &CacheScope,
    reference: &str,
) -> Option<(trove_proto::cache::CachedRef, Vec<u8>)> {
    let found = store
        .download(scope, reference, None)
        .await
        .expect("download")?;
    let data = collect_bytes(found.1).await.expect("read archive");
    Some((found.0, data))
}

async fn ref_names<S: Store>(store: &S, scope: &CacheScope) -> Vec<String> {
    let page = store.list_refs(scope, 0, "").await.expect("list refs");
    page.items.into_iter().map(|r| r.r#ref).collect()
}

const DAY_MICROS: i64 = 86_400 * 1_000_000;

/// The cache backend contract: misses and no-ops are values, never errors.
pub async fn cache_backend_contract<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let pr = cache_scope(&ns, "feature/x", "main", "");
    assert!(t
        .store
        .download(&pr, "", None)
        .await
        .expect("download empty ref")
        .is_none());
    assert!(t
        .store
        .download(&pr, "deadbeef", None)
        .await
        .expect("download missing")
        .is_none());
    for branch in ["", "  ", "never-written"] {
        assert!(read_branch_refs(&t.store, &ns, "p", branch)
            .await
            .expect("branch refs")
            .is_empty());
    }
    let refs: std::collections::BTreeMap<String, i64> = [("abc".to_string(), 1)].into();
    assert!(
        !write_branch_refs(&t.store, &ns, "p", "", "main", refs.clone())
            .await
            .expect("blank")
    );
    assert!(
        !write_branch_refs(&t.store, &ns, "p", "main", "main", refs.clone())
            .await
            .expect("default")
    );
    assert!(
        !write_branch_refs(&t.store, &ns, "p", "feature", "main", Default::default())
            .await
            .expect("empty")
    );
    assert!(read_branch_refs(&t.store, &ns, "p", "main")
        .await
        .expect("read")
        .is_empty());
    assert!(
        write_branch_refs(&t.store, &ns, "p", "feature", "main", refs.clone())
            .await
            .expect("write")
    );
    assert_eq!(
        read_branch_refs(&t.store, &ns, "p", "feature")
            .await
            .expect("read"),
        refs
    );
    upload_at(&t.store, &pr, "sha1", b"archive".to_vec(), None).await;
    for options in [
        PruneOptions::default(),
        PruneOptions {
            count: 0,
            duration_seconds: 0,
            pr_branch_ttl_seconds: 0,
        },
        PruneOptions {
            count: -1,
            duration_seconds: -5,
            pr_branch_ttl_seconds: -9,
        },
    ] {
        assert_eq!(t.store.prune(&pr, options).await.expect("prune"), 0);
    }
    assert_eq!(
        t.store
            .prune_all(&ns, "rspec-tracer", 0)
            .await
            .expect("prune all"),
        0
    );
    assert_eq!(
        t.store
            .prune_all(&ns, "rspec-tracer", -1)
            .await
            .expect("prune all"),
        0
    );
    assert_eq!(ref_names(&t.store, &pr).await, ["sha1"]);
    assert_invalid(
        t.store
            .upload(
                &pr,
                &name("x"),
                UploadOptions {
                    expected_size: Some(3),
                    ..Default::default()
                },
                one(b"four"),
            )
            .await,
        "size",
    );
}

/// Main round trip, PR round trip, and PR falling back to main; main never sees PR archives.
pub async fn cache_round_trips_and_fallback<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let main = cache_scope(&ns, "main", "main", "");
    let pr = cache_scope(&ns, "feature/login", "main", "");
    let archive: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let stored = upload_at(&t.store, &main, "c1", archive.clone(), None).await;
    assert_eq!(stored.tier, Tier::Main as i32);
    let (served, data) = download_bytes(&t.store, &main, "c1")
        .await
        .expect("hit on main");
    assert_eq!(data, archive, "byte-identical");
    assert_eq!(
        (served.tier, served.r#ref.as_str()),
        (Tier::Main as i32, "c1")
    );
    let (served, data) = download_bytes(&t.store, &pr, "c1")
        .await
        .expect("PR falls back to main");
    assert_eq!((served.tier, data), (Tier::Main as i32, archive.clone()));
    upload_at(&t.store, &pr, "c2", b"pr archive".to_vec(), None).await;
    let (served, data) = download_bytes(&t.store, &pr, "c2").await.expect("PR hit");
    assert_eq!(
        (served.tier, served.branch.as_str(), data.as_slice()),
        (Tier::Pr as i32, "feature/login", &b"pr archive"[..])
    );
    assert!(
        download_bytes(&t.store, &main, "c2").await.is_none(),
        "main must not read PR tiers"
    );
    upload_at(&t.store, &pr, "c1", b"pr override".to_vec(), None).await;
    let (served, data) = download_bytes(&t.store, &pr, "c1")
        .await
        .expect("own tier first");
    assert_eq!(
        (served.tier, data.as_slice()),
        (Tier::Pr as i32, &b"pr override"[..])
    );
}

/// Two suites under one sha keep their own archives, and pruning the ref removes both.
pub async fn cache_suites_are_kept_apart<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let unit = cache_scope(&ns, "main", "main", "unit");
    let system = cache_scope(&ns, "main", "main", "system");
    upload_at(
        &t.store,
        &unit,
        "sha",
        b"unit archive".to_vec(),
        Some(DAY_MICROS),
    )
    .await;
    upload_at(
        &t.store,
        &system,
        "sha",
        b"system archive".to_vec(),
        Some(DAY_MICROS),
    )
    .await;
    assert_eq!(
        download_bytes(&t.store, &unit, "sha")
            .await
            .expect("unit")
            .1,
        b"unit archive"
    );
    assert_eq!(
        download_bytes(&t.store, &system, "sha")
            .await
            .expect("system")
            .1,
        b"system archive"
    );
    let listed = t.store.list_refs(&unit, 0, "").await.expect("list");
    assert_eq!(listed.items.len(), 2, "one ref, two suites: {listed:?}");
    upload_at(
        &t.store,
        &unit,
        "newer",
        b"n".to_vec(),
        Some(2 * DAY_MICROS),
    )
    .await;
    let removed = t
        .store
        .prune(
            &unit,
            PruneOptions {
                count: 1,
                ..Default::default()
            },
        )
        .await
        .expect("prune");
    assert_eq!(removed, 1, "a ref counts once, whatever its suites");
    assert!(download_bytes(&t.store, &unit, "sha").await.is_none());
    assert!(download_bytes(&t.store, &system, "sha").await.is_none());
}

/// A tree sha recorded at upload resolves to its commit's archive.
pub async fn cache_tree_pointer_resolves<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let main = cache_scope(&ns, "main", "main", "");
    let options = UploadOptions {
        tree_sha: Some(name("tree-abc")),
        ..Default::default()
    };
    t.store
        .upload(&main, &name("commit-1"), options, one(b"tree archive"))
        .await
        .expect("upload");
    let found = t
        .store
        .download(&main, "commit-2", Some(&name("tree-abc")))
        .await
        .expect("download")
        .expect("hit via tree");
    assert_eq!(found.0.r#ref, "commit-1");
    assert_eq!(collect_bytes(found.1).await.expect("read"), b"tree archive");
    let pr = cache_scope(&ns, "topic", "main", "");
    let via_main = t
        .store
        .download(&pr, "", Some(&name("tree-abc")))
        .await
        .expect("download")
        .expect("PR resolves main's tree");
    assert_eq!(via_main.0.tier, Tier::Main as i32);
    assert!(t
        .store
        .download(&main, "commit-2", Some(&name("tree-unknown")))
        .await
        .expect("download")
        .is_none());
}

/// Branch names like `feature/x`, `a/b/c` and a PR branch literally named `main` never collide.
pub async fn cache_branch_names_are_opaque<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let main_tier = cache_scope(&ns, "trunk", "trunk", "");
    upload_at(&t.store, &main_tier, "r", b"trunk".to_vec(), None).await;
    for branch in ["main", "feature/x", "a/b/c", "a/b", "a", "feature"] {
        let scope = cache_scope(&ns, branch, "trunk", "");
        upload_at(&t.store, &scope, "r", branch.as_bytes().to_vec(), None).await;
    }
    for branch in ["main", "feature/x", "a/b/c", "a/b", "a", "feature"] {
        let scope = cache_scope(&ns, branch, "trunk", "");
        let (served, data) = download_bytes(&t.store, &scope, "r").await.expect("hit");
        assert_eq!(
            (served.branch.as_str(), data.as_slice()),
            (branch, branch.as_bytes())
        );
        assert_eq!(ref_names(&t.store, &scope).await, ["r"]);
    }
    assert_eq!(
        download_bytes(&t.store, &main_tier, "r")
            .await
            .expect("main")
            .1,
        b"trunk"
    );
}

/// Five uploads pruned with count 2: three removed, the newest two kept.
pub async fn cache_prune_by_count<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let pr = cache_scope(&ns, "feature/count", "main", "");
    let now = trove_proto::types::now_micros();
    for i in 0..5i64 {
        // Two uploads share a microsecond: the arrival sequence breaks the tie.
        let at = now - DAY_MICROS + (i / 2);
        upload_at(
            &t.store,
            &pr,
            &format!("r{i}"),
            vec![u8::try_from(i).unwrap_or(0)],
            Some(at),
        )
        .await;
    }
    let removed = t
        .store
        .prune(
            &pr,
            PruneOptions {
                count: 2,
                ..Default::default()
            },
        )
        .await
        .expect("prune");
    assert_eq!(removed, 3);
    assert_eq!(ref_names(&t.store, &pr).await, ["r4", "r3"]);
    assert_eq!(
        t.store
            .prune(
                &pr,
                PruneOptions {
                    count: 2,
                    ..Default::default()
                }
            )
            .await
            .expect("again"),
        0
    );
}

/// An archive uploaded 30 days ago goes with a 7-day duration; a fresh one stays.
pub async fn cache_prune_by_age<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let main = cache_scope(&ns, "main", "main", "");
    let now = trove_proto::types::now_micros();
    upload_at(
        &t.store,
        &main,
        "old",
        b"old".to_vec(),
        Some(now - 30 * DAY_MICROS),
    )
    .await;
    upload_at(&t.store, &main, "fresh", b"fresh".to_vec(), None).await;
    let removed = t
        .store
        .prune(
            &main,
            PruneOptions {
                duration_seconds: 7 * 86_400,
                ..Default::default()
            },
        )
        .await
        .expect("prune");
    assert_eq!(removed, 1);
    assert_eq!(ref_names(&t.store, &main).await, ["fresh"]);
}

/// A PR branch whose newest ref is older than the TTL disappears with its branch refs; a live branch stays.
pub async fn cache_prune_dead_branch<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let now = trove_proto::types::now_micros();
    let dead = cache_scope(&ns, "feature/dead", "main", "");
    let live = cache_scope(&ns, "feature/live", "main", "");
    upload_at(
        &t.store,
        &dead,
        "d1",
        b"d".to_vec(),
        Some(now - 20 * DAY_MICROS),
    )
    .await;
    upload_at(
        &t.store,
        &dead,
        "d2",
        b"d".to_vec(),
        Some(now - 10 * DAY_MICROS),
    )
    .await;
    upload_at(
        &t.store,
        &live,
        "l1",
        b"l".to_vec(),
        Some(now - 20 * DAY_MICROS),
    )
    .await;
    upload_at(&t.store, &live, "l2", b"l".to_vec(), None).await;
    let refs: std::collections::BTreeMap<String, i64> = [("d2".to_string(), 5)].into();
    for branch in ["feature/dead", "feature/live"] {
        write_branch_refs(&t.store, &ns, "rspec-tracer", branch, "main", refs.clone())
            .await
            .expect("write refs");
    }
    let ttl = PruneOptions {
        pr_branch_ttl_seconds: 7 * 86_400,
        ..Default::default()
    };
    assert_eq!(t.store.prune(&dead, ttl).await.expect("prune dead"), 2);
    assert!(ref_names(&t.store, &dead).await.is_empty());
    assert!(
        read_branch_refs(&t.store, &ns, "rspec-tracer", "feature/dead")
            .await
            .expect("refs")
            .is_empty()
    );
    assert_eq!(t.store.prune(&live, ttl).await.expect("prune live"), 0);
    assert_eq!(ref_names(&t.store, &live).await, ["l2", "l1"]);
    assert_eq!(
        read_branch_refs(&t.store, &ns, "rspec-tracer", "feature/live")
            .await
            .expect("refs"),
        refs
    );
}

/// PruneAll removes every dead PR branch (names with `/`, and one literally named `main`), returns the total, and never touches main.
pub async fn cache_prune_all_branches<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let now = trove_proto::types::now_micros();
    let old = Some(now - 40 * DAY_MICROS);
    let main = cache_scope(&ns, "trunk", "trunk", "");
    upload_at(&t.store, &main, "ancient", b"m".to_vec(), old).await;
    let dead = ["a", "a/b", "a/b/c", "feature/x", "main-ish", "main"];
    for (i, branch) in dead.iter().enumerate() {
        let scope = cache_scope(&ns, branch, "trunk", "");
        for r in 0..=i {
            upload_at(&t.store, &scope, &format!("r{r}"), b"x".to_vec(), old).await;
        }
    }
    let live = cache_scope(&ns, "a/live", "trunk", "");
    upload_at(&t.store, &live, "stale", b"x".to_vec(), old).await;
    upload_at(&t.store, &live, "fresh", b"x".to_vec(), None).await;
    let removed = t
        .store
        .prune_all(&ns, "rspec-tracer", 30 * 86_400)
        .await
        .expect("prune all");
    assert_eq!(removed, 21, "1 + 2 + ... + 6 refs across the dead branches");
    for branch in dead {
        let scope = cache_scope(&ns, branch, "trunk", "");
        assert!(
            ref_names(&t.store, &scope).await.is_empty(),
            "{branch} should be gone"
        );
    }
    assert_eq!(ref_names(&t.store, &live).await, ["fresh", "stale"]);
    assert_eq!(
        ref_names(&t.store, &main).await,
        ["ancient"],
        "main tier untouched"
    );
    assert_eq!(
        t.store
            .prune_all(&fresh_ns(), "rspec-tracer", 1)
            .await
            .expect("empty"),
        0
    );
}

/// 20 concurrent uploads of one ref leave exactly one complete archive.
pub async fn cache_concurrent_uploads_leave_one_archive<S: Store + Clone>(t: &Target<S>) {
    let ns = fresh_ns();
    let scope = cache_scope(&ns, "main", "main", "");
    let uploads: Vec<_> = (0..20u64)
        .map(|i| {
            let (store, scope) = (t.store.clone(), scope.clone());
            tokio::spawn(async move {
                let size = 100_000 + i * 10_000;
                let options = UploadOptions::default();
                store
                    .upload(
                        &scope,
                        &name("same"),
                        options,
                        generated_stream(i, size, 32_768),
                    )
                    .await
                    .expect("upload");
                (crate::generated_sha256(i, size, 32_768).await, size)
            })
        })
        .collect();
    let mut candidates = Vec::new();
    for upload in uploads {
        candidates.push(upload.await.expect("join"));
    }
    let (served, stream) = t
        .store
        .download(&scope, "same", None)
        .await
        .expect("download")
        .expect("hit");
    let (len, sha) = digest_stream(stream).await.expect("read");
    assert!(
        candidates.contains(&(sha.clone(), len)),
        "the archive must be one complete upload"
    );
    assert_eq!(served.sha256, sha);
    assert_eq!(
        t.store
            .list_refs(&scope, 0, "")
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    t.assert_disk_settles(1).await;
}

/// Uploads and downloads keep completing while a prune of 10,000 refs runs.
pub async fn cache_prune_does_not_block_traffic<S: Store + Clone>(t: &Target<S>) {
    let ns = fresh_ns();
    let scope = cache_scope(&ns, "main", "main", "");
    let base = trove_proto::types::now_micros() - DAY_MICROS;
    let seeders: Vec<_> = (0..8i64)
        .map(|w| {
            let (store, scope) = (t.store.clone(), scope.clone());
            tokio::spawn(async move {
                for i in (w..10_000).step_by(8) {
                    upload_at(
                        &store,
                        &scope,
                        &format!("seed-{i:05}"),
                        vec![1],
                        Some(base + i),
                    )
                    .await;
                }
            })
        })
        .collect();
    for seeder in seeders {
        seeder.await.expect("seed");
    }
    let other = cache_scope(&ns, "feature/busy", "main", "");
    let prune = {
        let (store, scope) = (t.store.clone(), scope.clone());
        tokio::spawn(async move {
            store
                .prune(
                    &scope,
                    PruneOptions {
                        count: 1,
                        ..Default::default()
                    },
                )
                .await
        })
    };
    // Only a round that both started and completed while the prune was
    // running counts: the rounds start once the prune is visibly under way
    // (the oldest ref is gone), and a round that waited for the prune to
    // finish (a global lock) completes after it and is not counted.
    while !prune.is_finished()
        && download_bytes(&t.store, &scope, "seed-00000")
            .await
            .is_some()
    {
        tokio::task::yield_now().await;
    }
    let mut during = 0u32;
    let mut i = 0u32;
    while !prune.is_finished() {
        upload_at(&t.store, &other, &format!("busy-{i}"), b"b".to_vec(), None).await;
        assert!(download_bytes(&t.store, &other, &format!("busy-{i}"))
            .await
            .is_some());
        assert!(download_bytes(&t.store, &scope, "seed-09999")
            .await
            .is_some());
        if !prune.is_finished() {
            during += 1;
        }
        i += 1;
    }
    let removed = prune.await.expect("join").expect("prune");
    assert_eq!(removed, 9_999);
    assert!(
        during > 0,
        "no upload and download completed while the prune ran ({i} rounds in all)"
    );
    assert_eq!(ref_names(&t.store, &scope).await, ["seed-09999"]);
}

/// Reads a branch ref map through the trait, validating the key as the
/// server's adapter does.
async fn read_branch_refs<S: Store>(
    store: &S,
    ns: &Namespace,
    prefix: &str,
    branch: &str,
) -> Result<std::collections::BTreeMap<String, i64>, Error> {
    store
        .branch_refs(&BranchRefsKey::new(ns.clone(), prefix, branch)?)
        .await
}

/// Writes a branch ref map through the trait, validating the write as the
/// server's adapter does.
async fn write_branch_refs<S: Store>(
    store: &S,
    ns: &Namespace,
    prefix: &str,
    branch: &str,
    default_branch: &str,
    refs: std::collections::BTreeMap<String, i64>,
) -> Result<bool, Error> {
    store
        .write_branch_refs(&BranchRefsWrite::new(
            ns.clone(),
            prefix,
            branch,
            default_branch,
            refs,
        )?)
        .await
}

/// Names of exactly 1,024 bytes (the limit) in the four shapes that stress
/// a key encoding: ASCII, 2-byte and 4-byte UTF-8, and punctuation.
fn names_at_the_limit() -> Vec<String> {
    let ascii: String = (0..1024).map(|i| char::from(b"abcXYZ019"[i % 9])).collect();
    let two_byte = "é".repeat(512);
    let four_byte = "🦀".repeat(256);
    let punctuation: String = (0..1024)
        .map(|i| char::from(b"!-/.~:%+ _=@"[i % 12]))
        .collect();
    let names = vec![ascii, two_byte, four_byte, punctuation];
    for n in &names {
        assert_eq!(n.len(), trove_proto::types::MAX_NAME_BYTES);
    }
    names
}

/// Names sharing a long prefix that differ only near their end, mixed with
/// shorter names that share part of it: the orders a key encoding gets
/// wrong when it cuts or hashes long names.
fn names_sharing_a_long_prefix() -> Vec<String> {
    let stem: String = (0..900).map(|i| char::from(b"-/.a~"[i % 5])).collect();
    let mut names: Vec<String> = ["", "a", "-", "~", "0", "é", "🦀", "zz", "/x", "a-a"]
        .iter()
        .map(|tail| format!("{stem}{tail}"))
        .collect();
    names.push(stem[..400].to_owned());
    names.push(format!("{}b", &stem[..899]));
    names.push(format!("{}-", &stem[..600]));
    names.push(format!("{}\u{1}", &stem[..899]));
    names.retain(|n| n.len() <= trove_proto::types::MAX_NAME_BYTES);
    names
}

/// Walks a listing page by page (`page_size` 2) and returns every name.
async fn walk_artifacts<S: Store>(store: &S, ns: &Namespace, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = ListPage::new(prefix, 2, &token).expect("page");
        let listed = store.list_artifacts(ns, &page, false).await.expect("list");
        out.extend(
            listed
                .items
                .into_iter()
                .filter_map(|item| item.info.map(|info| info.key)),
        );
        match listed.next_page_token {
            Some(next) => token = next,
            None => return out,
        }
    }
}

/// Every operation group stores, finds, lists and deletes names at the
/// 1,024-byte limit, in every shape, namespaces included.
pub async fn names_at_the_length_limit<S: Store>(t: &Target<S>) {
    let store = &t.store;
    for long in names_at_the_limit() {
        let key = name(&long);
        for ns in [
            fresh_ns(),
            Namespace::new(&long).expect("a 1 KiB namespace"),
        ] {
            // Artifacts.
            store
                .put_artifact(&ns, &key, PutOptions::default(), one(b"artifact"))
                .await
                .expect("put artifact");
            assert_eq!(read_artifact(store, &ns, &key).await, b"artifact");
            assert_eq!(
                store.stat_artifact(&ns, &key).await.expect("stat").key,
                long
            );
            assert_eq!(
                walk_artifacts(store, &ns, "").await,
                std::slice::from_ref(&long)
            );
            assert_eq!(
                walk_artifacts(store, &ns, &long).await,
                std::slice::from_ref(&long)
            );
            // Objects and streams under the same opaque id.
            store
                .put_object(&ns, &key, None, one(b"object"))
                .await
                .expect("put object");
            assert_eq!(read_object(store, &ns, &key).await, b"object");
            let chunks = futures::stream::iter([Ok(StreamChunk {
                data: Bytes::from_static(b"chunk"),
                timestamp: Some(1),
            })])
            .boxed();
            store
                .put_stream(&ns, &key, chunks)
                .await
                .expect("put stream");
            let page = ListPage::new(&long, 10, "").expect("page");
            let listed = store.list_objects(&ns, &page).await.expect("list objects");
            assert_eq!(listed.items.len(), 1, "{:?}", listed.items);
            assert!(listed.items[0].has_object && listed.items[0].has_stream);
            assert_eq!(listed.items[0].hash, long);
            assert!(store
                .find_missing(&ns, std::slice::from_ref(&key))
                .await
                .expect("find")
                .is_empty());
            // Cassettes.
            let entry =
                NewEntry::parse("e", Bytes::from_static(b"{\"n\":1}"), Some(5)).expect("entry");
            store
                .append_entries(&ns, &key, vec![entry], Default::default())
                .await
                .expect("append");
            assert_eq!(read_all(store, &ns, &key).await.len(), 1);
            assert!(store.cassette_exists(&ns, &key).await.expect("exists"));
            let page = ListPage::new("", 10, "").expect("page");
            assert_eq!(
                store.list_cassettes(&ns, &page).await.expect("list").items,
                std::slice::from_ref(&long)
            );
            // The cache: prefix, branch, ref and tree sha all at the limit.
            let scope = CacheScope {
                namespace: ns.clone(),
                prefix: long.clone(),
                branch: key.clone(),
                default_branch: name("main"),
                test_suite_id: long.clone(),
            };
            let options = UploadOptions {
                tree_sha: Some(key.clone()),
                ..Default::default()
            };
            store
                .upload(&scope, &key, options, one(b"archive"))
                .await
                .expect("upload");
            let (served, body) = store
                .download(&scope, &long, None)
                .await
                .expect("download")
                .expect("hit");
            assert_eq!(collect_bytes(body).await.expect("read"), b"archive");
            assert_eq!(served.branch, long);
            let by_tree = store
                .download(&scope, "unknown", Some(&key))
                .await
                .expect("download by tree");
            assert!(by_tree.is_some(), "the tree pointer resolves");
            assert_eq!(ref_names(store, &scope).await, std::slice::from_ref(&long));
            let refs = std::collections::BTreeMap::from([(long.clone(), 7i64)]);
            let write = BranchRefsWrite::new(ns.clone(), &long, &long, "main", refs.clone())
                .expect("write");
            assert!(store.write_branch_refs(&write).await.expect("write refs"));
            let key_refs = BranchRefsKey::new(ns.clone(), &long, &long).expect("key");
            assert_eq!(store.branch_refs(&key_refs).await.expect("refs"), refs);
            // Everything goes again.
            assert!(store.delete_artifact(&ns, &key).await.expect("delete"));
            assert!(store.delete_object(&ns, &key).await.expect("delete object"));
            assert!(store
                .delete_cassette(&ns, &key)
                .await
                .expect("delete cassette"));
            assert_not_found(store.stat_artifact(&ns, &key).await);
            assert!(walk_artifacts(store, &ns, "").await.is_empty());
            let page = ListPage::new("", 10, "").expect("page");
            assert!(store
                .list_objects(&ns, &page)
                .await
                .expect("list")
                .items
                .is_empty());
            assert!(store
                .list_cassettes(&ns, &page)
                .await
                .expect("list")
                .items
                .is_empty());
        }
    }
}

/// Long names that share a prefix list in byte order, page by page and
/// under every prefix, wherever the engine had to cut their keys.
pub async fn long_names_list_in_byte_order<S: Store>(t: &Target<S>) {
    let ns = fresh_ns();
    let mut names = names_sharing_a_long_prefix();
    for n in &names {
        t.store
            .put_artifact(&ns, &name(n), PutOptions::default(), one(b"v"))
            .await
            .expect("put");
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(walk_artifacts(&t.store, &ns, "").await, names);
    for cut in [300, 600, 899, 900, 901] {
        let Some(prefix) = names
            .iter()
            .find(|n| n.len() > cut)
            .map(|n| n[..cut].to_owned())
        else {
            continue;
        };
        let expected: Vec<String> = names
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .cloned()
            .collect();
        assert_eq!(
            walk_artifacts(&t.store, &ns, &prefix).await,
            expected,
            "prefix of {cut}"
        );
    }
}
