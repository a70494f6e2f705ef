//! The objects operation group: content-addressed blobs and timestamped chunk
//! streams. Implemented by the server's stores and by the remote client.

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::Result;
pub use crate::pb::{ListedObject, ObjectInfo, StreamChunk, StreamInfo};
use crate::types::{ByteStream, ListPage, Name, Namespace, Page};

/// A stream of chunks: a `PutStream` body or a `GetStream` result. An `Err`
/// item aborts the transfer.
pub type ChunkStream = BoxStream<'static, Result<StreamChunk>>;

/// Most hashes one `find_missing` call accepts.
pub const MAX_FIND_MISSING: usize = 10_000;

/// Content-addressed objects and chunk streams.
///
/// # Contract
/// - A hash of 64 lowercase hex characters is the SHA-256 of the content:
///   `put_object` verifies it and stores nothing on a mismatch
///   (`InvalidArgument` on field `hash`). Any other hash is an opaque name.
/// - `put_object` is atomic: the object is visible, complete, only once the
///   body stream ended cleanly; an `Err` item or a dropped future leaves the
///   previous state untouched and no staged data behind. Storing an existing
///   hash again succeeds (for a verified hash the content is identical).
/// - Objects and streams under the same hash are independent, except that
///   `delete_object` removes both. Deletes are idempotent.
/// - `put_stream` replaces any earlier stream under the hash atomically.
///   Chunk order, empty lists, empty chunks and absent timestamps round-trip
///   exactly. Stream hashes are never verified against content.
/// - Every call is confined to its namespace.
/// - A successful write is durable: it survives a crash of the process.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Stores `data` under `hash`. With `expected_size`, a body of any other
    /// length is rejected (`InvalidArgument` on `size`) and nothing is stored.
    async fn put_object(
        &self,
        ns: &Namespace,
        hash: &Name,
        expected_size: Option<u64>,
        data: ByteStream,
    ) -> Result<ObjectInfo>;

    /// Opens an object for reading. `NotFound` when missing.
    async fn get_object(&self, ns: &Namespace, hash: &Name) -> Result<(ObjectInfo, ByteStream)>;

    /// Removes the object and the stream under `hash`; returns whether either existed.
    async fn delete_object(&self, ns: &Namespace, hash: &Name) -> Result<bool>;

    /// An object's metadata. `NotFound` when missing.
    async fn stat_object(&self, ns: &Namespace, hash: &Name) -> Result<ObjectInfo>;

    /// Hashes that have an object or a stream, in byte order, one page at a time.
    async fn list_objects(&self, ns: &Namespace, page: &ListPage) -> Result<Page<ListedObject>>;

    /// The hashes among `hashes` with no stored object, in the given order.
    /// More than [`MAX_FIND_MISSING`] hashes is `InvalidArgument`.
    async fn find_missing(&self, ns: &Namespace, hashes: &[Name]) -> Result<Vec<Name>>;

    /// Stores a chunk list under `hash`, replacing any earlier one atomically.
    async fn put_stream(
        &self,
        ns: &Namespace,
        hash: &Name,
        chunks: ChunkStream,
    ) -> Result<StreamInfo>;

    /// Reads a chunk list back in stored order. `NotFound` when missing.
    async fn get_stream(&self, ns: &Namespace, hash: &Name) -> Result<(StreamInfo, ChunkStream)>;
}
