//! Cassette runs as sorted frame streams, and the bounded merge that reads
//! a cassette (and compacts it) without holding it in memory.
//!
//! A sorted run's body is frames `[recorded_at i64 BE][offset u64 BE]
//! [len u32 BE][json]` in read order (`recorded_at`, then arrival number);
//! an entry's arrival number is its run's first plus its offset, so a body
//! can be staged before the append knows where its run will start.
//! Appends sort their batch; replaces sort their input in chunks of at most
//! [`SORT_CHUNK_BYTES`], one run per chunk. A read opens every run of one
//! head and merges them with a heap: it holds one frame and one transport
//! chunk per run, whatever the cassette's size. Runs written by version 1
//! (unsorted, positional) are read whole and sorted, as before.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use trove_proto::types::ByteStream;
use trove_proto::Error;

use super::formats::{decode_run, Run};

/// One entry as stored: `(recorded_at, seq, json)`.
pub(super) type Stored = (i64, u64, Bytes);

/// Most bytes of entries a replace sorts in memory at once (one run each).
#[cfg(not(test))]
pub(super) const SORT_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Small in unit tests, so that a few megabytes exercise the tiered merge.
#[cfg(test)]
pub(super) const SORT_CHUNK_BYTES: usize = 64 * 1024;

/// Bytes of frame header in a sorted run.
const HEADER: usize = 20;

/// Appends the frame of one entry (`seq` being its offset in its run) to
/// `out`.
pub(super) fn push_frame(
    out: &mut BytesMut,
    (recorded_at, seq, json): &Stored,
) -> Result<(), Error> {
    let len = u32::try_from(json.len())
        .map_err(|_| Error::invalid("entries", "an entry is larger than 4 GiB"))?;
    out.extend_from_slice(&recorded_at.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(json);
    Ok(())
}

/// The body of a sorted run of `entries` (given in arrival order): sorted by
/// `recorded_at`, arrival order breaking ties.
pub(super) fn sorted_body(entries: impl IntoIterator<Item = (i64, Bytes)>) -> Result<Bytes, Error> {
    let mut stored: Vec<Stored> = entries
        .into_iter()
        .zip(0..)
        .map(|((recorded_at, json), seq)| (recorded_at, seq, json))
        .collect();
    stored.sort_by_key(|(recorded_at, seq, _)| (*recorded_at, *seq));
    let mut out = BytesMut::new();
    for entry in &stored {
        push_frame(&mut out, entry)?;
    }
    Ok(out.freeze())
}

fn damaged(what: &str) -> Error {
    Error::DataLoss {
        message: format!("cassette run is damaged: {what}"),
    }
}

/// Reads one run's entries in read order.
pub(super) struct RunReader {
    source: Source,
    run: Run,
    read: u64,
}

enum Source {
    /// A sorted run, parsed as its bytes arrive.
    Streamed {
        body: Option<ByteStream>,
        buffer: BytesMut,
    },
    /// A version 1 run, read whole and sorted on first use.
    Legacy {
        body: Option<ByteStream>,
        sorted: Option<VecDeque<Stored>>,
    },
}

impl RunReader {
    /// A reader of `run` over its body's bytes.
    pub(super) fn new(run: Run, body: ByteStream) -> Self {
        let source = if run.sorted {
            Source::Streamed {
                body: Some(body),
                buffer: BytesMut::new(),
            }
        } else {
            Source::Legacy {
                body: Some(body),
                sorted: None,
            }
        };
        RunReader {
            source,
            run,
            read: 0,
        }
    }

    /// The next entry, or `None` at the end of the run.
    pub(super) async fn next(&mut self) -> Result<Option<Stored>, Error> {
        let next = match &mut self.source {
            Source::Streamed { body, buffer } => loop {
                if buffer.len() >= HEADER {
                    let len = u32::from_be_bytes([buffer[16], buffer[17], buffer[18], buffer[19]])
                        as usize;
                    if buffer.len() >= HEADER + len {
                        let recorded_at = buffer.get_i64();
                        let seq = self.run.first_seq.saturating_add(buffer.get_u64());
                        buffer.advance(4);
                        let json = buffer.split_to(len).freeze();
                        break Some((recorded_at, seq, json));
                    }
                }
                match body.as_mut() {
                    Some(stream) => match stream.next().await {
                        Some(chunk) => buffer.extend_from_slice(&chunk?),
                        None => *body = None,
                    },
                    None if buffer.is_empty() => break None,
                    None => return Err(damaged("a frame is cut short")),
                }
            },
            Source::Legacy { body, sorted } => {
                if sorted.is_none() {
                    let mut whole = BytesMut::new();
                    if let Some(mut stream) = body.take() {
                        while let Some(chunk) = stream.next().await {
                            whole.extend_from_slice(&chunk?);
                        }
                    }
                    let mut entries = Vec::new();
                    decode_run(whole.freeze(), &self.run, &mut entries)?;
                    entries.sort_by_key(|(recorded_at, seq, _)| (*recorded_at, *seq));
                    *sorted = Some(entries.into());
                    // Counted by decode_run already.
                    self.read = self.run.count;
                }
                return Ok(sorted.as_mut().and_then(VecDeque::pop_front));
            }
        };
        match &next {
            Some((_, seq, _)) => {
                self.read += 1;
                let range = self.run.first_seq..self.run.first_seq + self.run.count;
                if !range.contains(seq) || self.read > self.run.count {
                    return Err(damaged("an entry lies outside its run's arrival numbers"));
                }
            }
            None if self.read != self.run.count => {
                return Err(damaged(
                    "it holds a different number of entries than its head says",
                ))
            }
            None => {}
        }
        Ok(next)
    }
}

/// Merges runs into one stream in read order (`recorded_at`, then arrival
/// number), holding one entry per run.
pub(super) fn merge(readers: Vec<RunReader>) -> BoxStream<'static, Result<Stored, Error>> {
    struct State {
        readers: Vec<RunReader>,
        heads: Vec<Option<Bytes>>,
        heap: BinaryHeap<Reverse<(i64, u64, usize)>>,
        started: bool,
        failed: bool,
    }
    let heads = readers.iter().map(|_| None).collect();
    let state = State {
        readers,
        heads,
        heap: BinaryHeap::new(),
        started: false,
        failed: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if state.failed {
            return None;
        }
        if !state.started {
            state.started = true;
            for i in 0..state.readers.len() {
                if let Err(err) =
                    refill(&mut state.readers, &mut state.heads, &mut state.heap, i).await
                {
                    state.failed = true;
                    return Some((Err(err), state));
                }
            }
        }
        let Reverse((recorded_at, seq, i)) = state.heap.pop()?;
        let json = state.heads[i].take().unwrap_or_default();
        if let Err(err) = refill(&mut state.readers, &mut state.heads, &mut state.heap, i).await {
            state.failed = true;
            return Some((Err(err), state));
        }
        Some((Ok((recorded_at, seq, json)), state))
    })
    .boxed()
}

