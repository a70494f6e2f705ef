//! Faults below the server, on the real binary: a small C library loaded with
//! `LD_PRELOAD` (`tests/faults/trove_faults.c`) makes the C library's
//! `write`, `fsync`/`fdatasync`, `rename` or `link` fail for files whose path matches,
//! armed and disarmed while the server runs. Each fault gives its documented
//! status, leaves nothing visible and nothing staged, and once it is gone the
//! same write succeeds: the server recovers without a restart (a failed
//! write or `fdatasync` of the log undoes the writes not yet durable and
//! reopens the log on a fresh segment). The exception is a failed `fsync`
//! of the database itself at a checkpoint, after which no write is
//! acknowledged until a restart replays the log.

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

/// Polls health until it reports `want`.
async fn wait_health(server: &ServerProcess, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = health_status(server.addr, "").await;
        if status == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "health still says {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn put_small(
    client: &trove_client::TroveClient,
    ns: &Namespace,
    key: &str,
    value: Bytes,
) -> Result<(), Error> {
    client
        .put_artifact(
            ns,
            &Name::new("key", key).expect("name"),
            PutOptions::default(),
            bytes_stream(vec![value]),
        )
        .await
        .map(|_| ())
}

/// Every fault on the log's path (the durability point of every write): the
/// write answers its status and is undone (never visible, also after a
/// restart), writes are refused and health says NOT_SERVING until the log is
/// reopened on a fresh segment; once the fault is gone writes resume without
/// a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_faults_undo_the_write_and_the_log_reopens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(library) = fault_library(dir.path()) else {
        return;
    };
    let control = dir.path().join("faults");
    let mut server = start_with_faults(&library, &control).await;
    let client = server.client().await;
    let ns = Namespace::new("log-faults").expect("ns");
    put_small(&client, &ns, "before", Bytes::from_static(b"kept"))
        .await
        .expect("acknowledged");
    let cases: [Case; 4] = [
        ("a failing write of the log", "write 5 /log/", |e| {
            matches!(e, Error::Unavailable { .. })
        }),
        ("a full disk under the log", "write 28 /log/", |e| {
            matches!(e, Error::ResourceExhausted { .. })
        }),
        ("a failing fdatasync of the log", "fsync 5 /log/", |e| {
            matches!(e, Error::Unavailable { .. })
        }),
        (
            "a full disk at the log's fdatasync",
            "fsync 28 /log/",
            |e| matches!(e, Error::ResourceExhausted { .. }),
        ),
    ];
    for (i, (what, fault, expected)) in cases.into_iter().enumerate() {
        let key = format!("value-{i}");
        std::fs::write(&control, fault).expect("arm");
        let failed = put_small(&client, &ns, &key, Bytes::from(key.clone())).await;
        match &failed {
            Err(err) if expected(err) => {}
            other => panic!("{what}: unexpected outcome {other:?}"),
        }
        // Still armed: the log cannot be reopened, writes are refused.
        let refused = put_small(&client, &ns, "refused", Bytes::from_static(b"x")).await;
        assert!(
            matches!(&refused, Err(Error::Unavailable { message }) if message.contains("reopened")),
            "{what}: a write while the log is down: {refused:?}"
        );
        wait_health(&server, ServingStatus::NotServing).await;
        std::fs::write(&control, "").expect("disarm");
        for gone in [key.as_str(), "refused"] {
            let read = client
                .get_artifact(&ns, &Name::new("key", gone).expect("name"))
                .await;
            assert!(
                matches!(read, Err(Error::NotFound { .. })),
                "{what}: a write that was not acknowledged is visible: {:?}",
                read.map(|(info, _)| info)
            );
        }
        // The log reopens on a fresh segment (a refused write asks it to
        // try at once): poll until writes resume.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match put_small(&client, &ns, &key, Bytes::from(key.clone())).await {
                Ok(()) => break,
                Err(Error::Unavailable { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(other) => panic!("{what}: writes did not resume: {other:?}"),
            }
        }
        wait_health(&server, ServingStatus::Serving).await;
        println!("{what}: {:?}", failed.err());
    }
    // After a restart (the log replayed, void records skipped) exactly the
    // acknowledged writes are there.
    server.kill9();
    server.restart().await;
    let client = server.client().await;
    for i in 0..4 {
        let key = format!("value-{i}");
        let (_, body) = client
            .get_artifact(&ns, &Name::new("key", key.clone()).expect("name"))
            .await
            .expect("acknowledged after the fault survives a crash");
        assert_eq!(collect_bytes(body).await.expect("read"), key.as_bytes());
    }
    let refused = client
        .get_artifact(&ns, &Name::new("key", "refused").expect("name"))
        .await;
    assert!(matches!(refused, Err(Error::NotFound { .. })));
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// A failed `fsync` of the database at a checkpoint is never retried as if
/// it could succeed (the kernel may have dropped the pages it could not
/// write): from then on every write answers UNAVAILABLE, fault gone or not,
/// until the server restarts; health reports NOT_SERVING meanwhile. Every
/// write acknowledged before is intact after the restart: the log still
/// holds what the checkpoint could not cover, and is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_database_fsync_stops_writes_until_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(library) = fault_library(dir.path()) else {
        return;
    };
    let control = dir.path().join("faults");
    let mut server = start_with_faults(&library, &control).await;
    let ns = Namespace::new("fsyncgate").expect("ns");
    let client = server.client().await;
    put_small(&client, &ns, "before", Bytes::from_static(b"before"))
        .await
        .expect("acknowledged");
    std::fs::write(&control, "fsync 5 /db/db").expect("arm");
    // Values kept inline fill a log segment, which makes a checkpoint due.
    let value = Bytes::from(vec![7u8; 60 * 1024]);
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for i in 0..2_000 {
        let key = format!("v-{i}");
        match put_small(&client, &ns, &key, value.clone()).await {
            Ok(()) => acknowledged.push(key),
            Err(err) => {
                refusal = Some(err);
                break;
            }
        }
    }
    assert!(
        matches!(&refusal, Some(Error::Unavailable { message }) if message.contains("restart")),
        "{refusal:?} after {} writes",
        acknowledged.len()
    );
    std::fs::write(&control, "").expect("disarm");
    let still = put_small(&client, &ns, "after", Bytes::from_static(b"after")).await;
    assert!(
        matches!(&still, Err(Error::Unavailable { .. })),
        "a write after a failed fsync was acknowledged: {still:?}"
    );
    wait_health(&server, ServingStatus::NotServing).await;
    server.kill9();
    server.restart().await;
    let client = server.client().await;
    let (_, body) = client
        .get_artifact(&ns, &Name::new("key", "before").expect("name"))
        .await
        .expect("the acknowledged write survived");
    assert_eq!(collect_bytes(body).await.expect("read"), b"before");
    for key in &acknowledged {
        let (info, _) = client
            .get_artifact(&ns, &Name::new("key", key.as_str()).expect("name"))
            .await
            .unwrap_or_else(|e| panic!("{key} was acknowledged and is lost: {e}"));
        assert_eq!(info.size, value.len() as u64);
    }
    put_small(&client, &ns, "after", Bytes::from_static(b"after"))
        .await
        .expect("writes work after a restart");
}
