//! Trove's shared contract: the `trove.v1` wire types, the storage traits that
//! both the server's stores and the remote client implement, the validated
//! domain types those traits take, and the single error type.
//!
//! This crate never touches a storage engine or a network transport: it only
//! knows the generated message types and the shape of the operations.
//!
//! # Layout
//! - [`pb`]: code generated from `proto/trove/v1/*.proto` and the descriptor
//!   set that servers publish through reflection.
//! - [`error`]: [`Error`], its one mapping to `tonic::Status` and back.
//! - [`types`]: validated names, namespaces, pages and byte/chunk streams.
//! - [`objects`], [`artifacts`], [`entries`], [`cache`]: one trait per
//!   operation group, with its contract written on the trait.

pub mod admin;
pub mod artifacts;
pub mod cache;
pub mod entries;
pub mod error;
pub mod objects;
pub mod types;

pub use admin::UsageStore;
pub use artifacts::ArtifactStore;
pub use cache::CacheStore;
pub use entries::EntryStore;
pub use error::{Error, Result};
pub use objects::ObjectStore;

/// Generated `trove.v1` messages, clients and server traits.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("trove.v1");

    /// Encoded `FileDescriptorSet` of every `trove.v1` file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/trove_v1_descriptor.bin"));
}
