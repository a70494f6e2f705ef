//! Who may do what, against the real binary: TLS handshakes with certificates
//! made by the test (trusted, untrusted, expired, wrong name, plaintext),
//! mutual TLS, namespace-scoped tokens over every RPC, token rotation without
//! restart, the refusal to serve a public address openly, the metrics token,
//! and the audit log.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use sha2::Digest;
use trove_client::{ClientOptions, TroveClient};
use trove_proto::artifacts::PutOptions;
use trove_proto::cache::{BranchRefsKey, BranchRefsWrite, CacheScope, PruneOptions, UploadOptions};
use trove_proto::entries::{AppendOptions, NewEntry, ReadOptions};
use trove_proto::objects::StreamChunk;
use trove_proto::types::{ListPage, Name, Namespace};
use trove_proto::{ArtifactStore, CacheStore, EntryStore, Error, ObjectStore, UsageStore};
use trove_tests::harness::{server_binary, ServerProcess};
use trove_tests::pki::TestCa;
use trove_tests::{bytes_stream, collect_bytes};

fn name(field: &str, value: &str) -> Name {
    Name::new(field, value).expect("valid name")
}

fn ns(value: &str) -> Namespace {
    Namespace::new(value).expect("valid namespace")
}

fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A grants file entry for a token.
fn token_entry(principal: &str, token: &str, namespaces: &[&str], permissions: &[&str]) -> String {
    format!(
        "[[token]]\nname = {principal:?}\nsha256 = {:?}\nnamespaces = {namespaces:?}\npermissions = {permissions:?}\n\n",
        token_hash(token)
    )
}

fn with_token(base: &ClientOptions, token: Option<&str>) -> ClientOptions {
    ClientOptions {
        token: token.map(str::to_owned),
        ..base.clone()
    }
}

async fn put_artifact(
    client: &TroveClient,
    space: &str,
    key: &str,
    value: &'static [u8],
) -> Result<(), Error> {
    client
        .put_artifact(
            &ns(space),
            &name("key", key),
            PutOptions::default(),
            bytes_stream(vec![Bytes::from_static(value)]),
        )
        .await
        .map(|_| ())
}

async fn get_artifact(client: &TroveClient, space: &str, key: &str) -> Result<Vec<u8>, Error> {
    let (_, body) = client.get_artifact(&ns(space), &name("key", key)).await?;
    collect_bytes(body).await
}

