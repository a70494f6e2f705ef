//! Server settings. Each one is a flag, a `TROVE_*` environment variable and a
//! key of an optional TOML file (`--config`); flags win over the environment,
//! the environment over the file, the file over defaults. Everything is
//! validated before anything starts, and errors name the setting.

mod file;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use serde::Serialize;

use crate::access::tls::TlsVersion;
use crate::engine::sled::{Durability, StoreOptions};

/// When writes are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// After the write is on disk (fsync shared between concurrent writers).
    Strict,
    /// Before the write is on disk; a crash may lose the last group commit
    /// in flight (milliseconds of writes, never a torn one).
    Relaxed,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Where the Prometheus endpoint listens: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(MetricsListen(None));
        }
        s.parse()
            .map(|addr| MetricsListen(Some(addr)))
            .map_err(|e| format!("{e}; expected HOST:PORT or \"off\""))
    }
}

impl Serialize for MetricsListen {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(addr) => serializer.serialize_str(&addr.to_string()),
            None => serializer.serialize_str("off"),
        }
    }
}

/// The Trove storage server.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "trove-server", version, about, long_about = None)]
pub struct Config {
    /// TOML file with settings (keys are the long flag names, with `_` or `-`).
    /// Flags and environment variables override it.
    #[arg(long, env = "TROVE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Print the effective settings as TOML and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,

    /// Address to serve gRPC on. Port 0 picks a free port; the bound address
    /// is printed on standard output as `listening on ADDR`.
    #[arg(long, env = "TROVE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Folder holding the data (created if missing).
    #[arg(long, env = "TROVE_DATA_DIR", default_value = "./trove-data")]
    pub data_dir: PathBuf,

