//! `trove-server`: loads settings, starts logging, binds, and runs the server
//! until SIGTERM or SIGINT.

use std::io::Write;

use anyhow::Context;
use trove_server::config::{Config, ConfigError};
use trove_server::server::Listeners;

/// Small writes allocate and free many short-lived buffers on every worker
/// thread; mimalloc's per-thread heaps cost a fraction of glibc's arenas there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match Config::load() {
        Ok(config) => config,
        Err(ConfigError::Invalid(err)) => err.exit(),
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    };
    // The allocator asks for transparent huge pages; the first write into
    // each one zeroes 2 MiB in one page fault, and when that write is the
    // store's log buffer it stalled every write behind it for ~5 ms
    // (measured under load). Small pages spread that cost out. Failing to
    // set it only costs latency.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    if config.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    if let Err(refusal) = config
        .check_exposure()
        .and_then(|()| config.check_reclaim_grace())
        .and_then(|()| config.check_limits())
    {
        eprintln!("error: {refusal}");
        std::process::exit(2);
    }
    trove_server::telemetry::init(&config)?;
    for warning in config.exposure_warnings() {
        tracing::warn!("{warning}");
    }
    // Registered before anything slow happens, so a SIGTERM during start-up
    // is held and honoured (gracefully) instead of killing the process.
    let shutdown = shutdown_signal()?;
    let grpc = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    let metrics = match config.metrics_listen.0 {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (--metrics-listen; \"off\" disables it)")
        })?),
        None => None,
    };
    let health = match config.health_listen.0 {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (--health-listen; \"off\" disables it)")
        })?),
        None => None,
    };
    // Scripts and tests read the bound addresses (useful with port 0) here.
    let mut stdout = std::io::stdout();
    if let Some(health) = &health {
        writeln!(
            stdout,
            "health on {}",
            health.local_addr().context("health address")?
        )
        .context("write to stdout")?;
    }
    if let Some(metrics) = &metrics {
        writeln!(
            stdout,
            "metrics on {}",
            metrics.local_addr().context("metrics address")?
        )
        .context("write to stdout")?;
    }
    writeln!(
        stdout,
        "listening on {}",
        grpc.local_addr().context("listener address")?
    )
    .context("write to stdout")?;
    stdout.flush().context("flush stdout")?;
    trove_server::server::run(
        config,
        Listeners {
            grpc,
            metrics,
            health,
        },
        shutdown,
    )
    .await
}

/// A future resolving on the first SIGTERM or SIGINT; the handlers are
/// installed when this is called, not when the future is first polled.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}
