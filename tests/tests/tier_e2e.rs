//! A shared server with two sidecar tiers in front of it (`--upstream`), all
//! real processes on loopback: what one sidecar writes the other reads, a
//! replace through one is never read stale through the other, an upstream
//! outage leaves cached verified objects readable and refuses the rest, and
//! FindMissing sends the upstream only the local misses, in one call.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use trove_client::TroveClient;
use trove_proto::artifacts::PutOptions;
use trove_proto::entries::{AppendOptions, NewEntry, ReadOptions};
use trove_proto::types::{Name, Namespace};
use trove_proto::{ArtifactStore, EntryStore, Error, ObjectStore};
use trove_tests::conformance::fresh_ns;
use trove_tests::harness::{counter_sum, health_status, ServerProcess};
use trove_tests::{bytes_stream, collect_bytes, sha256_hex};

/// A shared server and `n` sidecars in front of it.
async fn fleet(n: usize) -> (ServerProcess, Vec<ServerProcess>) {
    let shared = ServerProcess::start().await;
    let upstream = format!("http://{}", shared.addr);
    let mut sidecars = Vec::new();
    for _ in 0..n {
        sidecars.push(ServerProcess::start_with(&["--upstream", &upstream]).await);
    }
    (shared, sidecars)
}

fn key(s: &str) -> Name {
    Name::new("key", s).expect("valid name")
}

fn one(data: &[u8]) -> trove_proto::types::ByteStream {
    bytes_stream(vec![Bytes::copy_from_slice(data)])
}

/// Stores `data` as a verified object; returns its hash.
async fn put_object(client: &TroveClient, ns: &Namespace, data: &[u8]) -> Name {
    let hash = key(&sha256_hex(data));
    client
        .put_object(ns, &hash, Some(data.len() as u64), one(data))
        .await
        .expect("put object");
    hash
}

async fn read_object(client: &TroveClient, ns: &Namespace, hash: &Name) -> Result<Vec<u8>, Error> {
    let (_, body) = client.get_object(ns, hash).await?;
    collect_bytes(body).await
}

async fn read_artifact(client: &TroveClient, ns: &Namespace, key: &Name) -> Vec<u8> {
    let (_, body) = client.get_artifact(ns, key).await.expect("get artifact");
    collect_bytes(body).await.expect("read artifact")
}

fn metrics(server: &ServerProcess) -> SocketAddr {
    server.metrics_addr.expect("metrics endpoint")
}

