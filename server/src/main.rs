//! `trove-server`: parses settings, starts logging, binds, and runs the server
//! until SIGTERM or SIGINT.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use trove_server::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    trove_server::telemetry::init(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr().context("listener address")?;
    // Scripts and tests read the bound address (useful with port 0) from here.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {addr}").context("write to stdout")?;
    stdout.flush().context("flush stdout")?;
    trove_server::server::run(config, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
