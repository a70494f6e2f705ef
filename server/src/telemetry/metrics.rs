//! The Prometheus endpoint: a process-wide recorder (from the
//! `metrics-exporter-prometheus` crate) rendered at `GET /metrics` on its own
//! port, plus gauges describing what the store holds, refreshed periodically
//! from [`Engine::usage`] whatever the engine.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Usage};

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
    metrics::describe_gauge!(
        "trove_runtime_alive_tasks",
        "Tasks alive in the server's async runtime, read at each scrape."
    );
    metrics::describe_counter!(
        "trove_data_loss_total",
        "Calls answered DATA_LOSS because stored data was found damaged, by service and method."
    );
    metrics::describe_counter!(
        "trove_requests_by_principal_total",
        "Calls finished by authenticated callers, by principal (from the grants file) and gRPC status code."
    );
    metrics::describe_counter!(
        "trove_requests_shed_total",
        "Calls refused because max_concurrent_requests was reached."
    );
    metrics::describe_counter!(
        "trove_upstream_calls_total",
        "Calls a tier made to its upstream, by operation."
    );
    metrics::describe_counter!(
        "trove_upstream_find_missing_hashes_total",
        "Hashes a tier asked its upstream about in FindMissing calls (the local misses only)."
    );
    metrics::describe_counter!(
        "trove_tier_local_hits_total",
        "Reads of objects and artifacts a tier served from its local copy."
    );
    metrics::describe_counter!(
        "trove_tier_local_misses_total",
        "Reads of objects and artifacts a tier had to fetch from its upstream."
    );
    metrics::describe_counter!(
        "trove_evictions_total",
        "Values (objects, cache refs) evicted from namespaces with on_full = \"evict\"."
    );
    metrics::describe_counter!(
        "trove_evicted_bytes_total",
        "Logical bytes of the values evicted."
    );
    metrics::describe_counter!(
        "trove_pack_compactions_total",
        "Value packs deleted by compaction (their live values rewritten elsewhere first)."
    );
    metrics::describe_counter!(
        "trove_pack_reclaimed_bytes_total",
        "Bytes of value pack files deleted by compaction."
    );
    metrics::describe_counter!(
        "trove_pack_moved_bytes_total",
        "Bytes of live values compaction rewrote to free their packs."
    );
    metrics::describe_gauge!("trove_store_items", "Items stored, by kind.");
    metrics::describe_gauge!(
        "trove_store_logical_bytes",
        "Bytes of stored payloads, as callers see them."
    );
    metrics::describe_gauge!(
        "trove_store_disk_bytes",
        "Bytes the store occupies: the data directory on disk, or everything under the bucket root."
    );
}

/// Serves `/metrics` on `listener` until `shutdown` resolves. With a
/// `token_sha256` (hex), a scrape must send `authorization: Bearer <token>`
/// for a token with that SHA-256, else it gets 401.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    token_sha256: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let expected: Option<[u8; 32]> = {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&token_sha256, &mut digest)
            .ok()
            .map(|()| digest)
    };
    let render = move |headers: axum::http::HeaderMap| {
        let handle = handle.clone();
        async move {
            if let Some(expected) = expected {
                if !scrape_allowed(&headers, &expected) {
                    return (
                        axum::http::StatusCode::UNAUTHORIZED,
                        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                        "send `authorization: Bearer <token>` with the metrics token\n".to_owned(),
                    )
                        .into_response();
                }
            }
            // Read at each scrape: a count that only grows means tasks leak.
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!("trove_runtime_alive_tasks").set(
                tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks() as f64,
            );
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                handle.render(),
            )
                .into_response()
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(render));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Whether a scrape carries the one bearer token whose SHA-256 is `expected`
/// (compared in constant time).
fn scrape_allowed(headers: &axum::http::HeaderMap, expected: &[u8; 32]) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    let mut values = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Some(token) = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
    else {
        return false;
    };
    let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
    bool::from(digest.ct_eq(expected))
}

