//! The cache through the real binary: wire-level validation of scopes,
//! refs and metadata, which must change nothing.

use bytes::Bytes;
use tonic::Code;
use trove_proto::pb;
use trove_proto::pb::cache_client::CacheClient;
use trove_tests::harness::ServerProcess;

fn scope(branch: &str, default: &str) -> pb::CacheScope {
    pb::CacheScope {
        namespace: "cache-bad".into(),
        prefix: "p".into(),
        branch: branch.into(),
        default_branch: default.into(),
        test_suite_id: String::new(),
    }
}

fn upload(
    scope: Option<pb::CacheScope>,
    reference: &str,
    tree_sha: Option<String>,
) -> Vec<pb::UploadRequest> {
    vec![pb::UploadRequest {
        header: Some(pb::UploadHeader {
            scope,
            r#ref: reference.into(),
            tree_sha,
            uploaded_at: None,
            size: None,
        }),
        data: Bytes::from_static(b"archive"),
        finish: true,
    }]
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "{:?} should mention {needle:?}",
                status.message()
            );
        }
        Ok(value) => panic!("expected {code:?}, got {value:?}"),
    }
}

/// Empty refs, bad scopes and oversize metadata are INVALID_ARGUMENT and store nothing.
#[tokio::test]
async fn bad_cache_input_is_rejected_and_changes_nothing() {
    let server = ServerProcess::start().await;
    let mut cache = CacheClient::new(server.channel().await);
    let long = "x".repeat(2048);
    let cases = [
        (upload(Some(scope("main", "main")), "", None), "header.ref"),
        (upload(None, "sha", None), "header.scope"),
        (
            upload(Some(scope("", "main")), "sha", None),
            "header.scope.branch",
        ),
        (
            upload(Some(scope("main", "")), "sha", None),
            "header.scope.default_branch",
        ),
        (
            upload(
                Some(pb::CacheScope {
                    prefix: "a\0".into(),
                    ..scope("main", "main")
                }),
                "sha",
                None,
            ),
            "header.scope.prefix",
        ),
        (
            upload(
                Some(pb::CacheScope {
                    test_suite_id: long.clone(),
                    ..scope("main", "main")
                }),
                "sha",
                None,
            ),
            "test_suite_id",
        ),
        (
            upload(Some(scope("main", "main")), &long, None),
            "header.ref",
        ),
        (
            upload(Some(scope("main", "main")), "sha", Some(long.clone())),
            "header.tree_sha",
        ),
    ];
    for (messages, needle) in cases {
        assert_status(
            cache.upload(futures::stream::iter(messages)).await,
            Code::InvalidArgument,
            needle,
        );
    }
    let refs: std::collections::HashMap<String, i64> =
        (0..100_001).map(|i| (format!("{i:x}"), 1)).collect();
    let oversize = pb::WriteBranchRefsRequest {
        namespace: "cache-bad".into(),
        prefix: "p".into(),
        branch: "feature".into(),
        default_branch: "main".into(),
        refs,
    };
    assert_status(
        cache.write_branch_refs(oversize).await,
        Code::InvalidArgument,
        "refs",
    );
    let bad_key = pb::WriteBranchRefsRequest {
        namespace: "cache-bad".into(),
        prefix: "p".into(),
        branch: "feature".into(),
        default_branch: "main".into(),
        refs: [(String::new(), 1)].into(),
    };
    assert_status(
        cache.write_branch_refs(bad_key).await,
        Code::InvalidArgument,
        "refs key",
    );
    let nul_ref = pb::DownloadRequest {
        scope: Some(scope("main", "main")),
        r#ref: "a\0".into(),
        tree_sha: None,
    };
    assert_status(
        cache.download(nul_ref).await.map(|_| ()),
        Code::InvalidArgument,
        "ref",
    );
    let bad_token = pb::ListRefsRequest {
        scope: Some(scope("main", "main")),
        page_size: 0,
        page_token: "zz".into(),
    };
    assert_status(
        cache.list_refs(bad_token).await,
        Code::InvalidArgument,
        "page_token",
    );
    // Nothing was stored anywhere: not in any tier, branch map or pointer
    // (every tree of the database is empty), and no blob or staged file.
    let refs = cache
        .branch_refs(pb::BranchRefsRequest {
            namespace: "cache-bad".into(),
            prefix: "p".into(),
            branch: "feature".into(),
        })
        .await
        .expect("branch refs")
        .into_inner();
    assert!(refs.refs.is_empty());
    let mut server = server;
    server.kill9();
    let data_dir = server.data_dir.clone();
    let stats = tokio::task::spawn_blocking(move || {
        trove_server::SledStore::open(&data_dir, Default::default()).and_then(|store| store.stats())
    })
    .await
    .expect("join")
    .expect("open the data directory");
    assert_eq!(
        (stats.keys, stats.blob_files, stats.staged_files),
        (0, 0, 0),
        "something was stored: {stats:?}"
    );
    server.restart().await;
    let mut cache = CacheClient::new(server.channel().await);
    // An empty ref is a miss for Download, not an error.
    let miss = pb::DownloadRequest {
        scope: Some(scope("main", "main")),
        r#ref: String::new(),
        tree_sha: None,
    };
    let mut stream = cache.download(miss).await.expect("download").into_inner();
    let first = stream
        .message()
        .await
        .expect("message")
        .expect("one message");
    assert!(!first.found);
    assert!(stream.message().await.expect("end").is_none());
}