/// TLS: a client trusting the server's CA gets in; an untrusted CA, a wrong
/// host name and plaintext against the TLS port fail. The certificate is
/// replaced on disk (here by an expired one, then a good one again) while
/// the server runs: new handshakes see each, and an open connection keeps
/// working throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_and_certificate_reload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, other_ca) = (TestCa::new("trove test CA"), TestCa::new("some other CA"));
    let (cert, key) = ca
        .server(&["localhost", "127.0.0.1"], false)
        .write(dir.path(), "server");
    let trusted = ClientOptions {
        ca_pem: Some(ca.pem.clone().into_bytes()),
        ..Default::default()
    };
    let server = ServerProcess::start_secure(
        &[
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            key.to_str().expect("path"),
            "--health-listen",
            "127.0.0.1:0",
        ],
        trusted.clone(),
    )
    .await;
    let addr = server.addr.to_string();
    // Probes that speak neither TLS nor tokens use the health listener.
    let probe = server.health_addr.expect("health listener");
    assert_eq!(
        trove_tests::harness::health_status(probe, "").await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );

    let client = TroveClient::connect_with(&addr, &trusted)
        .await
        .expect("trusted CA connects");
    put_artifact(&client, "tls", "k", b"over TLS")
        .await
        .expect("put over TLS");
    assert_eq!(
        get_artifact(&client, "tls", "k").await.expect("get"),
        b"over TLS"
    );

    let untrusted = ClientOptions {
        ca_pem: Some(other_ca.pem.clone().into_bytes()),
        ..Default::default()
    };
    refused(&addr, &untrusted, "untrusted CA").await;
    let wrong_name = ClientOptions {
        domain: Some("wrong.example".into()),
        ..trusted.clone()
    };
    refused(&addr, &wrong_name, "wrong host name").await;
    let plaintext = TroveClient::connect(&addr).await;
    let plain_call = match plaintext {
        Ok(client) => get_artifact(&client, "tls", "k").await.err(),
        Err(err) => Some(err),
    };
    assert!(
        plain_call.is_some(),
        "plaintext against the TLS port must fail"
    );

    // An expired certificate replaces the good one: new handshakes fail,
    // the connection opened before keeps working.
    ca.server(&["localhost", "127.0.0.1"], true)
        .write(dir.path(), "server");
    hang_up(&server);
    wait_until("the expired certificate to be served", || async {
        TroveClient::connect_with(&addr, &trusted).await.is_err()
    })
    .await;
    assert_eq!(
        get_artifact(&client, "tls", "k")
            .await
            .expect("open connection"),
        b"over TLS"
    );
    // A broken pair is refused and the last good one (expired here) stays.
    std::fs::write(&cert, "not a certificate").expect("write");
    hang_up(&server);
    wait_until("the broken pair to be reported", || async {
        server.log().contains("TLS certificate not reloaded")
    })
    .await;
    ca.server(&["localhost", "127.0.0.1"], false)
        .write(dir.path(), "server");
    hang_up(&server);
    wait_until("the renewed certificate to be served", || async {
        TroveClient::connect_with(&addr, &trusted).await.is_ok()
    })
    .await;
    let renewed = TroveClient::connect_with(&addr, &trusted)
        .await
        .expect("renewed");
    assert_eq!(
        get_artifact(&renewed, "tls", "k").await.expect("get"),
        b"over TLS"
    );
}

/// Mutual TLS: a client certificate from the client CA, mapped in the grants
/// file, gets in; none, or one from another CA, is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_known_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, other_ca) = (TestCa::new("trove test CA"), TestCa::new("some other CA"));
    let (cert, key) = ca
        .server(&["localhost", "127.0.0.1"], false)
        .write(dir.path(), "server");
    let client_ca = ca.write(dir.path(), "client-ca");
    let grants = dir.path().join("grants.toml");
    std::fs::write(
        &grants,
        "[[client]]\nname = \"runner\"\nsan = \"runner.ci\"\nnamespaces = [\"ci\"]\npermissions = [\"read\", \"write\"]\n\n\
         [[client]]\nname = \"auditor\"\nsubject = \"CN=auditor\"\nnamespaces = [\"ci\"]\npermissions = [\"read\"]\n",
    )
    .expect("grants");
    let runner = ca.client("runner", "runner.ci");
    let with_cert = ClientOptions {
        ca_pem: Some(ca.pem.clone().into_bytes()),
        identity_pem: Some((runner.cert.into_bytes(), runner.key.into_bytes())),
        ..Default::default()
    };
    let server = ServerProcess::start_secure(
        &[
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            key.to_str().expect("path"),
            "--tls-client-ca",
            client_ca.to_str().expect("path"),
            "--auth-tokens",
            grants.to_str().expect("path"),
        ],
        with_cert.clone(),
    )
    .await;
    let addr = server.addr.to_string();
    let client = TroveClient::connect_with(&addr, &with_cert)
        .await
        .expect("connect");
    put_artifact(&client, "ci", "k", b"mtls")
        .await
        .expect("mapped certificate writes");
    match put_artifact(&client, "other", "k", b"x").await {
        Err(Error::PermissionDenied { message }) => {
            assert!(message.contains("runner"), "{message}")
        }
        other => panic!("outside the grant: {other:?}"),
    }

    // A certificate mapped by its subject gets that principal's grant.
    let auditor = ca.client("auditor", "somewhere.else");
    let as_auditor = ClientOptions {
        identity_pem: Some((auditor.cert.into_bytes(), auditor.key.into_bytes())),
        ..with_cert.clone()
    };
    let auditor = TroveClient::connect_with(&addr, &as_auditor)
        .await
        .expect("connect");
    assert_eq!(
        get_artifact(&auditor, "ci", "k").await.expect("read"),
        b"mtls"
    );
    match put_artifact(&auditor, "ci", "k", b"x").await {
        Err(Error::PermissionDenied { message }) => {
            assert!(message.contains("auditor"), "{message}")
        }
        other => panic!("a read-only subject wrote: {other:?}"),
    }
    // A certificate from the CA that the grants file does not map is not a principal.
    let unmapped = ca.client("nobody", "nobody.ci");
    let as_nobody = ClientOptions {
        identity_pem: Some((unmapped.cert.into_bytes(), unmapped.key.into_bytes())),
        ..with_cert.clone()
    };
    let nobody = TroveClient::connect_with(&addr, &as_nobody)
        .await
        .expect("connect");
    assert!(matches!(
        get_artifact(&nobody, "ci", "k").await,
        Err(Error::Unauthenticated { .. })
    ));

    let no_cert = ClientOptions {
        identity_pem: None,
        ..with_cert.clone()
    };
    refused(&addr, &no_cert, "no client certificate").await;
    let stranger = other_ca.client("runner", "runner.ci");
    let foreign = ClientOptions {
        identity_pem: Some((stranger.cert.into_bytes(), stranger.key.into_bytes())),
        ..with_cert.clone()
    };
    refused(&addr, &foreign, "a client certificate from another CA").await;
}

