//! The Trove server: the storage engines, the gRPC adapters that expose them,
//! and the pieces the `trove-server` binary is made of.
//!
//! # Layout
//! - [`engine`]: the [`engine::Engine`] trait every storage engine implements
//!   (the four `trove-proto` traits plus lifecycle and usage), what the
//!   engines share (the persisted record, value checks, the chunk codec,
//!   retention planning), and one folder per engine: [`engine::sled`]
//!   (embedded, the default) and [`engine::bucket`] (object storage). Knows
//!   nothing of tonic; the two engines never import each other.
//! - [`grpc`]: thin adapters, one per service, generic over the trait served;
//!   they import only `trove-proto`.
//! - [`access`]: TLS, bearer tokens and client certificates, and the
//!   authorization policy the adapters ask.
//! - [`guard`]: protection against slow, stalled and hostile callers (the
//!   budget for partly received messages, stall limits, per-peer caps).
//! - [`config`]: flags, `TROVE_*` environment variables and the TOML file.
//! - [`telemetry`]: logs, the Prometheus endpoint and store gauges, and the
//!   per-call layer (limits, shedding, deadlines, metrics, request logs).
//! - [`server`]: [`server::run`] wires everything and handles startup and
//!   shutdown.

pub mod access;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod guard;
pub mod server;
pub mod telemetry;

pub use engine::sled::SledStore;