async fn refill(
    readers: &mut [RunReader],
    heads: &mut [Option<Bytes>],
    heap: &mut BinaryHeap<Reverse<(i64, u64, usize)>>,
    i: usize,
) -> Result<(), Error> {
    if let Some((recorded_at, seq, json)) = readers[i].next().await? {
        heads[i] = Some(json);
        heap.push(Reverse((recorded_at, seq, i)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::record::Body;
    use futures::TryStreamExt;

    fn run(first_seq: u64, count: u64) -> Run {
        Run {
            id: 0,
            first_seq,
            count,
            body: Body::Inline(Vec::new()),
            sorted: true,
            bytes: 0,
        }
    }

    /// A body delivered in awkward pieces, so frames straddle chunks.
    fn pieces(body: Bytes, size: usize) -> ByteStream {
        let chunks: Vec<Result<Bytes, Error>> = body
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(chunks).boxed()
    }

    /// Runs merge in read order, ties in arrival order, across chunk cuts.
    #[tokio::test]
    async fn runs_merge_in_read_order() {
        let a = sorted_body([(5, "a0"), (1, "a1"), (5, "a2")].map(|(t, j)| (t, Bytes::from(j))))
            .expect("a");
        let b = sorted_body(
            [(5, "b0"), (0, "b1"), (9, "b2"), (1, "b3")].map(|(t, j)| (t, Bytes::from(j))),
        )
        .expect("b");
        let readers = vec![
            RunReader::new(run(0, 3), pieces(a, 7)),
            RunReader::new(run(3, 4), pieces(b, 3)),
        ];
        let merged: Vec<Stored> = merge(readers).try_collect().await.expect("merge");
        let order: Vec<&[u8]> = merged.iter().map(|(_, _, j)| j.as_ref()).collect();
        assert_eq!(
            order,
            [&b"b1"[..], b"a1", b"b3", b"a0", b"a2", b"b0", b"b2"]
        );
    }

    /// A run cut short or holding the wrong count is DATA_LOSS.
    #[tokio::test]
    async fn damaged_runs_are_data_loss() {
        let body = sorted_body([(1, Bytes::from("x")), (2, Bytes::from("y"))]).expect("body");
        let cut = body.slice(..body.len() - 1);
        let err = merge(vec![RunReader::new(run(0, 2), pieces(cut, 4))])
            .try_collect::<Vec<_>>()
            .await
            .expect_err("cut short");
        assert!(matches!(err, Error::DataLoss { .. }), "{err:?}");
        let err = merge(vec![RunReader::new(run(0, 3), pieces(body, 4))])
            .try_collect::<Vec<_>>()
            .await
            .expect_err("wrong count");
        assert!(matches!(err, Error::DataLoss { .. }), "{err:?}");
    }
}