/// Reads `hash` through `sidecar` until it is served from the local copy
/// (the copy is kept while the first read streams, and commits just after).
async fn until_local_hit(sidecar: &ServerProcess, ns: &Namespace, hash: &Name, data: &[u8]) {
    let client = sidecar.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hits = counter_sum(metrics(sidecar), "trove_tier_local_hits_total", &[]).await;
        assert_eq!(read_object(&client, ns, hash).await.expect("read"), data);
        if counter_sum(metrics(sidecar), "trove_tier_local_hits_total", &[]).await > hits {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar never kept a local copy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What sidecar A writes, sidecar B reads: objects, artifacts (also after a
/// replace through A: B never serves its older local copy) and cassettes
/// (appends and a replace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_sidecar_writes_the_other_reads_never_stale() {
    let (_shared, sidecars) = fleet(2).await;
    let (a, b) = (sidecars[0].client().await, sidecars[1].client().await);
    let ns = fresh_ns();

    let blob: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i % 251).to_le_bytes()[0])
        .collect();
    let hash = put_object(&a, &ns, &blob).await;
    let misses = counter_sum(metrics(&sidecars[1]), "trove_tier_local_misses_total", &[]).await;
    assert_eq!(
        read_object(&b, &ns, &hash).await.expect("read through B"),
        blob
    );
    assert!(
        counter_sum(metrics(&sidecars[1]), "trove_tier_local_misses_total", &[]).await > misses,
        "B had no copy yet: its first read must have gone upstream"
    );
    until_local_hit(&sidecars[1], &ns, &hash, &blob).await;
    // A delete through A reaches the upstream and A's own copy.
    assert!(a.delete_object(&ns, &hash).await.expect("delete through A"));
    assert!(matches!(
        read_object(&a, &ns, &hash).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        a.find_missing(&ns, std::slice::from_ref(&hash))
            .await
            .expect("find missing"),
        vec![hash.clone()]
    );

    let artifact = key("reports/latest.json");
    for version in ["v1: first", "v2: replaced through A"] {
        a.put_artifact(
            &ns,
            &artifact,
            PutOptions::default(),
            one(version.as_bytes()),
        )
        .await
        .expect("put artifact through A");
        // Twice: the first read may fill B's copy, the second serves it.
        for _ in 0..2 {
            assert_eq!(read_artifact(&b, &ns, &artifact).await, version.as_bytes());
        }
    }
    assert!(a.delete_artifact(&ns, &artifact).await.expect("delete"));
    assert!(matches!(
        b.get_artifact(&ns, &artifact).await,
        Err(Error::NotFound { .. })
    ));

    let cassette = key("cassette");
    let entry = |tag: &str| {
        let json = serde_json::json!({ "tag": tag }).to_string();
        NewEntry::parse("entry", Bytes::from(json), None).expect("entry")
    };
    a.append_entries(
        &ns,
        &cassette,
        vec![entry("one"), entry("two")],
        AppendOptions::default(),
    )
    .await
    .expect("append through A");
    let tags = |client: TroveClient, ns: Namespace, cassette: Name| async move {
        let stream = client
            .read_entries(&ns, &cassette, ReadOptions::default())
            .await
            .expect("read");
        stream
            .map(|e| {
                let e = e.expect("entry");
                let v: serde_json::Value = serde_json::from_slice(&e.json).expect("json");
                v["tag"].as_str().unwrap_or_default().to_owned()
            })
            .collect::<Vec<_>>()
            .await
    };
    assert_eq!(
        tags(b.clone(), ns.clone(), cassette.clone()).await,
        ["one", "two"]
    );
    let replacement = futures::stream::iter(vec![Ok(entry("only"))]).boxed();
    a.replace_entries(&ns, &cassette, replacement)
        .await
        .expect("replace through A");
    assert_eq!(
        tags(b.clone(), ns.clone(), cassette.clone()).await,
        ["only"]
    );
    for sidecar in &sidecars {
        assert!(!sidecar.log().contains("panicked"), "{}", sidecar.log());
    }
}

/// A FindMissing of 1,000 hashes of which 900 are held by the sidecar makes
/// one upstream call, carrying the 100 others; the answer is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_asks_the_upstream_only_for_local_misses_in_one_call() {
    let (shared, sidecars) = fleet(2).await;
    let (a, b) = (sidecars[0].client().await, sidecars[1].client().await);
    let ns = fresh_ns();
    let mut hashes = Vec::new();
    // 900 written through A (so A holds them), 50 written through B (only
    // the upstream and B hold them), 50 nowhere.
    for i in 0..1000u32 {
        let data = format!("value {i}").into_bytes();
        let hash = match i {
            0..=899 => put_object(&a, &ns, &data).await,
            900..=949 => put_object(&b, &ns, &data).await,
            _ => key(&sha256_hex(&data)),
        };
        hashes.push(hash);
    }
    let upstream_calls = || async {
        counter_sum(
            metrics(&shared),
            "trove_requests_total",
            &[("service", "trove.v1.Objects"), ("method", "FindMissing")],
        )
        .await
    };
    let asked = || async {
        counter_sum(
            metrics(&sidecars[0]),
            "trove_upstream_find_missing_hashes_total",
            &[],
        )
        .await
    };
    let (calls_before, asked_before) = (upstream_calls().await, asked().await);
    let missing = a.find_missing(&ns, &hashes).await.expect("find missing");
    assert_eq!(
        missing,
        hashes[950..].to_vec(),
        "exactly the 50 stored nowhere"
    );
    // The upstream counts a call when it finishes sending the answer, which
    // can be just after the sidecar has read it: poll (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut calls = upstream_calls().await - calls_before;
    while calls < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        calls = upstream_calls().await - calls_before;
    }
    assert_eq!(calls, 1.0, "one upstream call");
    assert_eq!(
        asked().await - asked_before,
        100.0,
        "carrying the 100 local misses"
    );
}

