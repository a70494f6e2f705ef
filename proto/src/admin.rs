//! Operator reads: exact usage per namespace, operation group and cache
//! tier. Implemented by the server's stores and by the remote client.

use async_trait::async_trait;

use crate::error::Result;
pub use crate::pb::UsageRow;
use crate::types::Namespace;

/// Group name of content-addressed objects.
pub const GROUP_OBJECTS: &str = "objects";
/// Group name of chunk streams.
pub const GROUP_STREAMS: &str = "streams";
/// Group name of artifacts.
pub const GROUP_ARTIFACTS: &str = "artifacts";
/// Group name of cassettes (items only; their entries count the bytes).
pub const GROUP_CASSETTES: &str = "cassettes";
/// Group name of the entries of live cassettes.
pub const GROUP_ENTRIES: &str = "entries";
/// Group name of cache archives, one row per tier.
pub const GROUP_CACHE: &str = "cache";

/// What a store holds, counted as it is written.
///
/// Contract:
/// - `namespace_usage(Some(ns))` has only rows of `ns`; `namespace_usage(None)` has every
///   namespace's. Rows are sorted by namespace, then group (then prefix and
///   tier for the cache). A group holding nothing has no row.
/// - Figures are exact: they change in the same durable write as the data,
///   and never report a write that is not yet durable.
/// - A store that does not count usage answers `FailedPrecondition`.
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// The usage rows of `namespace`, or of every namespace.
    async fn namespace_usage(&self, namespace: Option<&Namespace>) -> Result<Vec<UsageRow>>;
}