    /// Storage engine: empty for the embedded sled store in `data_dir`, or an
    /// object store URL (`s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`) for stateless servers sharing one bucket.
    /// Credentials and region come from the provider's usual variables
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, ...).
    #[arg(long, env = "TROVE_STORE", default_value = "")]
    pub store: String,

    /// Endpoint of an S3-compatible server (SeaweedFS, MinIO, Ceph) for an
    /// `s3://` store; plain HTTP is allowed for `http://` endpoints.
    #[arg(long, env = "TROVE_S3_ENDPOINT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,

    /// On an object store: how old an unfinished write's marker must be
    /// before what it left behind is deleted, in seconds. Must exceed the
    /// longest upload.
    #[arg(long, env = "TROVE_RECLAIM_GRACE_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub reclaim_grace_secs: u64,

    /// On an object store: bytes of blob bodies (values over the inline
    /// limit) to keep in `data_dir/blob-cache` so repeated reads skip the
    /// store; 0 turns the cache off. Blobs never change, so a cached copy is
    /// never stale.
    #[arg(long, env = "TROVE_BLOB_CACHE_BYTES", default_value_t = 0)]
    pub blob_cache_bytes: u64,

    /// Address of the Prometheus endpoint (`/metrics`), or `off`. The bound
    /// address is printed on standard output as `metrics on ADDR`.
    #[arg(long, env = "TROVE_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: MetricsListen,

    /// Largest gRPC message accepted, in bytes; above it the call fails with
    /// RESOURCE_EXHAUSTED. Larger values must be streamed in several messages.
    #[arg(long, env = "TROVE_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024 * 1024))]
    pub max_message_bytes: u64,

    /// Most concurrent HTTP/2 streams (calls) per client connection.
    #[arg(long, env = "TROVE_MAX_CONCURRENT_STREAMS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Most calls served at once; more are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing (health checks are exempt).
    #[arg(long, env = "TROVE_MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// Most calls one client address may hold at once (0: no cap beyond
    /// `max_concurrent_requests`), so one caller cannot take every slot.
    /// Behind a proxy every caller shares its address: raise it or use 0.
    #[arg(long, env = "TROVE_MAX_CALLS_PER_PEER", default_value_t = 256)]
    pub max_calls_per_peer: u32,

    /// Most connections one client address may hold open (0: no cap);
    /// one more is closed as soon as it is accepted.
    #[arg(long, env = "TROVE_MAX_CONNECTIONS_PER_PEER", default_value_t = 256)]
    pub max_connections_per_peer: u32,

    /// Bytes of partly received messages the server holds at most, across
    /// every call: a message whose announced length does not fit is refused
    /// at once with RESOURCE_EXHAUSTED. At least `max_message_bytes`.
    #[arg(long, env = "TROVE_MAX_PENDING_MESSAGE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_pending_message_bytes: u64,

    /// Seconds a call may take to start sending its first message (0: no
    /// limit); past it the call ends with DEADLINE_EXCEEDED.
    #[arg(long, env = "TROVE_FIRST_MESSAGE_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub first_message_timeout_secs: u64,

    /// Longest silence, in seconds, while the server waits for the rest of
    /// a request (0: no limit); past it the call ends with DEADLINE_EXCEEDED.
    #[arg(long, env = "TROVE_IDLE_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub idle_timeout_secs: u64,

    /// Slowest arrival of a message, in bytes per second (0: no minimum): a
    /// message of N bytes must arrive within the idle timeout plus N / rate.
    #[arg(long, env = "TROVE_MIN_UPLOAD_RATE_BYTES", default_value_t = 128 * 1024)]
    pub min_upload_rate_bytes: u64,

    /// Longest time a call may take before DEADLINE_EXCEEDED, in seconds
    /// (0: no limit). A shorter deadline sent by the caller wins.
    #[arg(long, env = "TROVE_REQUEST_TIMEOUT_SECS", default_value_t = 300)]
    pub request_timeout_secs: u64,

    /// Size of the chunks that downloads are sent in, in bytes.
    #[arg(long, env = "TROVE_CHUNK_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024))]
    pub chunk_bytes: u64,

    /// Bytes of stored values (bodies as kept, every namespace together)
    /// the server accepts; a write that would pass it gets
    /// RESOURCE_EXHAUSTED. 0: no limit. Per-namespace quotas live in the
    /// config file as `[namespaces."name"]` tables with `max_bytes`.
    #[arg(long, env = "TROVE_MAX_DISK_BYTES", default_value_t = 0)]
    pub max_disk_bytes: u64,

    /// Bytes the data folder's filesystem keeps free: a write that would
    /// leave less gets RESOURCE_EXHAUSTED (checked at most every 200 ms).
    /// 0: no floor.
    #[arg(long, env = "TROVE_MIN_FREE_DISK_BYTES", default_value_t = 0)]
    pub min_free_disk_bytes: u64,

    /// Per-namespace quotas, from the config file's `[namespaces."name"]`
    /// tables (`max_bytes`, `on_full = "reject"`).
    #[arg(skip)]
    #[serde(skip)]
    pub namespaces: std::collections::BTreeMap<String, crate::engine::quota::NamespaceQuota>,

    /// Bytes of database pages the embedded store keeps in memory (the
    /// largest part of its resident memory); size it well under the memory
    /// limit of the container.
    #[arg(long, env = "TROVE_DB_CACHE_BYTES", default_value_t = crate::engine::sled::DEFAULT_CACHE_BYTES,
          value_parser = clap::value_parser!(u64).range(1024 * 1024..))]
    pub db_cache_bytes: u64,

    /// Values up to this size are kept inside the database; larger ones in
    /// separate blob files.
    #[arg(long, env = "TROVE_INLINE_LIMIT_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u64).range(0..=1024 * 1024))]
    pub inline_limit_bytes: u64,

    /// Size at which a value pack is sealed; only sealed packs are
    /// compacted, so smaller packs give space back sooner, for more files.
    #[arg(long, env = "TROVE_PACK_BYTES", default_value_t = crate::engine::sled::PACK_BYTES,
          value_parser = clap::value_parser!(u64).range(64 * 1024..=1 << 40))]
    pub pack_bytes: u64,

    /// How long after start compaction first looks at the value packs, and
    /// how often it looks again once any space was freed, in milliseconds.
    #[arg(long, env = "TROVE_COMPACTION_INTERVAL_MS", default_value_t = crate::engine::sled::COMPACTION_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub compaction_interval_ms: u64,

    /// When writes are acknowledged.
    #[arg(long, env = "TROVE_DURABILITY", value_enum, default_value = "strict")]
    pub durability: DurabilityMode,

    /// Log format.
    #[arg(long, env = "TROVE_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `trove_server=debug,info`.
    #[arg(long, env = "TROVE_LOG", default_value = "info")]
    pub log: String,

    /// Serve gRPC reflection (`--reflection false` turns it off).
    #[arg(long, env = "TROVE_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    /// On SIGTERM/SIGINT, keep serving this many seconds while health reports
    /// NOT_SERVING, so load balancers and probes move traffic away first.
    #[arg(long, env = "TROVE_DRAIN_GRACE_SECS", default_value_t = 0)]
    pub drain_grace_secs: u64,

    /// Longest wait for in-flight calls at shutdown, in seconds.
    #[arg(long, env = "TROVE_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,

    /// Serve gRPC over TLS with this PEM certificate chain (with --tls-key).
    /// Reloaded when the file changes or on SIGHUP.
    #[arg(long, env = "TROVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "TROVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by a CA in this PEM bundle (mutual
    /// TLS); `[[client]]` entries of --auth-tokens map them to grants.
    #[arg(long, env = "TROVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Lowest TLS version accepted.
    #[arg(long, env = "TROVE_TLS_MIN_VERSION", value_enum, default_value = "1.2")]
    pub tls_min_version: TlsVersion,

    /// Plaintext, unauthenticated listener answering only the standard gRPC
    /// health check, for probes that cannot do TLS or send tokens (the
    /// kubelet's), or "off".
    #[arg(long, env = "TROVE_HEALTH_LISTEN", default_value = "off")]
    pub health_listen: MetricsListen,

    /// Grants file (TOML) of bearer tokens, stored as SHA-256 hashes, and
    /// client-certificate mappings, each with namespaces and permissions.
    /// Reloaded when the file changes or on SIGHUP.
    #[arg(long, env = "TROVE_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// Serve a non-loopback address without tokens or client certificates:
    /// anyone who reaches the port may read, write and delete everything.
    #[arg(long, env = "TROVE_ALLOW_UNAUTHENTICATED", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_unauthenticated: bool,

    /// Another Trove server to be a tier in front of (`http://HOST:PORT` or
    /// `https://HOST:PORT`): writes go through to it, verified objects are
    /// kept and served locally, mutable data is revalidated or passed through.
    #[arg(long, env = "TROVE_UPSTREAM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,

    /// Bearer token sent to the upstream on every call.
    #[arg(
        long,
        env = "TROVE_UPSTREAM_TOKEN",
        requires = "upstream",
        hide_env_values = true
    )]
    #[serde(skip)]
    pub upstream_token: Option<String>,

    /// PEM bundle of the CAs to trust for the upstream's certificate
    /// (implies TLS to the upstream).
    #[arg(long, env = "TROVE_UPSTREAM_CA", requires = "upstream")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca: Option<PathBuf>,

    /// SHA-256 (64 lowercase hex) of a bearer token that `/metrics` requires;
    /// empty leaves it open (it binds to loopback by default).
    #[arg(long, env = "TROVE_METRICS_TOKEN_SHA256", default_value = "",
          value_parser = parse_token_hash)]
    pub metrics_token_sha256: String,
}