/// With the upstream down: verified objects the sidecar holds are still
/// served; everything else fails fast with UNAVAILABLE naming the upstream;
/// health tells "sidecar up, upstream down" apart. When the upstream comes
/// back, so does everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_outage_keeps_cached_objects_readable_and_refuses_the_rest() {
    let (mut shared, sidecars) = fleet(2).await;
    let (a, b) = (sidecars[0].client().await, sidecars[1].client().await);
    let ns = fresh_ns();
    let data = b"a verified object cached by B".to_vec();
    let hash = put_object(&a, &ns, &data).await;
    until_local_hit(&sidecars[1], &ns, &hash, &data).await;
    let artifact = key("config");
    a.put_artifact(&ns, &artifact, PutOptions::default(), one(b"mutable"))
        .await
        .expect("put artifact");

    shared.kill9();
    let upstream = shared.addr.to_string();
    wait_health(&sidecars[1], "trove.upstream", ServingStatus::NotServing).await;
    assert_eq!(
        health_status(sidecars[1].addr, "").await,
        Some(ServingStatus::Serving),
        "the sidecar itself stays up"
    );
    assert_eq!(
        read_object(&b, &ns, &hash).await.expect("cached object"),
        data
    );

    let started = Instant::now();
    let refused = b
        .put_artifact(&ns, &key("new"), PutOptions::default(), one(b"x"))
        .await;
    assert_unavailable_naming(refused, &upstream);
    assert_unavailable_naming(b.get_artifact(&ns, &artifact).await.map(|_| ()), &upstream);
    let unknown = key(&sha256_hex(b"never stored"));
    assert_unavailable_naming(read_object(&b, &ns, &unknown).await, &upstream);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refusals took {:?}: they must fail fast",
        started.elapsed()
    );
    assert_eq!(
        read_object(&b, &ns, &hash).await.expect("still cached"),
        data
    );

    shared.restart_same_address().await;
    wait_health(&sidecars[1], "trove.upstream", ServingStatus::Serving).await;
    assert_eq!(read_artifact(&b, &ns, &artifact).await, b"mutable");
    b.put_artifact(&ns, &key("new"), PutOptions::default(), one(b"x"))
        .await
        .expect("writes work again");
}

#[track_caller]
fn assert_unavailable_naming<T: std::fmt::Debug>(result: Result<T, Error>, upstream: &str) {
    match result {
        Err(Error::Unavailable { message }) => {
            assert!(message.contains(upstream), "{message}");
        }
        other => panic!("expected UNAVAILABLE naming {upstream}, got {other:?}"),
    }
}

