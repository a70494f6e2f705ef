//! Wires the store, the gRPC adapters, health, reflection and metrics into one
//! tonic server, and runs it until a shutdown future resolves.
//!
//! [`run`] takes bound listeners and any shutdown future, so the binary and
//! tests drive it the same way.
//!
//! Life of the process:
//! 1. Starting: only health (NOT_SERVING) and reflection answer while the
//!    store opens and reclaims what a crash left.
//! 2. Serving: every service, behind the [`CallLayer`] (load shedding,
//!    deadlines, metrics, request logs); health reports SERVING.
//! 3. Draining, on the shutdown signal: health reports NOT_SERVING at once and
//!    the server keeps serving for `drain_grace_secs`, then stops accepting
//!    and lets in-flight calls finish (up to `drain_timeout_secs`).
//! 4. The store is flushed; `run` returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::Connected;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use trove_proto::pb::admin_server::AdminServer;
use trove_proto::pb::artifacts_server::ArtifactsServer;
use trove_proto::pb::cache_server::CacheServer;
use trove_proto::pb::entries_server::EntriesServer;
use trove_proto::pb::objects_server::ObjectsServer;

use crate::access::tls::{self, CertStore};
use crate::access::{AccessControl, AuthLayer, Policy};
use crate::config::Config;
use crate::engine::{self, Background, Engine};
use crate::grpc::admin::AdminService;
use crate::grpc::artifacts::ArtifactsService;
use crate::grpc::cache::CacheService;
use crate::grpc::entries::EntriesService;
use crate::grpc::objects::ObjectsService;
use crate::grpc::{Access, Limits};
use crate::guard::{self, GuardedConn, PeerCounter};
use crate::telemetry::calls::CallLayer;
use crate::telemetry::metrics;

/// Names of the services reported by the health check.
const SERVICES: [&str; 5] = [
    "trove.v1.Objects",
    "trove.v1.Artifacts",
    "trove.v1.Entries",
    "trove.v1.Cache",
    "trove.v1.Admin",
];

/// Largest HTTP/2 frame a client may send (the protocol's default is
/// 16 KiB). Uploads arrive in 1 MiB messages; with 128 KiB frames a 64 MiB
/// put measured about 10% faster (ratio to the in-process store 0.75
/// against 0.68), and frames of 256 KiB or 1 MiB gained nothing more. The
/// size is kept small because a frame is buffered whole before it is
/// checked: a hostile peer at the per-peer connection cap (256) can make
/// the server hold 32 MiB in partly sent frames, against 4 MiB before.
const MAX_FRAME_BYTES: u32 = 128 * 1024;

/// The health service name that turns NOT_SERVING once stored data was
/// found damaged (a DATA_LOSS answer), while the server goes on serving
/// everything else: probes keep routing traffic, alerts can page.
pub const INTEGRITY_SERVICE: &str = "trove.integrity";

/// The health service name of a tier's upstream: SERVING while the upstream
/// answers its health check, so probes can tell "this server is up, its
/// upstream is down" (locally held verified objects are still served).
pub const UPSTREAM_SERVICE: &str = "trove.upstream";

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the store gauges are refreshed (each refresh scans the store).
const STORE_GAUGE_PERIOD: Duration = Duration::from_secs(60);

/// The sockets the server answers on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC.
    pub grpc: TcpListener,
    /// Prometheus `/metrics`, when enabled.
    pub metrics: Option<TcpListener>,
    /// The health check alone, plaintext and open, when enabled.
    pub health: Option<TcpListener>,
}

#[allow(clippy::type_complexity)]
fn reflection(
    config: &Config,
) -> anyhow::Result<
    Option<(
        tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<
            impl tonic_reflection::pb::v1::server_reflection_server::ServerReflection,
        >,
        tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer<
            impl tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflection,
        >,
    )>,
> {
    if !config.reflection {
        return Ok(None);
    }
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
    Ok(Some((v1, v1alpha)))
}

