//! Unit tests of the bucket engine's shared machinery: conditional writes
//! whose outcome was lost, the start-up probe, reclaim.

use super::*;
use async_trait::async_trait;
use object_store::memory::InMemory;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, PutMultipartOptions,
    PutOptions, PutResult,
};
use trove_proto::types::{Name, Namespace};
use trove_proto::ArtifactStore;

/// An object store that takes every write as an overwrite, as some
/// S3-compatible servers silently do with conditional headers.
#[derive(Debug, Default)]
struct IgnoresConditions(InMemory);

impl std::fmt::Display for IgnoresConditions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IgnoresConditions")
    }
}

#[async_trait]
impl Bucket for IgnoresConditions {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        _opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.0
            .put_opts(location, payload, PutOptions::default())
            .await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.0.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.0.copy_opts(from, to, options).await
    }
}

/// An object store whose next conditional write of a record lands but
/// reports a precondition failure, as a request retried after a lost
/// reply does.
#[derive(Debug, Default)]
struct LandsThenFails {
    inner: InMemory,
    armed: std::sync::atomic::AtomicBool,
    /// How many writes landed and were reported lost.
    fired: std::sync::atomic::AtomicU32,
}

impl std::fmt::Display for LandsThenFails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LandsThenFails")
    }
}

#[async_trait]
impl Bucket for LandsThenFails {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let conditional = !matches!(opts.mode, PutMode::Overwrite);
        let result = self.inner.put_opts(location, payload, opts).await?;
        let is_record = location.as_ref().starts_with("r/n/");
        if conditional && is_record && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.fired.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(object_store::Error::Precondition {
                path: location.to_string(),
                source: "the retried request found the first one's write".into(),
            });
        }
        Ok(result)
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A write that landed although it was reported lost is recognised: a
/// large value keeps its blob, an append is not applied twice.
#[tokio::test]
async fn writes_that_landed_unseen_are_not_lost_or_doubled() {
    use trove_proto::entries::{NewEntry, ReadOptions};
    use trove_proto::EntryStore;
    let bucket = Arc::new(LandsThenFails::default());
    let store = BucketStore::open(bucket.clone(), "r", BucketOptions::default())
        .await
        .expect("open");
    let ns = Namespace::default();
    let key = Name::new("key", "big").expect("name");
    let big = Bytes::from(vec![3u8; 300_000]);
    bucket
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    store
        .put_artifact(
            &ns,
            &key,
            Default::default(),
            futures::stream::iter([Ok(big.clone())]).boxed(),
        )
        .await
        .expect("put");
    let fired = |n| {
        assert_eq!(
            bucket.fired.load(std::sync::atomic::Ordering::SeqCst),
            n,
            "the injected lost reply must have happened"
        );
    };
    fired(1);
    let (_, stream) = store.get_artifact(&ns, &key).await.expect("get");
    let data: Vec<Bytes> = stream.try_collect().await.expect("read");
    assert_eq!(data.concat(), big.to_vec());
    // The published blob's marker is removed in the background: poll for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let counts = store.count_pending_and_blobs().await.expect("count");
        if counts == (0, 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "markers and blobs never settled at (0, 1): {counts:?}"
        );
        tokio::task::yield_now().await;
    }

    let cassette = Name::new("cassette", "c").expect("name");
    let entry = NewEntry::parse("e", Bytes::from_static(br#"{"n":1}"#), None).expect("entry");
    bucket
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    store
        .append_entries(&ns, &cassette, vec![entry], Default::default())
        .await
        .expect("append");
    fired(2);
    let read: Vec<_> = store
        .read_entries(&ns, &cassette, ReadOptions::default())
        .await
        .expect("read")
        .try_collect()
        .await
        .expect("entries");
    assert_eq!(read.len(), 1, "the append landed once");
}

/// A store that ignores conditional writes is refused at start, with a
/// message naming what is missing.
#[tokio::test]
async fn refuses_a_store_without_conditional_writes() {
    let store = Arc::new(IgnoresConditions::default());
    let err = BucketStore::open(store, "root", BucketOptions::default())
        .await
        .expect_err("must refuse");
    assert!(matches!(err, Error::FailedPrecondition { .. }), "{err:?}");
    assert!(err.to_string().contains("create-if-absent"), "{err}");
    let ok = BucketStore::open(Arc::new(InMemory::new()), "root", BucketOptions::default()).await;
    assert!(ok.is_ok(), "{ok:?}");
}

/// What an interrupted write left (a marker and a blob no record owns) is
/// reclaimed once older than the grace period; owned blobs stay.
#[tokio::test]
async fn reclaim_deletes_only_abandoned_blobs() {
    let options = BucketOptions {
        reclaim_grace: Duration::ZERO,
        ..Default::default()
    };
    let store = BucketStore::open(Arc::new(InMemory::new()), "r", options)
        .await
        .expect("open");
    let ns = Namespace::default();
    let key = Name::new("key", "big").expect("name");
    let big = Bytes::from(vec![7u8; 200_000]);
    store
        .put_artifact(
            &ns,
            &key,
            Default::default(),
            futures::stream::iter([Ok(big.clone())]).boxed(),
        )
        .await
        .expect("put");
    // An upload that died after its blob was written, before publishing.
    let owner = store.path("n/x/a/abandoned!r");
    let mut pending = store.start_blob(&owner).await.expect("start");
    let id = pending.id;
    if let Some(upload) = pending.upload.take() {
        let mut upload = upload;
        upload.put(big.clone());
        upload.finish().await.expect("finish");
    }
    pending.owned = true; // as if the process died: nothing cleans up
    std::mem::forget(pending);
    let (markers_before, blobs_before) = store.count_pending_and_blobs().await.expect("count");
    assert_eq!((markers_before, blobs_before), (1, 2));
    let found = store.reclaim().await.expect("reclaim");
    assert_eq!(
        found,
        Reclaimed {
            markers: 1,
            blobs: 1
        }
    );
    assert_eq!(
        store.count_pending_and_blobs().await.expect("count"),
        (0, 1)
    );
    assert!(store
        .read(&store.blob_path(id))
        .await
        .expect("read")
        .is_none());
    let (_, stream) = store.get_artifact(&ns, &key).await.expect("still there");
    let data: Vec<Bytes> = stream.try_collect().await.expect("read");
    assert_eq!(data.concat(), big.to_vec());
}

/// A record whose blob is gone answers DATA_LOSS naming the value, not a
/// retryable UNAVAILABLE that no retry can fix.
#[tokio::test]
async fn a_record_without_its_blob_is_data_loss() {
    let bucket = Arc::new(InMemory::new());
    let store = BucketStore::open(bucket.clone(), "r", BucketOptions::default())
        .await
        .expect("open");
    let ns = Namespace::default();
    let key = Name::new("key", "lost").expect("name");
    store
        .put_artifact(
            &ns,
            &key,
            Default::default(),
            futures::stream::iter([Ok(Bytes::from(vec![1u8; 200_000]))]).boxed(),
        )
        .await
        .expect("put");
    let blobs: Vec<ObjectMeta> = bucket
        .list(Some(&store.path("blobs")))
        .try_collect()
        .await
        .expect("list");
    assert_eq!(blobs.len(), 1);
    bucket
        .delete(&blobs[0].location)
        .await
        .expect("delete blob");
    let err = store.get_artifact(&ns, &key).await.err().expect("lost");
    assert!(matches!(err, Error::DataLoss { .. }), "{err:?}");
    assert!(err.to_string().contains("lost"), "{err}");
}

/// A failing store's own words (URL, bucket, raw answer) never reach the
/// caller; the caller gets an incident id to quote.
#[test]
fn store_failures_do_not_leak_internals() {
    let err = object_store::Error::Generic {
        store: "S3",
        source: "PUT http://10.0.0.7:8333/secret-bucket/prefix/n/x: <Error><Code>KeyTooLongError</Code></Error>".into(),
    };
    let mapped = bucket_error("publish a record", &err).to_string();
    for secret in [
        "10.0.0.7",
        "secret-bucket",
        "prefix/n/x",
        "KeyTooLong",
        "<Error>",
    ] {
        assert!(!mapped.contains(secret), "{mapped}");
    }
    assert!(mapped.contains("incident"), "{mapped}");
}

/// The remembered records are bounded by bytes: many large heads never
/// hold more than the budget, and a very large one is not kept at all.
#[tokio::test]
async fn remembered_records_are_bounded_by_bytes() {
    let store = BucketStore::open(Arc::new(InMemory::new()), "r", BucketOptions::default())
        .await
        .expect("open");
    let version = UpdateVersion {
        e_tag: Some("x".into()),
        version: None,
    };
    for i in 0..100 {
        let path = store.path(&format!("n/x/c/{i}!h"));
        store.remember(&path, Bytes::from(vec![0u8; 1 << 20]), version.clone());
        let held = store.inner.known.lock().expect("lock").bytes;
        assert!(held <= KNOWN_BYTES, "{held} bytes remembered");
    }
    let huge = store.path("n/x/c/huge!h");
    store.remember(&huge, Bytes::from(vec![0u8; KNOWN_BYTES / 8]), version);
    assert!(store.recall(&huge).is_none());
}
