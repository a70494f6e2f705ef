//! The Prometheus endpoint: a process-wide recorder (from the
//! `metrics-exporter-prometheus` crate) rendered at `GET /metrics` on its own
//! port, plus gauges describing what the store holds, refreshed periodically.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::store::SledStore;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds, from sub-millisecond cache hits to slow bulk uploads.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// The process's recorder, installed on first use.
pub fn handle() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    metrics::describe_counter!(
        "trove_requests_total",
        "Calls finished, by service, method and gRPC status code."
    );
    metrics::describe_histogram!(
        "trove_request_duration_seconds",
        "Call duration until the response ended, in seconds."
    );
    metrics::describe_counter!(
        "trove_request_bytes_total",
        "Request body bytes received (gRPC framing included)."
    );
    metrics::describe_counter!(
        "trove_response_bytes_total",
        "Response body bytes sent (gRPC framing included)."
    );
    metrics::describe_gauge!("trove_requests_in_flight", "Calls being served right now.");
    metrics::describe_counter!(
        "trove_requests_shed_total",
        "Calls refused because max_concurrent_requests was reached."
    );
    metrics::describe_gauge!("trove_store_items", "Items stored, by kind.");
    metrics::describe_gauge!(
        "trove_store_logical_bytes",
        "Bytes of stored payloads, as callers see them."
    );
    metrics::describe_gauge!(
        "trove_store_disk_bytes",
        "Bytes the data directory occupies on disk."
    );
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let render = move || {
        let handle = handle.clone();
        async move {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                handle.render(),
            )
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(render));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Refreshes the store gauges every `every` until the task is aborted.
pub fn spawn_store_gauges(store: SledStore, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        // A slow scan must not be followed by a burst of catch-up scans.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.usage()).await {
                Ok(Ok(usage)) => {
                    for (kind, count) in [
                        ("object", usage.objects),
                        ("stream", usage.streams),
                        ("artifact", usage.artifacts),
                        ("cassette", usage.cassettes),
                        ("entry", usage.entries),
                        ("cache_archive", usage.cache_archives),
                    ] {
                        #[allow(clippy::cast_precision_loss)]
                        metrics::gauge!("trove_store_items", "kind" => kind).set(count as f64);
                    }
                    #[allow(clippy::cast_precision_loss)]
                    {
                        metrics::gauge!("trove_store_logical_bytes")
                            .set(usage.logical_bytes as f64);
                        metrics::gauge!("trove_store_disk_bytes").set(usage.disk_bytes as f64);
                    }
                }
                Ok(Err(err)) => tracing::warn!(error = %err, "cannot measure the store"),
                Err(err) => tracing::warn!(error = %err, "store measurement task failed"),
            }
        }
    })
}