fn parse_token_hash(raw: &str) -> Result<String, String> {
    let ok = raw.is_empty()
        || (raw.len() == 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if ok {
        Ok(raw.to_owned())
    } else {
        Err("expected 64 lowercase hex characters: the SHA-256 of the token".into())
    }
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag, variable or file value is invalid (the message names it).
    #[error(transparent)]
    Invalid(#[from] clap::Error),
    /// The config file is unreadable or malformed.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Loads settings from the process's arguments, environment and config file.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    /// Loads settings from `args` (the first is the program name), the
    /// environment and the config file the arguments or environment name.
    pub fn load_from<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let matches = Config::command().try_get_matches_from(&args)?;
        let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
            return Ok(Config::from_arg_matches(&matches)?);
        };
        let table = file::file_table(&path)?;
        let from_file = file::file_arguments(&path, &table, &matches)?;
        // File values are passed as flags only for settings that nothing
        // else set, so the environment and real flags keep precedence.
        let mut merged = args;
        merged.extend(from_file);
        let matches = Config::command()
            .try_get_matches_from(&merged)
            .map_err(|e| ConfigError::File {
                path: path.clone(),
                message: e.to_string().trim().to_owned(),
            })?;
        let mut config = Config::from_arg_matches(&matches)?;
        // A tier's local copies are caches of its upstream: evicting them
        // loses nothing, so its quotas evict unless told otherwise.
        let default_on_full = if config.upstream.is_some() {
            crate::engine::quota::OnFull::Evict
        } else {
            crate::engine::quota::OnFull::Reject
        };
        config.namespaces = file::namespace_quotas(&path, &table, default_on_full)?;
        Ok(config)
    }

    /// The effective settings as TOML (what `--print-config` shows).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
    }

    /// Refuses settings that would expose every namespace to anyone who can
    /// reach the port: a non-loopback address with neither tokens nor client
    /// certificates, unless --allow-unauthenticated says the operator means it.
    pub fn check_exposure(&self) -> Result<(), String> {
        let protected = self.auth_tokens.is_some() || self.tls_client_ca.is_some();
        if self.listen.ip().is_loopback() || protected || self.allow_unauthenticated {
            return Ok(());
        }
        Err(format!(
            "refusing to serve {} without access control: anyone reaching it could read, write \
             and delete every namespace. Give --auth-tokens FILE (bearer tokens) or \
             --tls-client-ca FILE (client certificates), or pass --allow-unauthenticated if \
             the network around it is the protection",
            self.listen
        ))
    }

    /// Refuses a configuration whose limits contradict each other: the
    /// partly-received-message budget must hold at least one message of the
    /// largest size.
    pub fn check_limits(&self) -> Result<(), String> {
        if self.max_pending_message_bytes < self.max_message_bytes {
            return Err(format!(
                "--max-pending-message-bytes ({}) is smaller than --max-message-bytes ({}): a \
                 message of the largest accepted size could never be received. Raise the budget \
                 or lower the message limit",
                self.max_pending_message_bytes, self.max_message_bytes
            ));
        }
        Ok(())
    }

    /// The guards every call is admitted and read under.
    pub fn guards(&self) -> crate::guard::Guards {
        use std::time::Duration;
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        crate::guard::Guards {
            intake: crate::guard::IntakeLimits {
                budget: crate::guard::Budget::with_peer_share(
                    self.max_pending_message_bytes,
                    (self.max_pending_message_bytes / 2).max(self.max_message_bytes),
                ),
                first_message: secs(self.first_message_timeout_secs),
                idle: secs(self.idle_timeout_secs),
                min_rate: self.min_upload_rate_bytes,
            },
            calls_per_peer: crate::guard::PeerCounter::new(
                usize::try_from(self.max_calls_per_peer).unwrap_or(usize::MAX),
            ),
        }
    }

    /// Refuses object-store settings under which an upload still in progress
    /// could have its staged body reclaimed before it is published: the
    /// reclaim grace must outlast the longest call, so calls need a limit.
    pub fn check_reclaim_grace(&self) -> Result<(), String> {
        if self.store.is_empty() {
            return Ok(());
        }
        if self.request_timeout_secs == 0 {
            return Err(format!(
                "--request-timeout-secs 0 (no limit) cannot be used with an object store: an \
                 upload longer than --reclaim-grace-secs ({}) would have its staged body \
                 deleted before it is published. Give a request timeout shorter than the grace",
                self.reclaim_grace_secs
            ));
        }
        if self.reclaim_grace_secs <= self.request_timeout_secs {
            return Err(format!(
                "--reclaim-grace-secs ({}) must be longer than --request-timeout-secs ({}): an \
                 upload that runs to its deadline would have its staged body deleted before it \
                 is published. Raise the grace or lower the timeout",
                self.reclaim_grace_secs, self.request_timeout_secs
            ));
        }
        Ok(())
    }

    /// Settings that work but expose something, for a warning at start:
    /// tokens sent in plaintext beyond loopback, an open `/metrics` beyond
    /// loopback.
    pub fn exposure_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if !self.listen.ip().is_loopback() && self.auth_tokens.is_some() && self.tls_cert.is_none()
        {
            warnings.push(format!(
                "bearer tokens travel in plaintext to {}: give --tls-cert and --tls-key unless \
                 something in front (a mesh, a proxy) encrypts the connections",
                self.listen
            ));
        }
        if let Some(addr) = self.metrics_listen.0 {
            if !addr.ip().is_loopback() && self.metrics_token_sha256.is_empty() {
                warnings.push(format!(
                    "/metrics on {addr} is open to anyone who reaches it (it names principals \
                     and shows traffic); give --metrics-token-sha256 or keep it on loopback"
                ));
            }
        }
        warnings
    }

    /// The TLS settings, when TLS is on.
    pub fn tls(&self) -> Option<crate::access::tls::TlsSettings> {
        Some(crate::access::tls::TlsSettings {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
            min_version: self.tls_min_version,
        })
    }

    /// The bucket engine settings these flags describe.
    pub fn bucket_options(&self) -> crate::engine::bucket::BucketOptions {
        crate::engine::bucket::BucketOptions {
            inline_limit: usize::try_from(self.inline_limit_bytes).unwrap_or(64 * 1024),
            read_chunk_bytes: usize::try_from(self.chunk_bytes).unwrap_or(1024 * 1024),
            reclaim_grace: std::time::Duration::from_secs(self.reclaim_grace_secs),
            blob_cache: (self.blob_cache_bytes > 0)
                .then(|| (self.data_dir.join("blob-cache"), self.blob_cache_bytes)),
            ..Default::default()
        }
    }

    /// The store settings these flags describe.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            inline_limit: usize::try_from(self.inline_limit_bytes).unwrap_or(usize::MAX),
            pack_bytes: self.pack_bytes,
            compaction_interval: std::time::Duration::from_millis(self.compaction_interval_ms),
            read_chunk_bytes: usize::try_from(self.chunk_bytes).unwrap_or(usize::MAX),
            durability: match self.durability {
                DurabilityMode::Strict => Durability::Strict,
                DurabilityMode::Relaxed => Durability::Relaxed,
            },
            cache_bytes: self.db_cache_bytes,
            quotas: std::sync::Arc::new(self.quotas()),
            // A tier's local writes are copies fed beside the upstream's
            // write or the caller's read: waiting for eviction would stall
            // those; a refused copy is simply not kept.
            eviction_wait: if self.upstream.is_some() {
                std::time::Duration::ZERO
            } else {
                crate::engine::sled::DEFAULT_EVICTION_WAIT
            },
            faults: None,
        }
    }

    /// How to reach the upstream: its token and the CA to trust.
    pub fn upstream_options(&self) -> anyhow::Result<trove_client::ClientOptions> {
        let ca_pem = match &self.upstream_ca {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("--upstream-ca: cannot read {}: {e}", path.display())
            })?),
            None => None,
        };
        Ok(trove_client::ClientOptions {
            token: self.upstream_token.clone().filter(|t| !t.is_empty()),
            ca_pem,
            ..Default::default()
        })
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
        config.metrics_listen = MetricsListen(None);
        config
    }
}

