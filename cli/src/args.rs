//! The command line's grammar: every command, flag and environment variable of
//! `trove`, in one place, so the help text, the shell completions and the man
//! page are all generated from the same definitions. Parsing only: nothing
//! here talks to a server.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Talk to a Trove server: put and get files, list what is stored, read and
/// write cassettes, drive the test cache.
///
/// Values are streamed in chunks, never held whole in memory. FILE may be `-`
/// for standard input or output. Transfers draw a progress bar on standard
/// error when it is a terminal, and nothing when it is not.
#[derive(Debug, Parser)]
#[command(
    name = "trove",
    version,
    propagate_version = true,
    after_help = EXIT_CODES_HELP,
    after_long_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Server address: `host:port`, or a full `http://` URI.
    #[arg(
        long,
        env = "TROVE_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub addr: String,

    /// Namespace to work in (a tenant: nothing is shared across namespaces).
    #[arg(
        short = 'n',
        long,
        env = "TROVE_NAMESPACE",
        default_value = "default",
        global = true
    )]
    pub namespace: String,

    /// Print machine-readable JSON: one object per line for listings, one
    /// object otherwise.
    #[arg(long, global = true)]
    pub json: bool,

    /// Bearer token sent on every call.
    #[arg(long, env = "TROVE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,

    /// PEM bundle of the CAs to trust for the server's certificate; turns TLS
    /// on (so does an `https://` address).
    #[arg(long, env = "TROVE_CA", value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,

    /// PEM client certificate, for servers that require mutual TLS.
    #[arg(
        long,
        env = "TROVE_CLIENT_CERT",
        value_name = "FILE",
        global = true,
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,

    /// PEM key of --client-cert.
    #[arg(
        long,
        env = "TROVE_CLIENT_KEY",
        value_name = "FILE",
        global = true,
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,

    /// The name the server's certificate must carry, when the address differs.
    #[arg(long, env = "TROVE_TLS_DOMAIN", value_name = "NAME", global = true)]
    pub tls_domain: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The exit codes, shown at the end of `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  any other failure (local I/O, an unexpected server error)
  2  the command line is wrong
  3  not found (a missing object, artifact, cassette or a cache miss)
  4  invalid input (the server or the CLI refused a name, a value or a line)
  5  permission denied or not authenticated
  6  unavailable (cannot connect, the server is not serving, a deadline passed)
  7  a server limit was reached (message size, concurrency, disk)
  8  stored data is damaged (data loss, or a download that fails its SHA-256)
  130  interrupted (Ctrl-C); nothing half-written is left behind";

/// The top-level commands, one per operation group plus tooling.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Content-addressed objects (a 64-hex-character hash is verified as SHA-256).
    #[command(subcommand)]
    Objects(ObjectsCommand),
    /// Timestamped chunk streams, as JSON lines `{"data": BASE64, "timestamp": N}`.
    #[command(subcommand)]
    Streams(StreamsCommand),
    /// Mutable values under keys.
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// Cassettes: ordered logs of recorded interactions, as JSON lines.
    #[command(subcommand)]
    Cassettes(CassettesCommand),
    /// The remote test cache: archives per ref in a main tier and PR tiers.
    Cache(CacheArgs),
    /// Asks the server's standard health check; exit 0 when it is serving.
    Health {
        /// Service to ask about (empty: the whole server).
        #[arg(long, default_value = "")]
        service: String,
        /// Give up (exit 6) when the server has not answered after this long.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_secs: u64,
    },
    /// Prints a shell completion script to standard output.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Prints the man page (roff) to standard output, or with --dir writes
    /// one page per command into DIR (`trove.1`, `trove-objects-put.1`, ...).
    Man {
        /// Folder to write every page into.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `trove objects ...`
#[derive(Debug, Subcommand)]
pub enum ObjectsCommand {
    /// Stores a file under its SHA-256 and prints the hash.
    Put {
        /// File to store, or `-` for standard input (spooled to a temporary
        /// file while hashing, since the hash travels first).
        file: PathBuf,
        /// Store under this name instead of the computed SHA-256 (a
        /// 64-hex-character name is still verified by the server).
        #[arg(long)]
        hash: Option<String>,
    },
    /// Writes an object to FILE (atomically: all or nothing) or standard output.
    Get {
        /// The object's hash.
        hash: String,
        /// Destination; standard output when absent or `-`.
        file: Option<PathBuf>,
    },
    /// Shows an object's size, digest and creation time.
    Stat {
        /// The object's hash.
        hash: String,
    },
    /// Lists hashes (objects and streams) in byte order.
    Ls {
        /// Only hashes starting with this.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Deletes an object and the stream under the same hash (idempotent).
    Rm {
        /// The object's hash.
        hash: String,
    },
    /// Prints the hashes the server does not have, one per line.
    Missing {
        /// Hashes to check; read from standard input, one per line, when none are given.
        hashes: Vec<String>,
    },
}

/// `trove streams ...`
#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// Stores chunks read as JSON lines (`{"data": BASE64}` or `{"text": "..."}`,
    /// each with an optional integer `"timestamp"`), replacing any earlier stream.
    Put {
        /// The stream's identifier.
        hash: String,
        /// JSON-lines file, or `-` (the default) for standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
    },
    /// Prints a stream's chunks as JSON lines `{"data": BASE64, "timestamp": N}`.
    Get {
        /// The stream's identifier.
        hash: String,
    },
}

/// `trove artifacts ...`
#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// Stores a file under KEY, replacing any earlier value atomically.
    Put {
        /// The key.
        key: String,
        /// File to store; standard input when absent or `-`.
        file: Option<PathBuf>,
        /// Media type recorded with the value.
        #[arg(long, default_value = "")]
        content_type: String,
    },
    /// Writes a value to FILE (atomically: all or nothing) or standard output.
    Get {
        /// The key.
        key: String,
        /// Destination; standard output when absent or `-`.
        file: Option<PathBuf>,
    },
    /// Shows a value's size, digest, times and content type.
    Stat {
        /// The key.
        key: String,
    },
    /// Lists keys in byte order, with sizes.
    Ls {
        /// Only keys starting with this.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Deletes a key (idempotent).
    Rm {
        /// The key.
        key: String,
    },
}

/// `trove cassettes ...`
#[derive(Debug, Subcommand)]
pub enum CassettesCommand {
    /// Lists cassette names in byte order.
    Ls {
        /// Only names starting with this.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Prints a cassette's entries in recorded-time order, one JSON object per line.
    Read {
        /// The cassette.
        name: String,
        /// Print each entry as `{"recorded_at": N, "cursor": C, "entry": {...}}`.
        #[arg(long)]
        with_meta: bool,
    },
    /// Appends JSON lines (one object each), sent in batches; each batch is
    /// all or nothing, and a bad line stops before its batch is sent.
    Append {
        /// The cassette.
        name: String,
        /// JSON-lines file, or `-` (the default) for standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// Read lines as `{"recorded_at": N, "entry": {...}}` (what `read --with-meta` prints).
        #[arg(long)]
        with_meta: bool,
        /// Entries per Append call.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
    },
    /// Replaces the whole cassette with JSON lines, atomically: readers see
    /// all of the old content or all of the new, and a bad line changes nothing.
    Replace {
        /// The cassette.
        name: String,
        /// JSON-lines file, or `-` (the default) for standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// Read lines as `{"recorded_at": N, "entry": {...}}`.
        #[arg(long)]
        with_meta: bool,
    },
    /// Deletes a cassette (idempotent).
    Rm {
        /// The cassette.
        name: String,
    },
    /// Prints whether a cassette exists; exit 0 when it does, 3 when not.
    Exists {
        /// The cassette.
        name: String,
    },
}

/// `trove cache [SCOPE] ...`
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Where the command applies.
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: CacheCommand,
}

/// The cache scope: a prefix in the namespace, and the branch that picks the tier.
#[derive(Debug, Args)]
pub struct ScopeArgs {
    /// Key prefix within the namespace (for example the repository).
    #[arg(long, default_value = "", global = true)]
    pub prefix: String,
    /// Branch being built; a branch other than the default one uses its own PR tier.
    #[arg(long, default_value = "main", global = true)]
    pub branch: String,
    /// The repository's default branch (the main tier).
    #[arg(long, default_value = "main", global = true)]
    pub default_branch: String,
    /// Test suite identifier, when the repository has several.
    #[arg(long, default_value = "", global = true)]
    pub suite: String,
}

/// `trove cache ...`
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Lists the scope's own tier's refs, newest first.
    Ls,
    /// Uploads an archive under REF into the scope's own tier.
    Upload {
        /// The ref (usually a commit sha).
        reference: String,
        /// Archive to upload, or `-` for standard input.
        file: PathBuf,
        /// Also record a pointer from this tree sha to REF.
        #[arg(long)]
        tree_sha: Option<String>,
        /// Upload time in microseconds since the epoch (default: the server's clock).
        #[arg(long)]
        uploaded_at: Option<i64>,
    },
    /// Downloads REF's archive (own tier, then main); exit 3 on a miss.
    Download {
        /// The ref.
        reference: String,
        /// Destination; standard output when absent or `-`.
        file: Option<PathBuf>,
        /// Try the pointer recorded for this tree sha first.
        #[arg(long)]
        tree_sha: Option<String>,
    },
    /// Applies retention to the scope's own tier and prints how many refs went.
    Prune {
        /// Keep only the newest N refs.
        #[arg(long, default_value_t = 0)]
        count: i64,
        /// Remove refs uploaded more than this many seconds ago.
        #[arg(long, default_value_t = 0)]
        older_than_secs: i64,
        /// Remove a PR branch whole when its newest ref is older than this.
        #[arg(long, default_value_t = 0)]
        pr_branch_ttl_secs: i64,
        /// Apply --pr-branch-ttl-secs to every PR branch under --prefix instead.
        #[arg(long, conflicts_with_all = ["count", "older_than_secs"], requires = "pr_branch_ttl_secs")]
        all: bool,
    },
    /// Prints a branch's sha -> epoch-seconds map as JSON, or replaces it with --write.
    BranchRefs {
        /// The branch (default: --branch).
        branch: Option<String>,
        /// Replace the map with the JSON object in this file (`-`: standard input).
        #[arg(long, value_name = "FILE")]
        write: Option<PathBuf>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The grammar is consistent (clap's own debug checks: no clashing flags).
    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Scope flags may come before or after the cache subcommand.
    #[test]
    fn scope_flags_go_anywhere() {
        for argv in [
            &["trove", "cache", "--branch", "pr-1", "ls"][..],
            &["trove", "cache", "ls", "--branch", "pr-1"][..],
        ] {
            let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string());
            match cli.map(|c| c.command) {
                Ok(Command::Cache(args)) => assert_eq!(args.scope.branch, "pr-1"),
                other => panic!("{argv:?} parsed as {other:?}"),
            }
        }
    }
}