/// Asserts that a client with `options` cannot make a call.
async fn refused(addr: &str, options: &ClientOptions, what: &str) {
    let outcome = match TroveClient::connect_with(addr, options).await {
        Ok(client) => get_artifact(&client, "tls", "k").await.map(|_| ()),
        Err(err) => Err(err),
    };
    assert!(outcome.is_err(), "{what}: the connection must be refused");
}

fn hang_up(server: &ServerProcess) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Polls `check` until it holds (at most 20 s): reloads happen in the
/// background, on SIGHUP or within the reload period.
async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "waited 20 s for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What an RPC needs of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Read,
    Write,
    Delete,
}

type Call = fn(TroveClient, Namespace) -> BoxFuture<'static, Result<(), Error>>;

async fn drain<T>(
    stream: futures::stream::BoxStream<'static, Result<T, Error>>,
) -> Result<(), Error> {
    let items: Vec<Result<T, Error>> = stream.collect().await;
    items
        .into_iter()
        .collect::<Result<Vec<T>, Error>>()
        .map(|_| ())
}

fn scope(space: &Namespace, branch: &str) -> CacheScope {
    CacheScope {
        namespace: space.clone(),
        prefix: "p".into(),
        branch: name("branch", branch),
        default_branch: name("default_branch", "main"),
        test_suite_id: String::new(),
    }
}

