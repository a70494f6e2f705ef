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
pub mod seaweedfs;
pub mod target;

use bytes::Bytes;
use futures::StreamExt;
use trove_proto::types::ByteStream;
use trove_proto::Error;

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