/// Polls `service`'s health on `server` until it reports `want`.
async fn wait_health(server: &ServerProcess, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = health_status(server.addr, service).await;
        if status == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} never reported {want:?} (last {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sidecar reaches a shared server that requires TLS and tokens: `https://`
/// with `--upstream-ca`, and its own token from `TROVE_UPSTREAM_TOKEN`, whose
/// grant bounds what it may do there. A token the upstream does not know is
/// UNAVAILABLE naming the setting to fix, never a silent failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_reaches_a_secured_upstream_with_its_ca_and_token() {
    use sha2::Digest;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = trove_tests::pki::TestCa::new("trove test CA");
    let (cert, cert_key) = ca.server(&["127.0.0.1"], false).write(dir.path(), "server");
    let ca_path = ca.write(dir.path(), "ca");
    let grants = dir.path().join("grants.toml");
    std::fs::write(
        &grants,
        format!(
            "[[token]]\nname = \"sidecar\"\nsha256 = {:?}\nnamespaces = [\"fleet\"]\npermissions = [\"read\", \"write\"]\n",
            hex::encode(sha2::Sha256::digest(b"sidecar-token"))
        ),
    )
    .expect("write grants");
    let direct = trove_client::ClientOptions {
        ca_pem: Some(ca.pem.clone().into_bytes()),
        token: Some("sidecar-token".to_owned()),
        ..Default::default()
    };
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_owned();
    let shared = ServerProcess::start_secure(
        &[
            "--tls-cert",
            &path(&cert),
            "--tls-key",
            &path(&cert_key),
            "--auth-tokens",
            &path(&grants),
        ],
        direct.clone(),
    )
    .await;
    let upstream = format!("https://127.0.0.1:{}", shared.addr.port());
    let sidecar_with = |token: &str| {
        let (upstream, ca_path) = (upstream.clone(), path(&ca_path));
        let env = vec![("TROVE_UPSTREAM_TOKEN".to_owned(), token.to_owned())];
        async move {
            ServerProcess::start_with_env(
                &["--upstream", &upstream, "--upstream-ca", &ca_path],
                &env,
            )
            .await
        }
    };
    let sidecar = sidecar_with("sidecar-token").await;
    let client = sidecar.client().await;
    let fleet = Namespace::new("fleet").expect("namespace");
    client
        .put_artifact(
            &fleet,
            &key("k"),
            PutOptions::default(),
            one(b"through TLS"),
        )
        .await
        .expect("write through the sidecar");
    let shared_client = TroveClient::connect_with(&shared.addr.to_string(), &direct)
        .await
        .expect("connect directly");
    assert_eq!(
        read_artifact(&shared_client, &fleet, &key("k")).await,
        b"through TLS"
    );
    let other = Namespace::new("other").expect("namespace");
    let denied = client
        .put_artifact(&other, &key("k"), PutOptions::default(), one(b"x"))
        .await;
    assert!(
        matches!(denied, Err(Error::PermissionDenied { .. })),
        "{denied:?}"
    );

    let impostor = sidecar_with("not-a-known-token").await;
    let refused = impostor
        .client()
        .await
        .put_artifact(&fleet, &key("k2"), PutOptions::default(), one(b"x"))
        .await;
    match refused {
        Err(Error::Unavailable { message }) => {
            assert!(message.contains("--upstream-token"), "{message}");
        }
        other => panic!("expected UNAVAILABLE naming --upstream-token, got {other:?}"),
    }
}

/// A write the upstream refuses (here: over its disk quota) is refused to
/// the caller with the upstream's status, and leaves no local copy: the
/// sidecar must never report as present what its upstream does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_upstream_refuses_leaves_no_local_copy() {
    let shared = ServerProcess::start_with(&["--max-disk-bytes", "4096"]).await;
    let upstream = format!("http://{}", shared.addr);
    let sidecar = ServerProcess::start_with(&["--upstream", &upstream]).await;
    let client = sidecar.client().await;
    let ns = fresh_ns();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 7).to_le_bytes()[0]).collect();
    let hash = key(&sha256_hex(&data));
    let refused = client
        .put_object(&ns, &hash, Some(data.len() as u64), one(&data))
        .await;
    assert!(
        matches!(refused, Err(Error::ResourceExhausted { .. })),
        "{refused:?}"
    );
    assert_eq!(
        client
            .find_missing(&ns, std::slice::from_ref(&hash))
            .await
            .expect("find missing"),
        vec![hash.clone()]
    );
    assert!(matches!(
        read_object(&client, &ns, &hash).await,
        Err(Error::NotFound { .. })
    ));
    let artifact = client
        .put_artifact(&ns, &key("big"), PutOptions::default(), one(&data))
        .await;
    assert!(
        matches!(artifact, Err(Error::ResourceExhausted { .. })),
        "{artifact:?}"
    );
    let small = put_object(&client, &ns, b"fits").await;
    assert_eq!(
        read_object(&client, &ns, &small).await.expect("read"),
        b"fits"
    );
}

/// A shared server and a sidecar in front of it whose every namespace is
/// bounded by `quota` bytes (`[namespaces."*"]`, evicting by default in a
/// tier); the config's folder lives as long as the returned guard.
async fn bounded_sidecar(quota: u64) -> (ServerProcess, ServerProcess, tempfile::TempDir) {
    let shared = ServerProcess::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("trove.toml");
    std::fs::write(
        &config,
        format!("[namespaces.\"*\"]\nmax_bytes = {quota}\n"),
    )
    .expect("write config");
    let upstream = format!("http://{}", shared.addr);
    let sidecar = ServerProcess::start_with(&[
        "--upstream",
        &upstream,
        "--config",
        config.to_str().expect("path"),
    ])
    .await;
    (shared, sidecar, dir)
}