/// Opens the store in `config.data_dir` and serves on `listeners` until
/// `shutdown` resolves; then drains, flushes and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Access control and TLS load before anything answers, so a bad grants
    // file or certificate stops the server instead of serving openly.
    let access = AccessControl::open(config.auth_tokens.clone(), config.tls_client_ca.is_some())
        .map_err(anyhow::Error::msg)?;
    let tls = match config.tls() {
        Some(settings) => {
            let certs = CertStore::open(&settings).map_err(anyhow::Error::msg)?;
            let acceptor =
                tls::acceptor(&settings, Arc::clone(&certs)).map_err(anyhow::Error::msg)?;
            Some((certs, acceptor))
        }
        None => None,
    };
    let acceptor = tls.as_ref().map(|(_, acceptor)| acceptor.clone());
    let mut reloading = Background::default();
    let (certs, grants) = (
        tls.as_ref().map(|(c, _)| Arc::clone(c)),
        Arc::clone(&access),
    );
    reloading.spawn(|stop| reload_on_change(certs, grants, stop));
    let (health, health_service) = tonic_health::server::health_reporter();
    set_all(&health, ServingStatus::NotServing).await;
    let grpc = Arc::new(listeners.grpc);
    let addr = grpc.local_addr().context("listener address")?;

    // The metrics endpoint runs from start-up to the very end; the guard
    // stops it however `run` returns.
    let mut endpoint = Background::default();
    let metrics_enabled = listeners.metrics.is_some();
    if let Some(listener) = listeners.metrics {
        let handle = metrics::handle()?;
        let addr = listener.local_addr().context("metrics listener address")?;
        tracing::info!(%addr, "metrics at /metrics");
        let token = config.metrics_token_sha256.clone();
        endpoint.spawn(|stop| async move {
            if let Err(err) = metrics::serve(listener, handle, token, stop.cancelled_owned()).await
            {
                tracing::warn!(error = %err, "the metrics endpoint failed");
            }
        });
    }

    if let Some(listener) = listeners.health {
        let probes = health_service
            .clone()
            .max_decoding_message_size(guard::PROBE_MAX_MESSAGE_BYTES);
        let addr = listener.local_addr().context("health listener address")?;
        tracing::info!(%addr, "health check for probes");
        endpoint.spawn(|stop| async move {
            let served = Server::builder()
                .add_service(probes)
                .serve_with_incoming_shutdown(
                    tls::incoming(Arc::new(listener), None),
                    stop.cancelled_owned(),
                )
                .await;
            if let Err(err) = served {
                tracing::warn!(error = %err, "the health listener failed");
            }
        });
    }

    // Phase 1: health (NOT_SERVING) and reflection only, while the store opens.
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel::<()>();
    // Any other call gets UNAVAILABLE (retryable), not UNIMPLEMENTED.
    let mut starting = tonic::service::Routes::new(health_service.clone());
    if let Some((v1, v1alpha)) = reflection(&config)? {
        starting = starting.add_service(v1).add_service(v1alpha);
    }
    let starting = starting.into_axum_router().fallback(|| async {
        tonic::Status::unavailable("the server is starting up; retry shortly")
            .into_http::<axum::body::Body>()
    });
    let starting = tokio::spawn(
        Server::builder()
            .layer(AuthLayer::new(Arc::clone(&access)))
            .add_routes(tonic::service::Routes::from(starting))
            .serve_with_incoming_shutdown(
                tls::incoming(Arc::clone(&grpc), acceptor.clone()),
                async {
                    let _ = opened_rx.await;
                },
            ),
    );

    let started = std::time::Instant::now();
    let opened = engine::open(&config).await;
    let _ = opened_tx.send(());
    // Health watchers could hold the startup server open; it only needs to
    // stop accepting, which happens at once.
    if tokio::time::timeout(Duration::from_secs(2), starting)
        .await
        .is_err()
    {
        tracing::debug!("startup server still draining; moving on");
    }
    let serving = Serving {
        config: &config,
        access: Arc::clone(&access),
        acceptor,
        health,
        health_service,
        grpc,
        addr,
    };
    let engine = opened?;
    tracing::info!(
        engine = %engine.describe(),
        elapsed_ms = started.elapsed().as_millis(),
        "store open"
    );
    let mut background = engine.start_background();
    if metrics_enabled {
        let engine = Arc::clone(&engine);
        background.spawn(|stop| metrics::refresh_store_gauges(engine, STORE_GAUGE_PERIOD, stop));
    }
    let served = serving.serve(Arc::clone(&engine), shutdown).await;
    background.stop().await;
    // Whatever ended the server, the store is flushed before returning.
    engine.flush().await.context("final flush")?;
    tracing::info!("store flushed");
    reloading.stop().await;
    endpoint.stop().await;
    tracing::info!("bye");
    served
}