/// Every RPC of every service, with what it needs.
fn every_rpc() -> Vec<(&'static str, Needs, Call)> {
    vec![
        ("Admin.Usage", Needs::Read, |c, n| {
            async move { c.namespace_usage(Some(&n)).await.map(|_| ()) }.boxed()
        }),
        ("Objects.Put", Needs::Write, |c, n| {
            async move {
                c.put_object(
                    &n,
                    &name("hash", "obj"),
                    None,
                    bytes_stream(vec![Bytes::from_static(b"o")]),
                )
                .await
                .map(|_| ())
            }
            .boxed()
        }),
        ("Objects.Get", Needs::Read, |c, n| {
            async move {
                let (_, body) = c.get_object(&n, &name("hash", "obj")).await?;
                collect_bytes(body).await.map(|_| ())
            }
            .boxed()
        }),
        ("Objects.Stat", Needs::Read, |c, n| {
            async move { c.stat_object(&n, &name("hash", "obj")).await.map(|_| ()) }.boxed()
        }),
        ("Objects.List", Needs::Read, |c, n| {
            async move { c.list_objects(&n, &ListPage::first("")).await.map(|_| ()) }.boxed()
        }),
        ("Objects.FindMissing", Needs::Read, |c, n| {
            async move { c.find_missing(&n, &[name("hash", "obj")]).await.map(|_| ()) }.boxed()
        }),
        ("Objects.PutStream", Needs::Write, |c, n| {
            async move {
                let chunk = StreamChunk {
                    data: Bytes::from_static(b"s"),
                    timestamp: Some(1),
                };
                c.put_stream(
                    &n,
                    &name("hash", "obj"),
                    futures::stream::iter([Ok(chunk)]).boxed(),
                )
                .await
                .map(|_| ())
            }
            .boxed()
        }),
        ("Objects.GetStream", Needs::Read, |c, n| {
            async move {
                let (_, chunks) = c.get_stream(&n, &name("hash", "obj")).await?;
                drain(chunks).await
            }
            .boxed()
        }),
        ("Objects.Delete", Needs::Delete, |c, n| {
            async move { c.delete_object(&n, &name("hash", "gone")).await.map(|_| ()) }.boxed()
        }),
        ("Artifacts.Put", Needs::Write, |c, n| {
            async move {
                c.put_artifact(
                    &n,
                    &name("key", "art"),
                    PutOptions::default(),
                    bytes_stream(vec![Bytes::from_static(b"a")]),
                )
                .await
                .map(|_| ())
            }
            .boxed()
        }),
        ("Artifacts.Get", Needs::Read, |c, n| {
            async move {
                let (_, body) = c.get_artifact(&n, &name("key", "art")).await?;
                collect_bytes(body).await.map(|_| ())
            }
            .boxed()
        }),
        ("Artifacts.Stat", Needs::Read, |c, n| {
            async move { c.stat_artifact(&n, &name("key", "art")).await.map(|_| ()) }.boxed()
        }),
        ("Artifacts.List", Needs::Read, |c, n| {
            async move {
                c.list_artifacts(&n, &ListPage::first(""), true)
                    .await
                    .map(|_| ())
            }
            .boxed()
        }),
        ("Artifacts.Delete", Needs::Delete, |c, n| {
            async move {
                c.delete_artifact(&n, &name("key", "gone"))
                    .await
                    .map(|_| ())
            }
            .boxed()
        }),
        ("Entries.Append", Needs::Write, |c, n| {
            async move {
                let entry = NewEntry::parse("entry", Bytes::from_static(b"{\"n\":1}"), None)?;
                c.append_entries(
                    &n,
                    &name("cassette", "cas"),
                    vec![entry],
                    AppendOptions::default(),
                )
                .await
                .map(|_| ())
            }
            .boxed()
        }),
        ("Entries.Read", Needs::Read, |c, n| {
            async move {
                drain(
                    c.read_entries(&n, &name("cassette", "cas"), ReadOptions::default())
                        .await?,
                )
                .await
            }
            .boxed()
        }),
        ("Entries.Exists", Needs::Read, |c, n| {
            async move {
                c.cassette_exists(&n, &name("cassette", "cas"))
                    .await
                    .map(|_| ())
            }
            .boxed()
        }),
        ("Entries.Ensure", Needs::Read, |c, n| {
            async move { c.ensure_cassette(&n, &name("cassette", "cas")).await }.boxed()
        }),
        ("Entries.List", Needs::Read, |c, n| {
            async move { c.list_cassettes(&n, &ListPage::first("")).await.map(|_| ()) }.boxed()
        }),
        ("Entries.Replace", Needs::Delete, |c, n| {
            async move {
                let entry = NewEntry::parse("entry", Bytes::from_static(b"{\"n\":2}"), None)?;
                c.replace_entries(
                    &n,
                    &name("cassette", "cas2"),
                    futures::stream::iter([Ok(entry)]).boxed(),
                )
                .await
                .map(|_| ())
            }
            .boxed()
        }),
        ("Entries.Delete", Needs::Delete, |c, n| {
            async move {
                c.delete_cassette(&n, &name("cassette", "gone"))
                    .await
                    .map(|_| ())
            }
            .boxed()
        }),
        ("Cache.Upload", Needs::Write, |c, n| {
            async move {
                c.upload(
                    &scope(&n, "main"),
                    &name("ref", "r1"),
                    UploadOptions::default(),
                    bytes_stream(vec![Bytes::from_static(b"zip")]),
                )
                .await
                .map(|_| ())
            }
            .boxed()
        }),
        ("Cache.Download", Needs::Read, |c, n| {
            async move {
                match c.download(&scope(&n, "main"), "r1", None).await? {
                    Some((_, body)) => collect_bytes(body).await.map(|_| ()),
                    None => Ok(()),
                }
            }
            .boxed()
        }),
        ("Cache.ListRefs", Needs::Read, |c, n| {
            async move { c.list_refs(&scope(&n, "main"), 10, "").await.map(|_| ()) }.boxed()
        }),
        ("Cache.BranchRefs", Needs::Read, |c, n| {
            async move {
                c.branch_refs(&BranchRefsKey::new(n, "p", "feature")?)
                    .await
                    .map(|_| ())
            }
            .boxed()
        }),
        ("Cache.WriteBranchRefs", Needs::Write, |c, n| {
            async move {
                let refs: BTreeMap<String, i64> = [("abc".to_owned(), 1)].into();
                c.write_branch_refs(&BranchRefsWrite::new(n, "p", "feature", "main", refs)?)
                    .await
                    .map(|_| ())
            }
            .boxed()
        }),
        ("Cache.Prune", Needs::Delete, |c, n| {
            async move {
                let options = PruneOptions {
                    count: 100,
                    ..Default::default()
                };
                c.prune(&scope(&n, "main"), options).await.map(|_| ())
            }
            .boxed()
        }),
        ("Cache.PruneAll", Needs::Delete, |c, n| {
            async move { c.prune_all(&n, "p", 3600).await.map(|_| ()) }.boxed()
        }),
    ]
}

