//! What the conformance suite runs against: a store implementing the traits,
//! plus the data folder behind it (to check that nothing leaks on disk).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use trove_server::store::{SledStore, StoreOptions};

use crate::harness::ServerProcess;

/// A store under test and the folder holding its data.
pub struct Target<S> {
    /// The implementation under test.
    pub store: S,
    /// Its data folder.
    pub data_dir: PathBuf,
    /// The server process, for remote targets.
    pub server: Option<ServerProcess>,
    _temp: Option<tempfile::TempDir>,
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
        _temp: Some(temp),
    }
}

/// The real server binary, through the client.
pub async fn remote_target() -> Target<trove_client::TroveClient> {
    let server = ServerProcess::start().await;
    let store = server.client().await;
    Target {
        store,
        data_dir: server.data_dir.clone(),
        server: Some(server),
        _temp: None,
    }
}

impl<S> Target<S> {
    /// Number of files in `data/staging` (uploads in progress or leaked).
    pub fn staged_files(&self) -> usize {
        count_files(&self.data_dir.join("staging"))
    }

    /// Number of published blob files.
    pub fn blob_files(&self) -> usize {
        let Ok(shards) = std::fs::read_dir(self.data_dir.join("blobs")) else {
            return 0;
        };
        shards.flatten().map(|s| count_files(&s.path())).sum()
    }

    /// Waits (bounded) until no staged file is left and the blob count is
    /// `blobs`; cleanup after a cancelled upload runs asynchronously on a
    /// server, so this polls. Panics with the observed counts on timeout.
    pub async fn assert_disk_settles(&self, blobs: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (staged, found) = (self.staged_files(), self.blob_files());
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

    /// Checks the server (if any) logged no panic.
    pub fn assert_no_panic(&self) {
        if let Some(server) = &self.server {
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