/// The `[namespaces."*"]` table: the quota of every namespace without one.
const EVERY_NAMESPACE: &str = "*";

/// The capacity limits these settings describe.
impl Config {
    /// The quotas to enforce.
    pub fn quotas(&self) -> crate::engine::quota::Quotas {
        let mut namespaces = self.namespaces.clone();
        let every_namespace = namespaces.remove(EVERY_NAMESPACE);
        crate::engine::quota::Quotas {
            max_disk_bytes: (self.max_disk_bytes > 0).then_some(self.max_disk_bytes),
            namespaces,
            every_namespace,
            min_free_disk_bytes: self.min_free_disk_bytes,
        }
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
        let err = Config::try_parse_from(["trove-server", "--metrics-listen", "nowhere"])
            .expect_err("bad address");
        assert!(err.to_string().contains("--metrics-listen"), "{err}");
        let ok = Config::try_parse_from([
            "trove-server",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ]);
        assert_eq!(ok.map(|c| c.metrics_listen).ok(), Some(MetricsListen(None)));
    }

    /// On an object store the reclaim grace must outlast every call, so a
    /// staged upload is never reclaimed while it is still being written.
    #[test]
    fn reclaim_grace_must_outlast_the_request_timeout() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["trove-server", "--store", "s3://bucket/prefix"];
            args.extend_from_slice(extra);
            Config::try_parse_from(args).expect("parse")
        };
        assert_eq!(parse(&[]).check_reclaim_grace(), Ok(()));
        let unlimited = parse(&["--request-timeout-secs", "0"]).check_reclaim_grace();
        assert!(
            unlimited
                .as_ref()
                .is_err_and(|m| m.contains("--request-timeout-secs 0")),
            "{unlimited:?}"
        );
        let short = parse(&[
            "--reclaim-grace-secs",
            "300",
            "--request-timeout-secs",
            "300",
        ])
        .check_reclaim_grace();
        assert!(
            short
                .as_ref()
                .is_err_and(|m| m.contains("--reclaim-grace-secs (300)")),
            "{short:?}"
        );
        let sled = Config::try_parse_from(["trove-server", "--request-timeout-secs", "0"])
            .expect("parse")
            .check_reclaim_grace();
        assert_eq!(sled, Ok(()), "the embedded store stages nothing to reclaim");
    }

    /// The page cache size reaches the store, and a cache too small to work
    /// is refused by name.
    #[test]
    fn database_cache_size_reaches_the_store() {
        let config = Config::try_parse_from(["trove-server"]).expect("parse");
        assert_eq!(
            config.store_options().cache_bytes,
            crate::engine::sled::DEFAULT_CACHE_BYTES
        );
        let config = Config::try_parse_from(["trove-server", "--db-cache-bytes", "134217728"])
            .expect("parse");
        assert_eq!(config.store_options().cache_bytes, 128 << 20);
        let err = Config::try_parse_from(["trove-server", "--db-cache-bytes", "10"])
            .expect_err("too small");
        assert!(err.to_string().contains("--db-cache-bytes"), "{err}");
    }

    /// A config file fills in what flags leave out; flags win; bad keys are named.
    #[test]
    fn config_file_layers_under_flags() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("trove.toml");
        std::fs::write(
            &file,
            "chunk_bytes = 4096\nlog = \"debug\"\nreflection = false\n",
        )
        .expect("write");
        let path = file.to_string_lossy().to_string();
        let config =
            Config::load_from(["trove-server", "--config", &path, "--log", "warn"]).expect("load");
        assert_eq!(
            (config.chunk_bytes, config.log.as_str(), config.reflection),
            (4096, "warn", false)
        );
        std::fs::write(&file, "chunk_bytes = 1\n").expect("write");
        let err = Config::load_from(["trove-server", "--config", &path]).expect_err("out of range");
        assert!(err.to_string().contains("--chunk-bytes"), "{err}");
        std::fs::write(&file, "no_such_setting = 1\n").expect("write");
        let err = Config::load_from(["trove-server", "--config", &path]).expect_err("unknown");
        assert!(err.to_string().contains("no_such_setting"), "{err}");
        std::fs::write(&file, "chunk_bytes = [1]\n").expect("write");
        assert!(Config::load_from(["trove-server", "--config", &path]).is_err());
    }

    /// Quotas come from the file's `[namespaces."name"]` tables and the
    /// `max_disk_bytes` setting; a mistake in a table stops the start.
    /// `[namespaces."*"]` is the quota of every namespace without one; in
    /// a tier (`--upstream`) quotas evict unless `on_full` says otherwise.
    #[test]
    fn a_quota_for_every_namespace_and_the_tier_default() {
        use crate::engine::quota::OnFull;
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("trove.toml");
        std::fs::write(
            &file,
            "[namespaces.\"*\"]\nmax_bytes = 1000\n[namespaces.\"kept\"]\nmax_bytes = 50\non_full = \"reject\"\n",
        )
        .expect("write");
        let file = file.to_str().expect("path");
        let plain = Config::load_from(["trove-server", "--config", file]).expect("load");
        let quotas = plain.quotas();
        assert_eq!(
            quotas.namespace("any").map(|q| (q.max_bytes, q.on_full)),
            Some((1000, OnFull::Reject))
        );
        assert_eq!(quotas.namespace("kept").map(|q| q.max_bytes), Some(50));
        assert!(!quotas.namespaces.contains_key("*"));
        let tier = Config::load_from([
            "trove-server",
            "--config",
            file,
            "--upstream",
            "http://127.0.0.1:1",
        ])
        .expect("load");
        let quotas = tier.quotas();
        assert_eq!(
            quotas.namespace("any").map(|q| q.on_full),
            Some(OnFull::Evict)
        );
        assert_eq!(
            quotas.namespace("kept").map(|q| q.on_full),
            Some(OnFull::Reject)
        );
        assert!(quotas.evicts_anywhere());
        // A tier's local copies never wait for eviction; a server's uploads do.
        assert_eq!(
            tier.store_options().eviction_wait,
            std::time::Duration::ZERO
        );
        assert!(plain.store_options().eviction_wait > std::time::Duration::ZERO);
    }

    #[test]
    fn quotas_come_from_the_config_file() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("trove.toml");
        std::fs::write(
            &file,
            "max_disk_bytes = 1_000_000
[namespaces.\"ci-cache\"]
max_bytes = 5000
on_full = \"reject\"
",
        )
        .expect("write");
        let path = file.to_string_lossy().to_string();
        let quotas = Config::load_from(["trove-server", "--config", &path])
            .expect("load")
            .quotas();
        assert_eq!(quotas.max_disk_bytes, Some(1_000_000));
        assert_eq!(
            quotas.namespace("ci-cache").map(|q| q.max_bytes),
            Some(5000)
        );
        assert!(quotas.namespace("other").is_none());
        std::fs::write(&file, "[namespaces.ci]\nmax_bytes = 0\n").expect("write");
        let err = Config::load_from(["trove-server", "--config", &path]).expect_err("zero quota");
        assert!(
            err.to_string().contains("namespaces.\"ci\".max_bytes"),
            "{err}"
        );
    }
}