/// Everything needed to serve an opened store.
struct Serving<'a, H> {
    config: &'a Config,
    access: Arc<AccessControl>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    health: HealthReporter,
    health_service: tonic_health::pb::health_server::HealthServer<H>,
    grpc: Arc<TcpListener>,
    addr: std::net::SocketAddr,
}

impl<H: tonic_health::pb::health_server::Health> Serving<'_, H> {
    /// Serves every service on `store` until `shutdown`, then drains.
    async fn serve(
        self,
        store: Arc<dyn Engine>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Serving {
            config,
            access,
            acceptor,
            health,
            health_service,
            grpc,
            addr,
        } = self;
        let limits = Limits {
            max_message_bytes: config.max_message(),
        };
        // tonic enforces the limit while decoding; its OUT_OF_RANGE becomes
        // RESOURCE_EXHAUSTED naming the limit (in the adapters for streamed
        // messages, in the call layer for unary ones).
        let decode_limit = limits.max_message_bytes;
        macro_rules! grpc_service {
            ($server:ident, $service:expr) => {
                $server::new($service)
                    .max_decoding_message_size(decode_limit)
                    .max_encoding_message_size(usize::MAX)
                    .accept_compressed(CompressionEncoding::Gzip)
                    .accept_compressed(CompressionEncoding::Zstd)
                    .send_compressed(CompressionEncoding::Gzip)
                    .send_compressed(CompressionEncoding::Zstd)
            };
        }
        let policy: Access = Arc::new(Policy::new(Arc::clone(&access)));
        let objects = grpc_service!(
            ObjectsServer,
            ObjectsService::new(Arc::clone(&store), limits).with_access(Arc::clone(&policy))
        );
        let artifacts = grpc_service!(
            ArtifactsServer,
            ArtifactsService::new(Arc::clone(&store), limits).with_access(Arc::clone(&policy))
        );
        let entries = grpc_service!(
            EntriesServer,
            EntriesService::new(Arc::clone(&store), limits).with_access(Arc::clone(&policy))
        );
        let cache = grpc_service!(
            CacheServer,
            CacheService::new(Arc::clone(&store), limits).with_access(Arc::clone(&policy))
        );
        let admin = grpc_service!(
            AdminServer,
            AdminService::new(Arc::clone(&store)).with_access(Arc::clone(&policy))
        );

        let timeout = (config.request_timeout_secs > 0)
            .then(|| Duration::from_secs(config.request_timeout_secs));
        let (damage, mut damaged) = tokio::sync::watch::channel(0u64);
        let integrity = health.clone();
        integrity
            .set_service_status(INTEGRITY_SERVICE, ServingStatus::Serving)
            .await;
        let watching = tokio::spawn(async move {
            // The first damage found turns the integrity status NOT_SERVING
            // for the life of the process; everything else keeps serving.
            if damaged.changed().await.is_ok() {
                integrity
                    .set_service_status(INTEGRITY_SERVICE, ServingStatus::NotServing)
                    .await;
            }
        });
        let _watching = AbortOnDrop(watching);
        let calls = CallLayer::new(
            usize::try_from(config.max_concurrent_requests).unwrap_or(usize::MAX),
            timeout,
            limits.max_message_bytes,
        )
        .with_damage_signal(Arc::new(damage))
        .with_guards(config.guards());
        let full_reflection = reflection(config)?;
        let mut router = Server::builder()
            // Without keepalives a client that vanishes (host down, partition)
            // would hold its upload, staging file and buffers forever.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(config.max_concurrent_streams)
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .trace_fn(|request| tracing::info_span!("rpc", path = %request.uri().path()))
            .layer(calls)
            .layer(AuthLayer::new(access))
            .add_service(health_service.max_decoding_message_size(guard::PROBE_MAX_MESSAGE_BYTES))
            .add_service(objects)
            .add_service(artifacts)
            .add_service(entries)
            .add_service(cache)
            .add_service(admin);
        if let Some((v1, v1alpha)) = full_reflection {
            router = router
                .add_service(v1.max_decoding_message_size(guard::PROBE_MAX_MESSAGE_BYTES))
                .add_service(v1alpha.max_decoding_message_size(guard::PROBE_MAX_MESSAGE_BYTES));
        }

        set_all(&health, ServingStatus::Serving).await;
        tracing::info!(%addr, "serving");
        let _refusing = AbortOnDrop(tokio::spawn(report_write_refusal(
            Arc::clone(&store),
            health.clone(),
        )));
        let _upstream = store.upstream().is_some().then(|| {
            AbortOnDrop(tokio::spawn(report_upstream(
                Arc::clone(&store),
                health.clone(),
            )))
        });

        let (drain_started_tx, drain_started_rx) = tokio::sync::oneshot::channel::<()>();
        let draining_health = health.clone();
        let grace = Duration::from_secs(config.drain_grace_secs);
        let signal = async move {
            shutdown.await;
            tracing::info!(
                grace_secs = grace.as_secs(),
                "shutdown requested; reporting NOT_SERVING"
            );
            set_all(&draining_health, ServingStatus::NotServing).await;
            tokio::time::sleep(grace).await;
            tracing::info!("draining in-flight calls");
            let _ = drain_started_tx.send(());
        };
        let connections = PeerCounter::new(
            usize::try_from(config.max_connections_per_peer).unwrap_or(usize::MAX),
        );
        let incoming = tls::incoming(grpc, acceptor).filter_map(move |accepted| {
            let admitted = match accepted {
                Ok(conn) => {
                    let peer = conn.connect_info().remote.map(|addr| addr.ip());
                    match GuardedConn::admit(conn, peer, &connections) {
                        Ok(guarded) => Some(Ok(guarded)),
                        Err(_refused) => {
                            ::metrics::counter!("trove_connections_refused_total").increment(1);
                            tracing::debug!(?peer, "connection refused: max_connections_per_peer");
                            None
                        }
                    }
                }
                Err(err) => Some(Err(err)),
            };
            std::future::ready(admitted)
        });
        let serve = router.serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(serve);
        let drain_timeout = Duration::from_secs(config.drain_timeout_secs);
        let served = tokio::select! {
            result = &mut serve => result.context("gRPC server failed"),
            () = async {
                if drain_started_rx.await.is_ok() {
                    tokio::time::sleep(drain_timeout).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!(timeout_secs = config.drain_timeout_secs, "drain timeout reached; closing remaining calls");
                Ok(())
            }
        };
        served
    }
}

