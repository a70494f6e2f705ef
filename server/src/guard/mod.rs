//! Protection against slow, stalled and hostile callers: what one caller may
//! hold of the server (memory in half-sent messages, calls, connections) and
//! how long the server waits for it.
//!
//! - [`intake`]: the request-body guard (server-wide budget for partly
//!   received messages; first-message, idle and minimum-rate limits).
//! - [`peers`]: per-peer caps on connections and calls, and the handle that
//!   lets a call close its connection.
//!
//! The call layer ([`crate::telemetry::calls`]) applies both to every call;
//! the server wraps every accepted connection.

pub mod intake;
pub mod peers;

use std::sync::Arc;

pub use intake::{Budget, IntakeLimits};
pub use peers::{ConnHandle, GuardedConn, GuardedInfo, PeerCounter};

/// Most health and reflection calls served at once. They have a slot pool of
/// their own, so probes keep answering when every call slot is taken, and a
/// flood of them cannot take the calls' slots.
pub const PROBE_CONCURRENCY: usize = 64;

/// Largest health or reflection request accepted, in bytes: their requests
/// are a service or symbol name.
pub const PROBE_MAX_MESSAGE_BYTES: usize = 4096;

/// How long a call may keep its response open past its deadline without
/// reading it (HTTP/2 flow control then stops the server from ending it)
/// before its connection is closed.
pub const STALLED_RESPONSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The guards one server shares between its calls.
#[derive(Debug, Clone)]
pub struct Guards {
    /// Limits on request bodies.
    pub intake: IntakeLimits,
    /// Calls held per peer address.
    pub calls_per_peer: Arc<PeerCounter>,
}

impl Guards {
    /// No limits beyond counting (for tests and embedders).
    pub fn unlimited() -> Self {
        Guards {
            intake: IntakeLimits::unlimited(),
            calls_per_peer: PeerCounter::new(0),
        }
    }
}
