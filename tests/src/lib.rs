//! Test support for Trove: the conformance suite written once against the
//! storage traits, the targets it runs against (the sled store in-process and
//! the real `trove-server` binary through the client), and a harness that
//! starts, kills and restarts the real binary.
//!
//! # Layout
//! - [`harness`]: [`harness::ServerProcess`], the real binary on 127.0.0.1 with
//!   an ephemeral port and a temporary data directory.
//! - [`target`]: [`target::Target`], a store plus the data folder behind it.
//! - [`conformance`]: one `async fn` per documented behaviour, and the
//!   [`conformance_suite!`] macro that turns the list into tests.

pub mod conformance;
pub mod harness;
pub mod lazyfs;
pub mod pki;
pub mod raw;
pub mod seaweedfs;
pub mod target;

use bytes::Bytes;
use futures::StreamExt;
use trove_proto::types::ByteStream;
use trove_proto::Error;

/// Whether this run is under CI: `CI` set to anything but empty, `0` or
/// `false`. The one rule every environment-dependent test follows.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The file every skip is written to, one line each, so that a run can
/// count them (`.ci/run` prints the count): `target/test-skips.log`.
pub fn skip_log() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("test-skips.log")
}

/// Records that the calling test is skipped because of `why` (a missing
/// tool or cluster). Outside CI it prints the reason and the test returns;
/// under CI a skip is a failure: CI must run everything.
#[track_caller]
pub fn skip(why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_log())
    {
        let _ = writeln!(log, "{test}: {why}");
    }
    assert!(!under_ci(), "CI must not skip {test}: {why}");
    eprintln!("SKIPPED {test}: {why}");
}

/// A byte stream over in-memory pieces.
pub fn bytes_stream(pieces: Vec<Bytes>) -> ByteStream {
    futures::stream::iter(pieces.into_iter().map(Ok)).boxed()
}

/// A byte stream of `total` pseudo-random bytes (from `seed`), produced lazily
/// in pieces of `piece` bytes so that huge values never sit in memory.
pub fn generated_stream(seed: u64, total: u64, piece: usize) -> ByteStream {
    futures::stream::unfold((0u64, seed), move |(sent, state)| async move {
        if sent >= total {
            return None;
        }
        let n = usize::try_from((total - sent).min(piece as u64)).unwrap_or(piece);
        let (data, state) = pseudo_random(state, n);
        Some((Ok(data), (sent + n as u64, state)))
    })
    .boxed()
}

/// SHA-256 (hex) of what [`generated_stream`] produces, computed the same lazy way.
pub async fn generated_sha256(seed: u64, total: u64, piece: usize) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut stream = generated_stream(seed, total, piece);
    while let Some(Ok(chunk)) = stream.next().await {
        hasher.update(&chunk);
    }
    hex::encode(hasher.finalize())
}

fn pseudo_random(mut state: u64, n: usize) -> (Bytes, u64) {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        // splitmix64: fast, deterministic and good enough to defeat compression.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(n);
    (Bytes::from(out), state)
}

/// Drains a byte stream, returning its length and SHA-256 (hex).
pub async fn digest_stream(mut stream: ByteStream) -> Result<(u64, String), Error> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((len, hex::encode(hasher.finalize())))
}

/// Drains a byte stream into memory (small values only).
pub async fn collect_bytes(mut stream: ByteStream) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// SHA-256 (hex) of a byte slice.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Stores one item of every kind through any implementation: two artifacts,
/// an object, a stream of two chunks, a cassette of three entries and a
/// cache archive, all in `ns`. Returns their payload bytes (what a store's
/// logical-bytes gauge counts: values, chunk data, entry JSON, archives).
pub async fn store_one_of_each<S>(store: &S, ns: &trove_proto::types::Namespace) -> u64
where
    S: trove_proto::ObjectStore
        + trove_proto::ArtifactStore
        + trove_proto::EntryStore
        + trove_proto::CacheStore,
{
    use trove_proto::types::Name;
    let name = |field: &str, value: &str| Name::new(field, value).expect("valid name");
    let mut payload = 0u64;
    for (key, value) in [("a/one", &b"one"[..]), ("a/two", b"three")] {
        store
            .put_artifact(
                ns,
                &name("key", key),
                trove_proto::artifacts::PutOptions::default(),
                bytes_stream(vec![Bytes::copy_from_slice(value)]),
            )
            .await
            .expect("put artifact");
        payload += value.len() as u64;
    }
    let object = b"hello";
    store
        .put_object(
            ns,
            &name("hash", &sha256_hex(object)),
            None,
            bytes_stream(vec![Bytes::from_static(object)]),
        )
        .await
        .expect("put object");
    payload += object.len() as u64;
    let chunks = [&b"ab"[..], b"c"].map(|data| {
        Ok(trove_proto::objects::StreamChunk {
            data: Bytes::copy_from_slice(data),
            timestamp: None,
        })
    });
    store
        .put_stream(
            ns,
            &name("hash", "a-stream"),
            futures::stream::iter(chunks).boxed(),
        )
        .await
        .expect("put stream");
    payload += 3;
    let entries: Vec<_> = (1..=3)
        .map(|n| {
            let json = format!("{{\"n\":{n}}}");
            payload += json.len() as u64;
            trove_proto::entries::NewEntry::parse("entry", json.into(), None).expect("entry")
        })
        .collect();
    store
        .append_entries(
            ns,
            &name("cassette", "c"),
            entries,
            trove_proto::entries::AppendOptions::default(),
        )
        .await
        .expect("append");
    let scope = trove_proto::cache::CacheScope {
        namespace: ns.clone(),
        prefix: String::new(),
        branch: name("branch", "main"),
        default_branch: name("default_branch", "main"),
        test_suite_id: String::new(),
    };
    store
        .upload(
            &scope,
            &name("ref", "sha1"),
            trove_proto::cache::UploadOptions::default(),
            bytes_stream(vec![Bytes::from_static(b"zip!")]),
        )
        .await
        .expect("upload");
    payload + 4
}
