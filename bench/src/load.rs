//! Load generation: a closed loop (a fixed number of callers, each starting
//! its next call when the last one returns) to find peak throughput, and an
//! open loop (calls scheduled at a fixed rate) to read latency at a given
//! load without coordinated omission.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use serde::Serialize;

/// One call of a workload. Gets a sequence number unique within the run and
/// returns the number of payload bytes it moved.
pub type Op = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<u64>> + Send + Sync>;

/// Wraps a closure returning a future as an [`Op`].
pub fn op<F, Fut>(f: F) -> Op
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64>> + Send + 'static,
{
    Arc::new(move |seq| Box::pin(f(seq)))
}

/// Latencies are recorded in microseconds, up to an hour, to 3 significant digits.
fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("create latency histogram")
}

/// What one measurement produced.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Calls completed.
    pub ops: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Wall time of the measurement.
    pub elapsed: Duration,
    /// Latency of every call, in microseconds.
    pub histogram: Histogram<u64>,
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest call.
    pub max_us: u64,
}

impl Measured {
    /// Completed calls per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Payload bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }

    /// Percentiles from the histogram.
    pub fn latency(&self) -> Latency {
        Latency {
            p50_us: self.histogram.value_at_quantile(0.50),
            p99_us: self.histogram.value_at_quantile(0.99),
            p999_us: self.histogram.value_at_quantile(0.999),
            max_us: self.histogram.max(),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Shared sequence numbers, so that calls of one workload never reuse a key
/// by accident across measurements.
#[derive(Debug, Default)]
pub struct Sequence(AtomicU64);

impl Sequence {
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// Runs `op` from `concurrency` callers until `duration` has passed (each
/// caller finishes at least one call), and records every call's latency.
pub async fn closed_loop(
    concurrency: usize,
    duration: Duration,
    seq: &Arc<Sequence>,
    op: &Op,
) -> Result<Measured> {
    let deadline = Instant::now() + duration;
    closed_loop_while(
        concurrency,
        seq,
        op,
        Arc::new(move || Instant::now() < deadline),
    )
    .await
}

/// Runs `op` from `concurrency` callers as long as `keep_going` says so
/// (each caller finishes at least one call), and records every call's
/// latency: the load beside a task that runs for as long as it needs.
pub async fn closed_loop_while(
    concurrency: usize,
    seq: &Arc<Sequence>,
    op: &Op,
    keep_going: Arc<dyn Fn() -> bool + Send + Sync>,
) -> Result<Measured> {
    let start = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let op = Arc::clone(op);
        let seq = Arc::clone(seq);
        let keep_going = Arc::clone(&keep_going);
        workers.push(tokio::spawn(async move {
            let mut histogram = new_histogram()?;
            let (mut ops, mut bytes) = (0u64, 0u64);
            loop {
                let began = Instant::now();
                bytes += op(seq.next()).await?;
                histogram.saturating_record(micros(began.elapsed()));
                ops += 1;
                if !keep_going() {
                    break;
                }
            }
            anyhow::Ok((ops, bytes, histogram))
        }));
    }
    collect(workers, start).await
}

/// Starts calls at `rate` per second for `duration`, with at most
/// `concurrency` in flight. Latency counts from the moment a call was due,
/// so a stalled server shows up in the percentiles instead of silently
/// lowering the offered load.
pub async fn open_loop(
    rate: f64,
    duration: Duration,
    concurrency: usize,
    seq: &Arc<Sequence>,
    op: &Op,
) -> Result<Measured> {
    // Rates and durations are small positive numbers; the float-to-int cast
    // saturates, so nothing can wrap.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let total = (rate * duration.as_secs_f64()).ceil().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-9));
    let start = Instant::now();
    let slots = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let op = Arc::clone(op);
        let seq = Arc::clone(seq);
        let slots = Arc::clone(&slots);
        workers.push(tokio::spawn(async move {
            let mut histogram = new_histogram()?;
            let (mut ops, mut bytes) = (0u64, 0u64);
            loop {
                let slot = slots.fetch_add(1, Ordering::Relaxed);
                if slot >= total {
                    break;
                }
                let due = start + interval.mul_f64(slot as f64);
                tokio::time::sleep_until(due.into()).await;
                bytes += op(seq.next()).await?;
                histogram.saturating_record(micros(due.elapsed()));
                ops += 1;
            }
            anyhow::Ok((ops, bytes, histogram))
        }));
    }
    collect(workers, start).await
}

type WorkerResult = Result<(u64, u64, Histogram<u64>)>;

async fn collect(
    workers: Vec<tokio::task::JoinHandle<WorkerResult>>,
    start: Instant,
) -> Result<Measured> {
    let mut histogram = new_histogram()?;
    let (mut ops, mut bytes) = (0u64, 0u64);
    for worker in workers {
        let (o, b, h) = worker.await.context("load worker panicked")??;
        ops += o;
        bytes += b;
        histogram.add(h).context("merge histograms")?;
    }
    Ok(Measured {
        ops,
        bytes,
        elapsed: start.elapsed(),
        histogram,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closed_loop_counts_every_call_and_byte() {
        let seq = Arc::new(Sequence::default());
        let measured = closed_loop(
            3,
            Duration::from_millis(20),
            &seq,
            &op(|_| async { Ok(10) }),
        )
        .await
        .expect("measurement succeeds");
        assert!(measured.ops >= 3);
        assert_eq!(measured.bytes, measured.ops * 10);
        assert_eq!(measured.histogram.len(), measured.ops);
        assert_eq!(seq.0.load(Ordering::Relaxed), measured.ops);
    }

    #[tokio::test]
    async fn open_loop_issues_exactly_the_scheduled_calls() {
        let seq = Arc::new(Sequence::default());
        let measured = open_loop(
            1000.0,
            Duration::from_millis(50),
            4,
            &seq,
            &op(|_| async { Ok(1) }),
        )
        .await
        .expect("measurement succeeds");
        assert_eq!(measured.ops, 50);
        assert!(measured.elapsed >= Duration::from_millis(49));
    }

    #[tokio::test]
    async fn a_failing_call_fails_the_measurement() {
        let seq = Arc::new(Sequence::default());
        let result = closed_loop(
            2,
            Duration::from_millis(5),
            &seq,
            &op(|_| async { anyhow::bail!("refused") }),
        )
        .await;
        assert!(result
            .expect_err("the failing call fails the run")
            .to_string()
            .contains("refused"));
    }
}