/// Mirrors what the engine last learnt of its upstream into the
/// [`UPSTREAM_SERVICE`] health status.
async fn report_upstream(engine: Arc<dyn Engine>, health: HealthReporter) {
    let mut ticks = tokio::time::interval(WRITABLE_CHECK_PERIOD);
    let mut reported = None;
    loop {
        ticks.tick().await;
        let reachable = engine.upstream().is_some_and(|(_, reachable)| reachable);
        if reported != Some(reachable) {
            let status = if reachable {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(UPSTREAM_SERVICE, status).await;
            reported = Some(reachable);
        }
    }
}

/// How often the engine is asked whether it still acknowledges writes.
const WRITABLE_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// Turns every health status NOT_SERVING while the engine refuses writes
/// (a failed fsync: until the log is reopened, or for good until a
/// restart), and back to SERVING once it accepts them again, so probes stop
/// routing traffic here meanwhile.
async fn report_write_refusal(engine: Arc<dyn Engine>, health: HealthReporter) {
    let mut ticks = tokio::time::interval(WRITABLE_CHECK_PERIOD);
    let mut refusing = false;
    loop {
        ticks.tick().await;
        match engine.write_refusal() {
            Some(reason) if !refusing => {
                tracing::error!(%reason, "the store refuses writes; reporting NOT_SERVING");
                set_all(&health, ServingStatus::NotServing).await;
                refusing = true;
            }
            None if refusing => {
                tracing::info!("the store accepts writes again; reporting SERVING");
                set_all(&health, ServingStatus::Serving).await;
                refusing = false;
            }
            _ => {}
        }
    }
}

async fn set_all(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Reloads the TLS certificate and the grants file when they change on
/// disk (checked every [`tls::RELOAD_PERIOD`]) and at once on SIGHUP.
async fn reload_on_change(
    certs: Option<Arc<CertStore>>,
    grants: Arc<AccessControl>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; files are still watched");
            None
        }
    };
    let mut ticker = tokio::time::interval(tls::RELOAD_PERIOD);
    loop {
        let force = tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        if let Some(certs) = &certs {
            certs.reload(force);
        }
        grants.reload(force);
    }
}