/// Refreshes the store gauges from [`Engine::usage`] now and every `every`,
/// until `stop` is cancelled. A figure the engine cannot know is left out.
pub async fn refresh_store_gauges(
    engine: Arc<dyn Engine>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    // A slow scan must not be followed by a burst of catch-up scans.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut namespaces = NamespaceGauges::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let usage = tokio::select! {
            () = stop.cancelled() => return,
            usage = engine.usage() => usage,
        };
        match usage {
            Ok(usage) => set_store_gauges(&usage),
            Err(err) => tracing::warn!(error = %err, "cannot measure the store"),
        }
        match engine.namespace_usage(None).await {
            Ok(rows) => namespaces.set(&rows),
            // An engine that does not count per namespace says so once per
            // refresh at debug level: nothing is wrong.
            Err(err @ trove_proto::Error::FailedPrecondition { .. }) => {
                tracing::debug!(error = %err, "no per-namespace usage");
            }
            Err(err) => tracing::warn!(error = %err, "cannot read the usage counters"),
        }
    }
}

/// The per-namespace usage gauges: `trove_usage_items` and
/// `trove_usage_logical_bytes`, labelled by namespace, group and tier (the
/// cache's PR tiers are summed into `pr`, so branch churn cannot multiply
/// series). A series whose counter went away is set to zero, not left at
/// its last value.
#[derive(Default)]
struct NamespaceGauges {
    shown: std::collections::BTreeSet<(String, String, &'static str)>,
}

impl NamespaceGauges {
    #[allow(clippy::cast_precision_loss)]
    fn set(&mut self, rows: &[trove_proto::admin::UsageRow]) {
        let mut sums: std::collections::BTreeMap<(String, String, &'static str), (u64, u64)> =
            std::collections::BTreeMap::new();
        for row in rows {
            let tier = match (row.group.as_str(), row.pr_tier) {
                (trove_proto::admin::GROUP_CACHE, false) => "main",
                (trove_proto::admin::GROUP_CACHE, true) => "pr",
                _ => "",
            };
            let sum = sums
                .entry((row.namespace.clone(), row.group.clone(), tier))
                .or_default();
            sum.0 = sum.0.saturating_add(row.items);
            sum.1 = sum.1.saturating_add(row.logical_bytes);
        }
        for gone in self.shown.difference(&sums.keys().cloned().collect()) {
            let (ns, group, tier) = gone.clone();
            let labels = [
                ("namespace", ns),
                ("group", group),
                ("tier", tier.to_owned()),
            ];
            metrics::gauge!("trove_usage_items", &labels).set(0.0);
            metrics::gauge!("trove_usage_logical_bytes", &labels).set(0.0);
        }
        for ((ns, group, tier), (items, bytes)) in &sums {
            let labels = [
                ("namespace", ns.clone()),
                ("group", group.clone()),
                ("tier", (*tier).to_owned()),
            ];
            metrics::gauge!("trove_usage_items", &labels).set(*items as f64);
            metrics::gauge!("trove_usage_logical_bytes", &labels).set(*bytes as f64);
        }
        self.shown = sums.into_keys().collect();
    }
}

#[allow(clippy::cast_precision_loss)]
fn set_store_gauges(usage: &Usage) {
    for (kind, count) in [
        ("object", Some(usage.objects)),
        ("stream", Some(usage.streams)),
        ("artifact", Some(usage.artifacts)),
        ("cassette", Some(usage.cassettes)),
        ("entry", usage.entries),
        ("cache_archive", Some(usage.cache_archives)),
    ] {
        if let Some(count) = count {
            metrics::gauge!("trove_store_items", "kind" => kind).set(count as f64);
        }
    }
    if let Some(bytes) = usage.logical_bytes {
        metrics::gauge!("trove_store_logical_bytes").set(bytes as f64);
    }
    metrics::gauge!("trove_store_disk_bytes").set(usage.disk_bytes as f64);
}
