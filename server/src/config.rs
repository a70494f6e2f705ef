//! Server settings: every one is a flag and a `TROVE_*` environment variable
//! (flags win), validated before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::store::{Durability, StoreOptions};

/// When writes are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityMode {
    /// After the write is on disk (fsync shared between concurrent writers).
    Strict,
    /// Before the write is on disk; a crash may lose about the last 500 ms.
    Relaxed,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The Trove storage server.
#[derive(Debug, Clone, Parser)]
#[command(name = "trove-server", version, about, long_about = None)]
pub struct Config {
    /// Address to serve gRPC on. Port 0 picks a free port; the bound address
    /// is printed on standard output as `listening on ADDR`.
    #[arg(long, env = "TROVE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Folder holding the data (created if missing).
    #[arg(long, env = "TROVE_DATA_DIR", default_value = "./trove-data")]
    pub data_dir: PathBuf,

    /// Largest gRPC message accepted, in bytes. Larger values must be streamed
    /// in several messages.
    #[arg(long, env = "TROVE_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024 * 1024))]
    pub max_message_bytes: u64,

    /// Size of the chunks that downloads are sent in, in bytes.
    #[arg(long, env = "TROVE_CHUNK_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024))]
    pub chunk_bytes: u64,

    /// Values up to this size are kept inside the database; larger ones in
    /// separate blob files.
    #[arg(long, env = "TROVE_INLINE_LIMIT_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u64).range(0..=1024 * 1024))]
    pub inline_limit_bytes: u64,

    /// When writes are acknowledged.
    #[arg(long, env = "TROVE_DURABILITY", value_enum, default_value = "strict")]
    pub durability: DurabilityMode,

    /// Log format.
    #[arg(long, env = "TROVE_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `trove_server=debug,info`.
    #[arg(long, env = "TROVE_LOG", default_value = "info")]
    pub log: String,

    /// Serve gRPC reflection (on by default; `--reflection false` turns it off).
    #[arg(long, env = "TROVE_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    /// Longest wait for in-flight calls at shutdown, in seconds.
    #[arg(long, env = "TROVE_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

impl Config {
    /// The store settings these flags describe.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            inline_limit: usize::try_from(self.inline_limit_bytes).unwrap_or(usize::MAX),
            read_chunk_bytes: usize::try_from(self.chunk_bytes).unwrap_or(usize::MAX),
            durability: match self.durability {
                DurabilityMode::Strict => Durability::Strict,
                DurabilityMode::Relaxed => Durability::Relaxed,
            },
        }
    }

    /// The largest message, as a `usize`.
    pub fn max_message(&self) -> usize {
        usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX)
    }

    /// Defaults with a given data folder and listen address (for embedding and tests).
    pub fn for_dir(data_dir: PathBuf, listen: SocketAddr) -> Self {
        let mut config = Config::parse_from(["trove-server"]);
        config.data_dir = data_dir;
        config.listen = listen;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out-of-range values are refused with a message naming the flag.
    #[test]
    fn invalid_values_are_rejected() {
        let err = Config::try_parse_from(["trove-server", "--max-message-bytes", "5"])
            .expect_err("too small");
        assert!(err.to_string().contains("--max-message-bytes"), "{err}");
        let err = Config::try_parse_from(["trove-server", "--durability", "maybe"])
            .expect_err("unknown mode");
        assert!(err.to_string().contains("--durability"), "{err}");
        let ok = Config::try_parse_from(["trove-server", "--listen", "127.0.0.1:0"]);
        assert!(ok.is_ok());
    }
}