/// Namespace-scoped tokens over every RPC: no or unknown credentials are
/// UNAUTHENTICATED; another namespace, or a permission not granted, is
/// PERMISSION_DENIED, decided before storage is touched (a denied call
/// changes nothing, and existing and missing items get the same reply);
/// reflection needs credentials and health does not; every denial and every
/// write or delete leaves an audit line naming principal and namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scope_every_rpc() {
    let dir = tempfile::tempdir().expect("temp dir");
    let grants = dir.path().join("grants.toml");
    std::fs::write(
        &grants,
        token_entry(
            "team-a",
            "token-a",
            &["a", "shared-*"],
            &["read", "write", "delete"],
        ) + &token_entry("auditor", "token-r", &["a", "b"], &["read"])
            + &token_entry("ops", "token-ops", &["*"], &["admin"]),
    )
    .expect("grants");
    let server =
        ServerProcess::start_with(&["--auth-tokens", grants.to_str().expect("path")]).await;
    let addr = server.addr.to_string();
    let connect = |token: Option<&str>| {
        let options = with_token(&ClientOptions::default(), token);
        let addr = addr.clone();
        async move {
            TroveClient::connect_with(&addr, &options)
                .await
                .expect("connect")
        }
    };
    let (ops, team_a, auditor, nobody, stranger) = (
        connect(Some("token-ops")).await,
        connect(Some("token-a")).await,
        connect(Some("token-r")).await,
        connect(None).await,
        connect(Some("not-a-token")).await,
    );
    // Seed both namespaces with every kind of item, as admin.
    for space in ["a", "b"] {
        for (label, _, call) in every_rpc() {
            if label != "Objects.Delete"
                && !label.ends_with("Delete")
                && !label.starts_with("Cache.Prune")
            {
                call(ops.clone(), ns(space))
                    .await
                    .unwrap_or_else(|e| panic!("seed {label}: {e}"));
            }
        }
    }
    let fingerprint = |client: TroveClient| async move {
        let b = ns("b");
        let artifact = client
            .stat_artifact(&b, &name("key", "art"))
            .await
            .expect("art")
            .sha256;
        let listing = client
            .list_objects(&b, &ListPage::first(""))
            .await
            .expect("objects")
            .items
            .len();
        let refs = client
            .list_refs(&scope(&b, "main"), 10, "")
            .await
            .expect("refs")
            .items
            .len();
        let exists = client
            .cassette_exists(&b, &name("cassette", "cas"))
            .await
            .expect("exists");
        (artifact, listing, refs, exists)
    };
    let before = fingerprint(ops.clone()).await;

    for (label, needs, call) in every_rpc() {
        for (who, client) in [("no token", &nobody), ("unknown token", &stranger)] {
            match call(client.clone(), ns("a")).await {
                Err(Error::Unauthenticated { .. }) => {}
                other => panic!("{label} with {who}: {other:?}"),
            }
        }
        match call(team_a.clone(), ns("b")).await {
            Err(Error::PermissionDenied { message }) => {
                assert!(
                    message.contains("team-a") && message.contains("\"b\""),
                    "{label}: {message}"
                )
            }
            other => panic!("{label} outside the namespace: {other:?}"),
        }
        let as_auditor = call(auditor.clone(), ns("a")).await;
        match (needs, as_auditor) {
            (Needs::Read, Ok(())) => {}
            (Needs::Write | Needs::Delete, Err(Error::PermissionDenied { .. })) => {}
            (_, other) => panic!("{label} as a read-only principal: {other:?}"),
        }
        call(team_a.clone(), ns("a"))
            .await
            .unwrap_or_else(|e| panic!("{label} in its grant: {e}"));
        call(team_a.clone(), ns("shared-x"))
            .await
            .unwrap_or_else(|e| panic!("{label} by prefix: {e}"));
    }
    assert_eq!(
        fingerprint(ops.clone()).await,
        before,
        "denied calls changed namespace b"
    );
    // Usage of every namespace shows a principal only what it may read.
    let seen = |rows: Vec<trove_proto::admin::UsageRow>| {
        let mut names: Vec<String> = rows.into_iter().map(|r| r.namespace).collect();
        names.dedup();
        names
    };
    let all = seen(ops.namespace_usage(None).await.expect("usage as admin"));
    assert!(all.contains(&"b".to_owned()), "{all:?}");
    let own = seen(team_a.namespace_usage(None).await.expect("usage as team-a"));
    assert!(
        own.contains(&"a".to_owned()) && !own.contains(&"b".to_owned()),
        "{own:?}"
    );

    // The same reply for an item that exists and one that does not.
    let existing = get_artifact(&team_a, "b", "art").await.expect_err("denied");
    let missing = get_artifact(&team_a, "b", "no-such-key")
        .await
        .expect_err("denied");
    assert_eq!(existing, missing);

    // Health stays open; reflection needs credentials.
    assert_eq!(
        trove_tests::harness::health_status(server.addr, "").await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            server.channel().await,
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let denied = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .map(|_| ());
    assert_eq!(
        denied.map_err(|s| s.code()),
        Err(tonic::Code::Unauthenticated)
    );

    // The audit trail names the principal and namespace of denials and writes.
    let log = server.log();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("audit")).collect();
    assert!(
        audit.iter().any(|l| l.contains("team-a")
            && l.contains("PERMISSION_DENIED")
            && l.contains("\"b\"")),
        "no audit line for a denial: {audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("ops") && l.contains("Put") && l.contains("OK")),
        "no audit line for a write"
    );
    assert!(
        audit.iter().any(|l| l.contains("UNAUTHENTICATED")),
        "no audit line for a call without credentials"
    );
    let metrics = trove_tests::harness::scrape(server.metrics_addr.expect("metrics")).await;
    assert!(metrics.contains("trove_requests_by_principal_total{principal=\"team-a\""));
}

