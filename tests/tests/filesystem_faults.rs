//! Faults below the server, on the real binary: a small C library loaded with
//! `LD_PRELOAD` (`tests/faults/trove_faults.c`) makes the C library's
//! `write`, `fsync`/`fdatasync`, `rename` or `link` fail for files whose path matches,
//! armed and disarmed while the server runs. Each fault gives its documented
//! status, leaves nothing visible and nothing staged, and once it is gone the
//! same write succeeds: the server recovers without a restart. The exception
//! is a failed `fsync` of the database itself, after which no write is
//! acknowledged until a restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic_health::pb::health_check_response::ServingStatus;
use trove_proto::artifacts::PutOptions;
use trove_proto::types::{Name, Namespace};
use trove_proto::{ArtifactStore, Error};
use trove_tests::harness::{health_status, ServerProcess};
use trove_tests::{bytes_stream, collect_bytes};

/// Compiles the fault library into `dir`; `None` (a recorded skip) without
/// a C compiler.
fn fault_library(dir: &Path) -> Option<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("faults/trove_faults.c");
    let library = dir.join("trove_faults.so");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .status();
    match built {
        Ok(status) if status.success() => Some(library),
        other => {
            trove_tests::skip(&format!(
                "cannot build the fault library with cc: {other:?}"
            ));
            None
        }
    }
}

/// The server with the fault library preloaded, armed by writing `control`
/// (empty: no fault).
async fn start_with_faults(library: &Path, control: &Path) -> ServerProcess {
    std::fs::write(control, "").expect("control file");
    let envs = [("LD_PRELOAD", library), ("TROVE_FAULT_CONTROL", control)]
        .map(|(name, path)| (name.to_owned(), path.to_string_lossy().into_owned()));
    ServerProcess::start_with_env(&[], &envs).await
}

fn staged_files(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("staging"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One fault: what it is, the control line that arms it, the status it must give.
type Case = (&'static str, &'static str, fn(&Error) -> bool);

/// Every fault on the write path of a large value: its status, nothing
/// visible or staged afterwards, and success once the fault is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_faults_fail_cleanly_and_recover() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(library) = fault_library(dir.path()) else {
        return;
    };
    let control = dir.path().join("faults");
    let server = start_with_faults(&library, &control).await;
    let client = server.client().await;
    let ns = Namespace::new("faults").expect("ns");
    // Larger than the inline limit: staged in a file, fsynced, linked into blobs/.
    let value = Bytes::from(vec![9u8; 300_000]);
    let put = |key: String| {
        let (client, ns, value) = (client.clone(), ns.clone(), value.clone());
        async move {
            client
                .put_artifact(
                    &ns,
                    &Name::new("key", key).expect("name"),
                    PutOptions::default(),
                    bytes_stream(vec![value]),
                )
                .await
        }
    };
    let cases: [Case; 5] = [
        ("a failing write while staging", "write 5 /staging/", |e| {
            matches!(e, Error::Unavailable { .. })
        }),
        ("a full disk while staging", "write 28 /staging/", |e| {
            matches!(e, Error::ResourceExhausted { .. })
        }),
        (
            "a failing fsync of the staged file",
            "fsync 5 /staging/",
            |e| matches!(e, Error::Unavailable { .. }),
        ),
        ("a failing link into blobs/", "link 5 /blobs/", |e| {
            matches!(e, Error::Unavailable { .. })
        }),
        (
            "a failing fsync of the blobs/ folder",
            "fsync 5 /blobs/",
            |e| matches!(e, Error::Unavailable { .. }),
        ),
    ];
    for (i, (what, fault, expected)) in cases.into_iter().enumerate() {
        let key = format!("value-{i}");
        std::fs::write(&control, fault).expect("arm");
        let failed = put(key.clone()).await;
        std::fs::write(&control, "").expect("disarm");
        match &failed {
            Err(err) if expected(err) => {}
            other => panic!("{what}: unexpected outcome {other:?}"),
        }
        // Nothing visible, nothing left staged.
        let read = client
            .get_artifact(&ns, &Name::new("key", key.clone()).expect("name"))
            .await;
        assert!(
            matches!(read, Err(Error::NotFound { .. })),
            "{what}: the failed write is visible: {:?}",
            read.map(|(info, _)| info)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while staged_files(&server.data_dir) > 0 {
            assert!(
                Instant::now() < deadline,
                "{what}: staged files left behind"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The fault gone, the same write succeeds and reads back whole.
        put(key.clone())
            .await
            .unwrap_or_else(|e| panic!("{what}: no recovery: {e}"));
        let (_, body) = client
            .get_artifact(&ns, &Name::new("key", key).expect("name"))
            .await
            .expect("get");
        assert_eq!(
            collect_bytes(body).await.expect("read").len(),
            value.len(),
            "{what}"
        );
        println!("{what}: {:?}", failed.err());
    }
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// A failed `fdatasync` of the database is never retried as if it could
/// succeed (the kernel may have dropped the pages it could not write): the
/// write that waited on it answers UNAVAILABLE, and so does every later
/// write, fault gone or not, until the server restarts; health reports
/// NOT_SERVING meanwhile. What was acknowledged before is intact after the
/// restart, and writes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_database_fsync_stops_writes_until_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(library) = fault_library(dir.path()) else {
        return;
    };
    let control = dir.path().join("faults");
    let mut server = start_with_faults(&library, &control).await;
    let ns = Namespace::new("fsyncgate").expect("ns");
    let put = |client: trove_client::TroveClient, key: &'static str| {
        let ns = ns.clone();
        async move {
            client
                .put_artifact(
                    &ns,
                    &Name::new("key", key).expect("name"),
                    PutOptions::default(),
                    bytes_stream(vec![Bytes::from(key)]),
                )
                .await
        }
    };
    let client = server.client().await;
    put(client.clone(), "before").await.expect("acknowledged");
    std::fs::write(&control, "fsync 5 /db/db").expect("arm");
    let failed = put(client.clone(), "during").await;
    assert!(
        matches!(&failed, Err(Error::Unavailable { message }) if message.contains("restart")),
        "{failed:?}"
    );
    std::fs::write(&control, "").expect("disarm");
    let still = put(client.clone(), "after").await;
    assert!(
        matches!(&still, Err(Error::Unavailable { .. })),
        "a write after a failed fsync was acknowledged: {still:?}"
    );
    // Health says so, so that probes stop routing here.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = health_status(server.addr, "").await;
        if status == Some(ServingStatus::NotServing) {
            break;
        }
        assert!(Instant::now() < deadline, "health still says {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.restart().await;
    let client = server.client().await;
    let (_, body) = client
        .get_artifact(&ns, &Name::new("key", "before").expect("name"))
        .await
        .expect("the acknowledged write survived");
    assert_eq!(collect_bytes(body).await.expect("read"), b"before");
    put(client, "after")
        .await
        .expect("writes work after a restart");
}