/// A sidecar whose local copy is bounded (`[namespaces."*"]`, which evicts
/// by default in a tier) keeps serving everything written through it: its
/// local copy goes back under the quota, and what was evicted is fetched
/// from the upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_sidecar_evicts_its_local_copy_and_still_serves_everything() {
    use trove_proto::UsageStore;
    const QUOTA: u64 = 200_000;
    let (shared, sidecar, _config) = bounded_sidecar(QUOTA).await;
    let client = sidecar.client().await;
    let ns = fresh_ns();
    let local_bytes = || async {
        client
            .namespace_usage(Some(&ns))
            .await
            .expect("usage")
            .iter()
            .map(|row| row.logical_bytes)
            .sum::<u64>()
    };
    let settle = || async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let held = local_bytes().await;
            if held <= QUOTA {
                return held;
            }
            assert!(
                Instant::now() < deadline,
                "the local copy stays at {held} bytes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut stored = Vec::new();
    for i in 0..40u32 {
        let data: Vec<u8> = (0..20_000u32)
            .map(|j| (i * 31 + j % 253).to_le_bytes()[0])
            .collect();
        stored.push((put_object(&client, &ns, &data).await, data));
    }
    let held = settle().await;
    assert!(held > 0, "the sidecar keeps local copies");
    for (hash, data) in &stored {
        assert_eq!(&read_object(&client, &ns, hash).await.expect("read"), data);
    }
    settle().await;
    let evicted = counter_sum(metrics(&sidecar), "trove_evictions_total", &[]).await;
    assert!(evicted > 0.0, "nothing was evicted");
    let direct = shared.client().await;
    let missing = direct
        .find_missing(
            &ns,
            &stored.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>(),
        )
        .await
        .expect("find missing upstream");
    assert!(missing.is_empty(), "the upstream lost {missing:?}");
}

/// Artifact copies are records (never evicted): a bounded sidecar keeps
/// them only while they hold at most half of the quota, so they never crowd
/// out the object copies it can evict. Every value is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_copies_keep_within_half_of_a_bounded_sidecars_quota() {
    use trove_proto::UsageStore;
    const QUOTA: u64 = 100_000;
    let (_shared, sidecar, _config) = bounded_sidecar(QUOTA).await;
    let client = sidecar.client().await;
    let ns = fresh_ns();
    let artifact_bytes = || async {
        client
            .namespace_usage(Some(&ns))
            .await
            .expect("usage")
            .iter()
            .filter(|row| row.group == "artifacts")
            .map(|row| row.logical_bytes)
            .sum::<u64>()
    };
    let value = |i: u32| -> Vec<u8> {
        (0..20_000u32)
            .map(|j| (i + j % 241).to_le_bytes()[0])
            .collect()
    };
    for i in 0..10 {
        client
            .put_artifact(
                &ns,
                &key(&format!("a/{i}")),
                PutOptions::default(),
                one(&value(i)),
            )
            .await
            .expect("put artifact through the sidecar");
    }
    // Uploads here declare no size: the last copy kept may pass half the
    // quota by its own size.
    let held = artifact_bytes().await;
    assert!(
        held > 0 && held <= QUOTA / 2 + 20_000,
        "{held} bytes of artifact copies"
    );
    for i in 0..10 {
        assert_eq!(
            read_artifact(&client, &ns, &key(&format!("a/{i}"))).await,
            value(i)
        );
    }
    let held = artifact_bytes().await;
    assert!(
        held <= QUOTA / 2 + 20_000,
        "{held} bytes of artifact copies after reads"
    );
    let object = vec![9u8; 20_000];
    let hash = put_object(&client, &ns, &object).await;
    until_local_hit(&sidecar, &ns, &hash, &object).await;
}