/// Rotation: a new grants file takes effect without a restart; a revoked
/// token stops working while a call it started finishes; a file that does
/// not parse keeps the grants in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rotate_without_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let grants = dir.path().join("grants.toml");
    std::fs::write(
        &grants,
        token_entry("old", "token-old", &["*"], &["read", "write"]),
    )
    .expect("grants");
    let server =
        ServerProcess::start_with(&["--auth-tokens", grants.to_str().expect("path")]).await;
    let addr = server.addr.to_string();
    let old = TroveClient::connect_with(
        &addr,
        &with_token(&ClientOptions::default(), Some("token-old")),
    )
    .await
    .expect("connect");
    let new = TroveClient::connect_with(
        &addr,
        &with_token(&ClientOptions::default(), Some("token-new")),
    )
    .await
    .expect("connect");
    put_artifact(&old, "r", "before", b"1")
        .await
        .expect("old token works");

    // An upload under the old token is in flight when the token is revoked.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Error>>(4);
    tx.send(Ok(Bytes::from_static(b"first half ")))
        .await
        .expect("send");
    let uploader = old.clone();
    let upload = tokio::spawn(async move {
        uploader
            .put_artifact(
                &ns("r"),
                &name("key", "in-flight"),
                PutOptions::default(),
                tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
            )
            .await
    });
    // The upload has reached the server (and been let in) before the rotation.
    let metrics = server.metrics_addr.expect("metrics");
    wait_until("the upload to be in flight", || async {
        trove_tests::harness::scrape(metrics)
            .await
            .lines()
            .filter_map(|l| l.strip_prefix("trove_requests_in_flight "))
            .any(|v| v.trim().parse::<f64>().is_ok_and(|n| n >= 1.0))
    })
    .await;
    std::fs::write(
        &grants,
        token_entry("new", "token-new", &["*"], &["read", "write"]),
    )
    .expect("rotate");
    hang_up(&server);
    wait_until("the old token to be revoked", || async {
        matches!(
            put_artifact(&old, "r", "after", b"2").await,
            Err(Error::Unauthenticated { .. })
        )
    })
    .await;
    put_artifact(&new, "r", "new", b"3")
        .await
        .expect("the new token works");
    tx.send(Ok(Bytes::from_static(b"second half")))
        .await
        .expect("send");
    drop(tx);
    upload
        .await
        .expect("join")
        .expect("the call started before the rotation finishes");
    assert_eq!(
        get_artifact(&new, "r", "in-flight").await.expect("get"),
        b"first half second half"
    );

    std::fs::write(&grants, "this is = not [ a grants file").expect("break");
    hang_up(&server);
    wait_until("the broken file to be reported", || async {
        server.log().contains("grants file not reloaded")
    })
    .await;
    put_artifact(&new, "r", "still", b"4")
        .await
        .expect("grants stay in force");
}

