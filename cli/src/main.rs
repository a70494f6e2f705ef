//! `trove`: the command line for a Trove server, built on `trove-client`.
//!
//! Every transfer streams in chunks between files or pipes and the server,
//! so values of any size pass through a small, fixed amount of memory.
//! Output is for people by default and JSON with `--json`; the exit code
//! tells scripts what kind of failure happened (see `args::EXIT_CODES_HELP`).
//!
//! # Layout
//! - [`args`]: the grammar (commands, flags, environment variables); help,
//!   completions and the man page are generated from it.
//! - [`report`]: exit codes, the failure type, formatting for people.
//! - [`transfer`]: files and pipes to byte streams and back, progress bars.
//! - [`objects`], [`artifacts`], [`cassettes`], [`cache`]: one file per
//!   operation group.

mod args;
mod artifacts;
mod cache;
mod cassettes;
mod manual;
mod objects;
mod report;
mod transfer;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trove_client::trove_proto::types::Namespace;
use trove_client::{ClientOptions, TroveClient};

use crate::args::{Cli, Command};
use crate::report::out;
use crate::report::{Exit, Failure, Outcome};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("trove: cannot start the async runtime: {err}");
            return ExitCode::from(Exit::Failure as u8);
        }
    };
    // Ctrl-C drops the running command, so its destructors remove what it
    // staged (a download's temporary file; spooled input has no name at all).
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(cli) => outcome,
            _ = tokio::signal::ctrl_c() => Err(Failure::new(Exit::Interrupted, "interrupted")),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("trove: {}", failure.message);
            }
            failure.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Outcome {
    let json = cli.json;
    match cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "trove", &mut script);
            return manual::write_stdout(&script);
        }
        Command::Man { dir: None } => return manual::write_stdout(&manual::render()?),
        Command::Man { dir: Some(dir) } => return manual::write_all(&dir),
        _ => {}
    }
    let ns = Namespace::new(&cli.namespace)?;
    let client = TroveClient::connect_with(&cli.addr, &client_options(&cli)?).await?;
    match cli.command {
        Command::Objects(cmd) => objects::run(&client, &ns, json, cmd).await,
        Command::Streams(cmd) => objects::run_streams(&client, &ns, json, cmd).await,
        Command::Artifacts(cmd) => artifacts::run(&client, &ns, json, cmd).await,
        Command::Cassettes(cmd) => cassettes::run(&client, &ns, json, cmd).await,
        Command::Cache(args) => cache::run(&client, &ns, json, args).await,
        Command::Health {
            service,
            timeout_secs,
        } => {
            let timeout = std::time::Duration::from_secs(timeout_secs);
            tokio::time::timeout(timeout, health(&client, &cli.addr, json, service))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::new(
                        Exit::Unavailable,
                        format!("{} did not answer within {timeout_secs} s", cli.addr),
                    ))
                })
        }
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
    }
}

/// TLS and token settings from the flags (and their environment variables).
fn client_options(cli: &Cli) -> Outcome<ClientOptions> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| Failure::io(&path.display().to_string(), &e))
    };
    let identity_pem = match (&cli.client_cert, &cli.client_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    Ok(ClientOptions {
        token: cli.token.clone().filter(|t| !t.is_empty()),
        ca_pem: cli.ca.as_deref().map(read).transpose()?,
        identity_pem,
        domain: cli.tls_domain.clone(),
    })
}

/// Asks the standard health check; anything but SERVING is [`Exit::Unavailable`].
async fn health(client: &TroveClient, addr: &str, json: bool, service: String) -> Outcome {
    let reply = HealthClient::new(client.channel())
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .map_err(|status| Failure::from(trove_client::trove_proto::Error::from(status)))?
        .into_inner();
    let status = reply.status();
    let name = status.as_str_name();
    if json {
        report::print_json(
            &serde_json::json!({ "addr": addr, "service": service, "status": name }),
        )?;
    } else {
        out!("{name}");
    }
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(Failure::new(
            Exit::Unavailable,
            format!("{addr} answers {name}"),
        ))
    }
}
