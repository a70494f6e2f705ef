//! The Trove server: the embedded sled store, the gRPC adapters that expose it,
//! and the pieces the `trove-server` binary is made of.
//!
//! # Layout
//! - [`store`]: [`store::SledStore`], implementing the `trove-proto` traits on
//!   sled plus blob files. Knows nothing of tonic.
//! - [`bucket`]: [`bucket::BucketStore`], the same traits on S3-compatible
//!   object storage (or GCS, or Azure), for stateless servers sharing a bucket.
//! - [`grpc`]: thin adapters, one per service, generic over the trait served.
//! - [`config`]: flags and `TROVE_*` environment variables.
//! - [`observe`]: the tower layer for load shedding, deadlines, metrics and
//!   request logs.
//! - [`metrics`]: the Prometheus endpoint and store gauges.
//! - [`server`]: [`server::run`] wires everything and handles startup and shutdown.
//! - [`telemetry`]: log setup.

pub mod bucket;
pub mod config;
pub mod grpc;
pub mod metrics;
pub mod observe;
pub mod server;
pub mod store;
pub mod telemetry;

pub use store::SledStore;
