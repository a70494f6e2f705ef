//! Splitting one body between two tiers without holding it: the write-through
//! split (the local copy commits only once the upstream acknowledged) and the
//! read-through copy (what the upstream sends goes to the caller and into the
//! local tier at once).
//!
//! Both rely on the store contract that a body ending in an `Err` item (or
//! never ending cleanly) leaves the previous state untouched: the local copy
//! is given a clean end only when the whole write is known to have happened.

use futures::stream::{self, BoxStream};
use futures::{Future, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use trove_proto::{Error, Result};

/// Says, once a copy is complete, whether it may still be kept.
type StillCurrent = Box<dyn FnOnce() -> bool + Send>;

/// Pieces buffered per tier: enough to keep both writers busy, few enough
/// that a body is never held whole (pieces are at most a message each).
const BUFFERED_PIECES: usize = 2;

/// Why the local copy of a write was abandoned; never reaches a caller.
fn not_acknowledged() -> Error {
    Error::Unavailable {
        message: "the upstream did not acknowledge the write; the local copy is dropped".into(),
    }
}

/// A body ending cleanly only when `gate` says true.
fn gated<T: Send + 'static>(
    pieces: mpsc::Receiver<Result<T>>,
    gate: oneshot::Receiver<bool>,
) -> BoxStream<'static, Result<T>> {
    let end = stream::once(async move {
        match gate.await {
            Ok(true) => None,
            _ => Some(Err(not_acknowledged())),
        }
    })
    .filter_map(std::future::ready);
    ReceiverStream::new(pieces).chain(end).boxed()
}

/// Feeds `source` to both copies. Stops feeding the local copy once the
/// local write gave up (the write still goes upstream), and stops
/// everything once the upstream write gave up. A source error reaches both
/// copies, so neither is stored. `ended` says true only once `source`
/// ended cleanly.
async fn pump<T: Clone + Send + 'static>(
    mut source: BoxStream<'static, Result<T>>,
    upstream: mpsc::Sender<Result<T>>,
    local: mpsc::Sender<Result<T>>,
    ended: oneshot::Sender<bool>,
) {
    let mut local = Some(local);
    while let Some(piece) = source.next().await {
        let failed = piece.is_err();
        if let Some(tx) = &local {
            if tx.send(piece.clone()).await.is_err() {
                local = None;
            }
        }
        if upstream.send(piece).await.is_err() {
            // The upstream write ended early (it failed): so does the
            // local copy.
            if let Some(tx) = &local {
                let _ = tx.send(Err(not_acknowledged())).await;
            }
            return;
        }
        if failed {
            return;
        }
    }
    let _ = ended.send(true);
}

