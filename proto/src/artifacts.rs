//! The artifacts operation group: mutable blobs under string keys.
//! Implemented by the server's stores and by the remote client.

use async_trait::async_trait;

use crate::error::Result;
pub use crate::pb::{ArtifactInfo, ListedArtifact};
use crate::types::{ByteStream, ListPage, Name, Namespace, Page};

/// Largest value `list_artifacts` returns inline when asked for values.
pub const MAX_LISTED_VALUE_BYTES: u64 = 1024 * 1024;
/// Once a page's inline values add up to this much, the page ends early.
pub const MAX_LISTED_PAGE_BYTES: u64 = 8 * 1024 * 1024;
/// Longest content type accepted, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;

/// Options of an artifact upload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Media type recorded with the value (may be empty).
    pub content_type: String,
    /// When set, a body of any other length is rejected.
    pub expected_size: Option<u64>,
}

impl PutOptions {
    /// Validates the options as sent on the wire.
    pub fn new(content_type: &str, expected_size: Option<u64>) -> Result<Self> {
        if content_type.len() > MAX_CONTENT_TYPE_BYTES {
            return Err(crate::Error::invalid(
                "content_type",
                format!(
                    "is {} bytes long; the limit is {MAX_CONTENT_TYPE_BYTES} bytes",
                    content_type.len()
                ),
            ));
        }
        if content_type.chars().any(char::is_control) {
            return Err(crate::Error::invalid(
                "content_type",
                "must not contain control characters",
            ));
        }
        Ok(PutOptions {
            content_type: content_type.to_owned(),
            expected_size,
        })
    }
}

/// Mutable values under keys.
///
/// # Contract
/// - `put_artifact` overwrites; the new value becomes visible atomically when
///   the body ends cleanly. An aborted body (an `Err` item or a dropped
///   future) leaves the previous value intact and nothing staged behind.
/// - `get_artifact` and `stat_artifact` are `NotFound` for a missing key.
/// - `delete_artifact` is idempotent and returns whether the key existed.
/// - `list_artifacts` returns keys in byte order. Prefixes are plain byte
///   prefixes: `a/` matches `a/b` but not `a_b`; no key ever matches another
///   namespace. With `with_values`, values up to [`MAX_LISTED_VALUE_BYTES`] are
///   included and a page ends early once [`MAX_LISTED_PAGE_BYTES`] of values
///   are in it; larger values are left out (read them with `get_artifact`).
/// - A successful write is durable: it survives a crash of the process.
#[async_trait]
pub trait ArtifactStore: Send + Sync + 'static {
    /// Stores `data` under `key`, replacing any earlier value.
    async fn put_artifact(
        &self,
        ns: &Namespace,
        key: &Name,
        options: PutOptions,
        data: ByteStream,
    ) -> Result<ArtifactInfo>;

    /// Opens a value for reading. `NotFound` when missing.
    async fn get_artifact(&self, ns: &Namespace, key: &Name) -> Result<(ArtifactInfo, ByteStream)>;

    /// Removes a key; returns whether it existed.
    async fn delete_artifact(&self, ns: &Namespace, key: &Name) -> Result<bool>;

    /// A value's metadata. `NotFound` when missing.
    async fn stat_artifact(&self, ns: &Namespace, key: &Name) -> Result<ArtifactInfo>;

    /// One page of keys in byte order, with values when `with_values`.
    async fn list_artifacts(
        &self,
        ns: &Namespace,
        page: &ListPage,
        with_values: bool,
    ) -> Result<Page<ListedArtifact>>;
}
