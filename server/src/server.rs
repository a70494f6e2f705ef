//! Wires the store, the gRPC adapters, health and reflection into one tonic
//! server, and runs it until a shutdown future resolves.
//!
//! [`run`] takes a bound listener and any shutdown future, so the binary and
//! tests drive it the same way. Shutdown order: health flips to NOT_SERVING,
//! tonic stops accepting and drains in-flight calls (bounded by the drain
//! timeout), then the store is flushed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codegen::http;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use trove_proto::pb::artifacts_server::ArtifactsServer;
use trove_proto::pb::cache_server::CacheServer;
use trove_proto::pb::entries_server::EntriesServer;
use trove_proto::pb::objects_server::ObjectsServer;

use crate::config::Config;
use crate::grpc::artifacts::ArtifactsService;
use crate::grpc::cache::CacheService;
use crate::grpc::entries::EntriesService;
use crate::grpc::objects::ObjectsService;
use crate::grpc::Limits;
use crate::store::SledStore;

/// Names of the services reported by the health check.
const SERVICES: [&str; 4] = [
    "trove.v1.Objects",
    "trove.v1.Artifacts",
    "trove.v1.Entries",
    "trove.v1.Cache",
];

/// Opens the store in `config.data_dir` and serves on `listener` until
/// `shutdown` resolves; then drains, flushes and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Not serving until the store is open and reclaimed.
    set_all(&health, ServingStatus::NotServing).await;

    let dir = config.data_dir.clone();
    let options = config.store_options();
    let started = std::time::Instant::now();
    let store = tokio::task::spawn_blocking(move || SledStore::open(&dir, options))
        .await
        .context("store task panicked")?
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    tracing::info!(dir = %config.data_dir.display(), elapsed_ms = started.elapsed().as_millis(), "store open");
    let store = Arc::new(store);

    let limits = Limits {
        max_message_bytes: config.max_message(),
    };
    // tonic enforces the limit while decoding; its OUT_OF_RANGE becomes
    // RESOURCE_EXHAUSTED naming the limit (in the adapters for streamed
    // messages, in `oversize_is_resource_exhausted` for unary ones).
    let decode_limit = limits.max_message_bytes;
    let objects = ObjectsServer::new(ObjectsService::new(Arc::clone(&store), limits))
        .max_decoding_message_size(decode_limit)
        .max_encoding_message_size(usize::MAX);
    let artifacts = ArtifactsServer::new(ArtifactsService::new(Arc::clone(&store), limits))
        .max_decoding_message_size(decode_limit)
        .max_encoding_message_size(usize::MAX);

    let entries = EntriesServer::new(EntriesService::new(Arc::clone(&store), limits))
        .max_decoding_message_size(decode_limit)
        .max_encoding_message_size(usize::MAX);

    let limit_bytes = limits.max_message_bytes;
    let cache = CacheServer::new(CacheService::new(Arc::clone(&store), limits))
        .max_decoding_message_size(decode_limit)
        .max_encoding_message_size(usize::MAX);

    let mut router = Server::builder()
        // Without keepalives a client that vanishes (host down, partition)
        // would hold its upload, staging file and buffers forever.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .trace_fn(|request| tracing::info_span!("rpc", path = %request.uri().path()))
        .layer(tower::util::MapResponseLayer::new(move |response| {
            oversize_is_resource_exhausted(response, limit_bytes)
        }))
        .add_service(health_service)
        .add_service(objects)
        .add_service(artifacts)
        .add_service(entries)
        .add_service(cache);
    if config.reflection {
        let v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(trove_proto::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("build reflection v1")?;
        let v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(trove_proto::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("build reflection v1alpha")?;
        router = router.add_service(v1).add_service(v1alpha);
    }

    set_all(&health, ServingStatus::Serving).await;
    let addr = listener.local_addr().context("listener address")?;
    tracing::info!(%addr, "serving");

    let (drain_started_tx, drain_started_rx) = tokio::sync::oneshot::channel::<()>();
    let draining_health = health.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutdown requested; draining in-flight calls");
        set_all(&draining_health, ServingStatus::NotServing).await;
        let _ = drain_started_tx.send(());
    };
    let serve = router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    tokio::pin!(serve);
    let drain_timeout = Duration::from_secs(config.drain_timeout_secs);
    tokio::select! {
        result = &mut serve => result.context("gRPC server failed")?,
        () = async {
            if drain_started_rx.await.is_ok() {
                tokio::time::sleep(drain_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(timeout_secs = config.drain_timeout_secs, "drain timeout reached; closing remaining calls");
        }
    }

    store.flush().await.context("final flush")?;
    tracing::info!("store flushed; bye");
    Ok(())
}

async fn set_all(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// tonic rejects an oversize unary message itself, with OUT_OF_RANGE, before
/// any adapter runs. Trove promises RESOURCE_EXHAUSTED naming the limit, and
/// nothing in Trove emits OUT_OF_RANGE, so the status is rewritten here.
fn oversize_is_resource_exhausted<B>(
    mut response: http::Response<B>,
    limit: usize,
) -> http::Response<B> {
    const OUT_OF_RANGE: &str = "11";
    let headers = response.headers_mut();
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) == Some(OUT_OF_RANGE) {
        let code = (tonic::Code::ResourceExhausted as i32).to_string();
        if let Ok(code) = http::HeaderValue::from_str(&code) {
            headers.insert("grpc-status", code);
        }
        let message = format!(
            "max_message_bytes ({limit}) exceeded: a message is larger than the server accepts; send large values in several messages"
        );
        if let Ok(message) = http::HeaderValue::from_str(&message) {
            headers.insert("grpc-message", message);
        }
        if let Ok(limit) = http::HeaderValue::from_str(&format!("max_message_bytes ({limit})")) {
            headers.insert("trove-limit", limit);
        }
    }
    response
}
