//! The stream chunk codec both engines store stream bodies in (a body is a
//! run of `[flags][timestamp i64 BE if flagged][len u32 BE][data]` records),
//! and the zero-copy slicing of bodies into read chunks.

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, BufReader};
use trove_proto::objects::{ChunkStream, StreamChunk};
use trove_proto::Error;

const HAS_TIMESTAMP: u8 = 1;

/// Encodes one chunk as `[flags][timestamp i64 BE if flagged][len u32 BE][data]`.
pub(crate) fn encode_chunk(chunk: &StreamChunk) -> Result<bytes::Bytes, Error> {
    let len = u32::try_from(chunk.data.len())
        .map_err(|_| Error::invalid("chunks.data", "a chunk is larger than 4 GiB"))?;
    let mut out = Vec::with_capacity(chunk.data.len() + 13);
    match chunk.timestamp {
        Some(ts) => {
            out.push(HAS_TIMESTAMP);
            out.extend_from_slice(&ts.to_be_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&chunk.data);
    Ok(out.into())
}

/// Decodes the chunk records of a stream body, lazily.
pub(crate) fn decode_chunks(
    reader: impl tokio::io::AsyncRead + Send + Unpin + 'static,
    expected: u64,
    body_len: u64,
) -> ChunkStream {
    let damaged = |e: std::io::Error| Error::DataLoss {
        message: format!("stream body is damaged: {e}"),
    };
    futures::stream::try_unfold(
        (BufReader::new(reader), 0u64, body_len),
        move |(mut r, seen, left)| async move {
            let mut flags = [0u8; 1];
            if r.read(&mut flags).await.map_err(damaged)? == 0 {
                if seen != expected {
                    return Err(Error::DataLoss {
                        message: format!("stream body holds {seen} chunks, expected {expected}"),
                    });
                }
                return Ok(None);
            }
            let timestamp = if flags[0] & HAS_TIMESTAMP != 0 {
                Some(r.read_i64().await.map_err(damaged)?)
            } else {
                None
            };
            let len = r.read_u32().await.map_err(damaged)?;
            let header = if timestamp.is_some() { 13 } else { 5 };
            // Trust no stored length past the end of the body.
            let Some(left) = left.checked_sub(header + u64::from(len)) else {
                return Err(Error::DataLoss {
                    message: format!(
                        "stream body is damaged: a chunk claims {len} bytes past its end"
                    ),
                });
            };
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data).await.map_err(damaged)?;
            Ok(Some((
                StreamChunk {
                    data: data.into(),
                    timestamp,
                },
                (r, seen + 1, left),
            )))
        },
    )
    .boxed()
}

/// Splits `data` into a stream of chunks of at most `chunk` bytes (zero-copy).
pub fn chunked(data: Bytes, chunk: usize) -> impl Iterator<Item = Bytes> {
    let chunk = chunk.max(1);
    let len = data.len();
    (0..len.div_ceil(chunk)).map(move |i| data.slice(i * chunk..len.min((i + 1) * chunk)))
}

/// Counts what a stream upload carries while it is encoded.
#[derive(Debug, Clone, Default)]
pub struct StreamTally {
    chunks: std::sync::Arc<std::sync::atomic::AtomicU64>,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl StreamTally {
    /// Chunks and data bytes seen so far: `(chunk_count, total_bytes)`.
    pub fn totals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.chunks.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// A stream upload as the body an engine stores (the chunk records in
/// order), and a tally of its chunks and data bytes to read once the body
/// has been drained.
pub fn encode_stream(chunks: ChunkStream) -> (trove_proto::types::ByteStream, StreamTally) {
    use std::sync::atomic::Ordering;
    let tally = StreamTally::default();
    let counting = tally.clone();
    let body = chunks
        .map(move |chunk| {
            let chunk = chunk?;
            counting.chunks.fetch_add(1, Ordering::Relaxed);
            counting
                .bytes
                .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            encode_chunk(&chunk)
        })
        .boxed();
    (body, tally)
}

/// Reads a stored body while hashing it, and fails at its end (with
/// `InvalidData`, which readers report as DATA_LOSS) when the bytes do not
/// hash to the SHA-256 recorded when they were written: a flipped bit on
/// disk is refused instead of served.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Option<sha2::Sha256>,
    expected: [u8; 32],
}

impl<R> VerifyingReader<R> {
    /// Verifies `inner` against `expected`.
    pub fn new(inner: R, expected: [u8; 32]) -> Self {
        use sha2::Digest;
        VerifyingReader {
            inner,
            hasher: Some(sha2::Sha256::new()),
            expected,
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for VerifyingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use sha2::Digest;
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            let read = &buf.filled()[before..];
            if read.is_empty() {
                // The end: compare once.
                if let Some(hasher) = self.hasher.take() {
                    let actual: [u8; 32] = hasher.finalize().into();
                    if actual != self.expected {
                        return std::task::Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "the stored bytes hash to {}, not to the recorded {}",
                                hex::encode(actual),
                                hex::encode(self.expected)
                            ),
                        )));
                    }
                }
            } else if let Some(hasher) = self.hasher.as_mut() {
                hasher.update(read);
            }
        }
        polled
    }
}