/// Writes `source` through both tiers at once: `upstream` and `local` are
/// given their copies of the body, and the local copy ends cleanly (commits)
/// only once the upstream write succeeded and `still_current` agrees (no
/// delete raced it), so the local tier never holds a value the upstream
/// does not. Returns both answers; a failed local copy is
/// not a failed write (the upstream holds the value).
pub(super) async fn write_through<T, UV, LV, U, L>(
    source: BoxStream<'static, Result<T>>,
    upstream: impl FnOnce(BoxStream<'static, Result<T>>) -> U,
    local: impl FnOnce(BoxStream<'static, Result<T>>) -> L,
    still_current: impl FnOnce() -> bool,
) -> (Result<UV>, Result<LV>)
where
    T: Clone + Send + 'static,
    U: Future<Output = Result<UV>>,
    L: Future<Output = Result<LV>>,
{
    let (upstream_tx, upstream_rx) = mpsc::channel::<Result<T>>(BUFFERED_PIECES);
    let (local_tx, local_rx) = mpsc::channel::<Result<T>>(BUFFERED_PIECES);
    let (gate_tx, gate_rx) = oneshot::channel();
    let (ended_tx, ended_rx) = oneshot::channel();
    // Gated too: if this call is dropped part way (its caller went away),
    // the upstream body must not end cleanly. The upstream client's
    // connection task may go on sending it after the call's future is gone,
    // and a clean end would commit whatever was sent.
    let upstream_write = upstream(gated(upstream_rx, ended_rx));
    let upstream_write = async move {
        let answer = upstream_write.await;
        let _ = gate_tx.send(answer.is_ok() && still_current());
        answer
    };
    let local_write = local(gated(local_rx, gate_rx));
    let ((), upstream_answer, local_answer) = futures::join!(
        pump(source, upstream_tx, local_tx, ended_tx),
        upstream_write,
        local_write
    );
    (upstream_answer, local_answer)
}

/// Copies what `body` yields into a local write while passing it on: the
/// local write (given the copy as its body by `keep`) is spawned and ends
/// cleanly only if `body` did, the caller read it to the end and
/// `still_current` agrees at that moment. A local
/// write that gives up only stops the copying.
pub(super) fn read_through<T, F>(
    body: BoxStream<'static, Result<T>>,
    keep: impl FnOnce(BoxStream<'static, Result<T>>) -> F,
    still_current: impl FnOnce() -> bool + Send + 'static,
) -> BoxStream<'static, Result<T>>
where
    T: Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T>>(BUFFERED_PIECES);
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(keep(gated(rx, done_rx)));
    struct Copying<T> {
        body: BoxStream<'static, Result<T>>,
        copy: Option<mpsc::Sender<Result<T>>>,
        done: Option<(oneshot::Sender<bool>, StillCurrent)>,
    }
    let state = Copying {
        body,
        copy: Some(tx),
        done: Some((done_tx, Box::new(still_current))),
    };
    stream::unfold(state, |mut state| async move {
        match state.body.next().await {
            Some(Ok(piece)) => {
                if let Some(tx) = &state.copy {
                    if tx.send(Ok(piece.clone())).await.is_err() {
                        state.copy = None;
                    }
                }
                Some((Ok(piece), state))
            }
            Some(Err(err)) => {
                // Dropping the gate's sender shuts the copy's end.
                state.done = None;
                state.copy = None;
                Some((Err(err), state))
            }
            None => {
                state.copy = None;
                if let Some((done, still_current)) = state.done.take() {
                    let _ = done.send(still_current());
                }
                None
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write-through whose caller went away part way: the upstream body,
    /// which a client's connection task may go on sending, ends in an
    /// error, never cleanly (a clean end would commit what was sent).
    #[tokio::test]
    async fn a_write_through_dropped_part_way_never_ends_the_upstream_body_cleanly() {
        let (seen_tx, seen_rx) = oneshot::channel::<Vec<Result<u8>>>();
        let source = stream::iter([Ok(1u8), Ok(2)])
            .chain(stream::pending())
            .boxed();
        let call = write_through(
            source,
            |body| {
                tokio::spawn(async move {
                    let _ = seen_tx.send(body.collect().await);
                });
                std::future::pending::<Result<()>>()
            },
            |body| async move {
                body.for_each(|_| async {}).await;
                Ok::<(), Error>(())
            },
            || true,
        );
        // The source stalls after its two pieces; the call is then dropped.
        let stalled = tokio::time::timeout(std::time::Duration::from_millis(50), call).await;
        assert!(stalled.is_err(), "the write cannot finish without its end");
        let seen = seen_rx.await.expect("the upstream body ended");
        assert!(
            matches!(seen.last(), Some(Err(_))),
            "the upstream body ended cleanly: {seen:?}"
        );
    }

    fn source(pieces: Vec<Result<u32>>) -> BoxStream<'static, Result<u32>> {
        stream::iter(pieces).boxed()
    }

    /// Reads a body to its end: its pieces, and whether it ended cleanly.
    async fn consume(mut body: BoxStream<'static, Result<u32>>) -> (Vec<u32>, bool) {
        let mut pieces = Vec::new();
        while let Some(piece) = body.next().await {
            match piece {
                Ok(piece) => pieces.push(piece),
                Err(_) => return (pieces, false),
            }
        }
        (pieces, true)
    }

    fn refusal() -> Error {
        Error::invalid("test", "refused at the end")
    }

    #[tokio::test]
    async fn the_local_copy_ends_cleanly_only_after_the_upstream_acknowledged() {
        let (upstream, local) = write_through(
            source((0..10).map(Ok).collect()),
            |body| async move { Ok(consume(body).await) },
            |body| async move { Ok(consume(body).await) },
            || true,
        )
        .await;
        assert_eq!(upstream, Ok(((0..10).collect(), true)));
        assert_eq!(local, Ok(((0..10).collect(), true)));

        // The upstream read everything, then failed (at its commit): the
        // local copy saw every piece but no clean end, so it stores nothing.
        let (upstream, local) = write_through(
            source((0..10).map(Ok).collect()),
            |body| async move {
                consume(body).await;
                Err::<(), _>(refusal())
            },
            |body| async move { Ok(consume(body).await) },
            || true,
        )
        .await;
        assert_eq!(upstream, Err(refusal()));
        assert_eq!(local, Ok(((0..10).collect(), false)));
    }

    #[tokio::test]
    async fn a_local_copy_that_gives_up_does_not_stop_the_write() {
        let (upstream, local) = write_through(
            source((0..50).map(Ok).collect()),
            |body| async move { Ok(consume(body).await) },
            |mut body| async move {
                let _ = body.next().await;
                Err::<(), _>(refusal())
            },
            || true,
        )
        .await;
        assert_eq!(upstream, Ok(((0..50).collect(), true)));
        assert_eq!(local, Err(refusal()));
    }

    #[tokio::test]
    async fn an_upstream_that_gives_up_early_fails_the_local_copy_and_stops_reading() {
        let (upstream, local) = write_through(
            source((0..50).map(Ok).collect()),
            |mut body| async move {
                let _ = body.next().await;
                Err::<(), _>(refusal())
            },
            |body| async move { Ok(consume(body).await) },
            || true,
        )
        .await;
        assert_eq!(upstream, Err(refusal()));
        let (pieces, clean) = local.expect("local answer");
        assert!(!clean);
        assert!(pieces.len() < 50, "read on after the upstream gave up");
    }

    #[tokio::test]
    async fn a_source_error_reaches_both_copies() {
        let (upstream, local) = write_through(
            source(vec![Ok(1), Ok(2), Err(refusal()), Ok(3)]),
            |body| async move { Ok(consume(body).await) },
            |body| async move { Ok(consume(body).await) },
            || true,
        )
        .await;
        assert_eq!(upstream, Ok((vec![1, 2], false)));
        assert_eq!(local, Ok((vec![1, 2], false)));
    }

    #[tokio::test]
    async fn a_read_through_copy_commits_only_when_the_caller_read_to_the_end() {
        for read_all in [true, false] {
            let (kept_tx, kept_rx) = oneshot::channel();
            let mut body = read_through(
                source((0..10).map(Ok).collect()),
                move |copy| async move {
                    let _ = kept_tx.send(consume(copy).await);
                },
                || true,
            );
            if read_all {
                while body.next().await.is_some() {}
            } else {
                let _ = body.next().await;
                drop(body);
            }
            let (pieces, clean) = kept_rx.await.expect("the copy finished");
            assert_eq!(clean, read_all);
            if read_all {
                assert_eq!(pieces, (0..10).collect::<Vec<_>>());
            }
        }
    }

    #[tokio::test]
    async fn a_read_through_error_fails_the_copy() {
        let (kept_tx, kept_rx) = oneshot::channel();
        let body = read_through(
            source(vec![Ok(1), Err(refusal())]),
            move |copy| async move {
                let _ = kept_tx.send(consume(copy).await);
            },
            || true,
        );
        let (pieces, clean) = consume(body).await;
        assert_eq!((pieces, clean), (vec![1], false));
        assert!(!kept_rx.await.expect("the copy finished").1);
    }

    #[tokio::test]
    async fn a_copy_overtaken_by_a_delete_is_not_kept() {
        let (upstream, local) = write_through(
            source((0..3).map(Ok).collect()),
            |body| async move { Ok(consume(body).await) },
            |body| async move { Ok(consume(body).await) },
            || false,
        )
        .await;
        assert_eq!(upstream, Ok(((0..3).collect(), true)));
        assert_eq!(local, Ok(((0..3).collect(), false)));
        let (kept_tx, kept_rx) = oneshot::channel();
        let body = read_through(
            source((0..3).map(Ok).collect()),
            move |copy| async move {
                let _ = kept_tx.send(consume(copy).await);
            },
            || false,
        );
        assert_eq!(consume(body).await, ((0..3).collect(), true));
        assert!(!kept_rx.await.expect("the copy finished").1);
    }
}