/// A non-loopback address without tokens or client certificates is refused
/// at start, naming the three ways out; with one of them the server starts.
#[tokio::test]
async fn refuses_to_serve_openly_on_a_public_address() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = std::process::Command::new(server_binary())
        .args([
            "--listen",
            "0.0.0.0:0",
            "--metrics-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .output()
        .expect("run trove-server");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for flag in [
        "--auth-tokens",
        "--tls-client-ca",
        "--allow-unauthenticated",
    ] {
        assert!(stderr.contains(flag), "{flag} missing from: {stderr}");
    }
    let grants = dir.path().join("grants.toml");
    std::fs::write(&grants, token_entry("t", "token", &["*"], &["read"])).expect("grants");
    for extra in [
        vec!["--allow-unauthenticated".to_owned()],
        vec![
            "--auth-tokens".to_owned(),
            grants.to_string_lossy().into_owned(),
        ],
    ] {
        assert!(starts_listening(dir.path(), &extra), "{extra:?}");
    }
}

/// Whether the server on 0.0.0.0 with `extra` flags gets as far as listening.
fn starts_listening(dir: &Path, extra: &[String]) -> bool {
    use std::io::BufRead;
    let mut child = std::process::Command::new(server_binary())
        .args([
            "--listen",
            "0.0.0.0:0",
            "--metrics-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir.join(format!("data-{}", extra.len())))
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let listening = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.starts_with("listening on "));
    let _ = child.kill();
    let _ = child.wait();
    listening
}

/// With a metrics token, `/metrics` answers 401 without it and 200 with it.
#[tokio::test]
async fn metrics_token_guards_the_endpoint() {
    let server =
        ServerProcess::start_with(&["--metrics-token-sha256", &token_hash("scrape-me")]).await;
    let metrics = server.metrics_addr.expect("metrics");
    let status = |header: Option<&'static str>| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(metrics)
            .await
            .expect("connect");
        let auth = header
            .map(|h| format!("authorization: {h}\r\n"))
            .unwrap_or_default();
        stream
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response.lines().next().unwrap_or_default().to_owned()
    };
    assert!(status(None).await.contains("401"));
    assert!(status(Some("Bearer wrong")).await.contains("401"));
    assert!(status(Some("Bearer scrape-me")).await.contains("200"));
}

/// With `--tls-min-version 1.3`, a client that offers only TLS 1.2 fails
/// its handshake, and one offering 1.3 completes it; by default 1.2 works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_minimum_version_is_enforced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new("trove test CA");
    let (cert, key) = ca.server(&["127.0.0.1"], false).write(dir.path(), "server");
    let trusted = ClientOptions {
        ca_pem: Some(ca.pem.clone().into_bytes()),
        ..Default::default()
    };
    let paths = [
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    ];
    let strict = ServerProcess::start_secure(
        &[
            "--tls-cert",
            &paths[0],
            "--tls-key",
            &paths[1],
            "--tls-min-version",
            "1.3",
        ],
        trusted.clone(),
    )
    .await;
    let relaxed =
        ServerProcess::start_secure(&["--tls-cert", &paths[0], "--tls-key", &paths[1]], trusted)
            .await;
    let pem = ca.pem.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        [
            handshake(&pem, strict.addr, &rustls::version::TLS12),
            handshake(&pem, strict.addr, &rustls::version::TLS13),
            handshake(&pem, relaxed.addr, &rustls::version::TLS12),
        ]
    })
    .await
    .expect("join");
    assert!(
        outcomes[0].is_err(),
        "TLS 1.2 against a 1.3-only server must fail"
    );
    assert!(outcomes[1].is_ok(), "TLS 1.3: {:?}", outcomes[1]);
    assert!(outcomes[2].is_ok(), "TLS 1.2 by default: {:?}", outcomes[2]);
}

/// Completes a TLS handshake with `addr`, offering only `version`.
fn handshake(
    ca_pem: &str,
    addr: std::net::SocketAddr,
    version: &'static rustls::SupportedProtocolVersion,
) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use std::io::Write;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server_name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), server_name)
        .map_err(|e| e.to_string())?;
    let socket = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut stream = rustls::StreamOwned::new(connection, socket);
    // Writing drives the handshake to completion (or failure).
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .map_err(|e| e.to_string())?;
    stream.flush().map_err(|e| e.to_string())?;
    Ok(())
}
