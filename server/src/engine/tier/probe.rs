//! Watching the upstream: its standard health check, asked every second.
//! What it finds feeds the `trove.upstream` health status and lets calls
//! fail at once while the upstream cannot be reached.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trove_client::TroveClient;
use trove_proto::Error;

/// How often the upstream's health is checked.
const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// How long a check may take: past the connect timeout, so that a slow
/// connection is not taken for an outage.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Checks in a row that must fail to reach the upstream before calls are
/// refused without trying: one lost check is not an outage.
const FAILURES_BEFORE_DOWN: u32 = 2;

/// What the health checks of the upstream found.
#[derive(Debug, Default)]
pub(super) struct UpstreamState {
    serving: AtomicBool,
    failures: AtomicU32,
    /// Why the last check did not reach the upstream.
    last_failure: Mutex<String>,
}

impl UpstreamState {
    /// True when the last check answered SERVING.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// True when the last [`FAILURES_BEFORE_DOWN`] checks could not reach
    /// the upstream at all (an upstream answering NOT_SERVING, while it
    /// drains or refuses writes, is reachable: its answers say why).
    pub fn down(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= FAILURES_BEFORE_DOWN
    }

    /// Why the last check did not reach the upstream.
    pub fn last_failure(&self) -> String {
        self.last_failure
            .lock()
            .map(|why| why.clone())
            .unwrap_or_default()
    }

    /// Records one check: reached (and whether SERVING), or not reached
    /// and why.
    fn record(&self, reached: bool, serving: bool, why: &str) {
        self.serving.store(reached && serving, Ordering::Relaxed);
        if reached {
            self.failures.store(0, Ordering::Relaxed);
        } else {
            if let Ok(mut last) = self.last_failure.lock() {
                why.clone_into(&mut last);
            }
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Checks the upstream's health every [`PROBE_PERIOD`] until `stop`,
/// keeping `state` current and logging each change.
pub(super) async fn watch(
    upstream: TroveClient,
    address: String,
    state: Arc<UpstreamState>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(PROBE_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let check = tokio::time::timeout(PROBE_TIMEOUT, upstream.serving("")).await;
        let (reached, serving, found) = match check {
            Ok(Ok(true)) => (true, true, "reachable and SERVING".to_owned()),
            Ok(Ok(false)) => (true, false, "reachable but NOT_SERVING".to_owned()),
            // Only a connection that fails or hangs means unreachable; any
            // other answer (no health service behind a proxy, a full call
            // budget) came from something alive, and calls may still work.
            Ok(Err(err @ (Error::Unavailable { .. } | Error::DeadlineExceeded { .. }))) => {
                (false, false, format!("unreachable: {err}"))
            }
            Ok(Err(err)) => (
                true,
                false,
                format!("reachable, but its health check failed: {err}"),
            ),
            Err(_) => (
                false,
                false,
                "unreachable: the health check timed out".to_owned(),
            ),
        };
        state.record(reached, serving, &found);
        // Log changes only (an error's text may vary between checks: its
        // kind is what changed).
        let kind = found.split(':').next().unwrap_or_default().to_owned();
        if last.as_deref() != Some(kind.as_str()) {
            if serving {
                tracing::info!(upstream = %address, "upstream {found}");
            } else {
                tracing::warn!(upstream = %address, "upstream {found}");
            }
            last = Some(kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failed_check_is_not_an_outage_and_one_answer_ends_it() {
        let state = UpstreamState::default();
        assert!(!state.down() && !state.serving());
        state.record(false, false, "unreachable: refused");
        assert!(!state.down(), "one lost check");
        state.record(false, false, "unreachable: refused");
        assert!(state.down());
        assert_eq!(state.last_failure(), "unreachable: refused");
        state.record(true, false, "");
        assert!(!state.down(), "NOT_SERVING is reachable");
        assert!(!state.serving());
        state.record(true, true, "");
        assert!(state.serving());
    }
}
