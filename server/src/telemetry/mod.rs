//! What the server tells its operators: logs (set up here: `tracing` to
//! standard error, human-readable or JSON), the Prometheus endpoint and the
//! store gauges ([`metrics`]), and the per-call layer that limits, sheds,
//! times out, counts and logs every call ([`calls`]).

pub mod calls;
pub mod metrics;
pub mod names;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber described by `config`.
pub fn init(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log)
        .map_err(|e| anyhow::anyhow!("invalid --log filter {:?}: {e}", config.log))?;
    // Colours only for a person at a terminal: a log collector would keep
    // the escape codes, and writing them costs every call's log line.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}
