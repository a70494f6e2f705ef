//! `trove-bench`: drives a real `trove-server` over loopback and reports
//! throughput, latency percentiles and scaling, each figure next to a
//! baseline measured in the same run (the in-process store, a null store
//! behind Trove's own gRPC adapters, raw loopback TCP, Redis when
//! installed). See BENCHMARKS.md for what each workload means.

mod baselines;
mod disk;
mod load;
mod report;
mod workloads;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use report::{Machine, Report};
use workloads::{Bench, Params};

/// The same allocator as the server, so that the baselines that run in this
/// process (the in-process store, the null gRPC server) are measured on
/// equal terms.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmark a Trove server against baselines measured in the same run.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Short measurements and moderate sizes: finishes in under two minutes
    /// on 2 cores. The default.
    #[arg(long, conflicts_with_all = ["full", "tiny"])]
    quick: bool,
    /// Every size (1 GiB objects, 10^6 stored items) and 5 s measurements.
    #[arg(long, conflicts_with = "tiny")]
    full: bool,
    /// Tiny sizes that only check that every workload still runs.
    #[arg(long)]
    tiny: bool,
    /// Folder for report.json and the SVG charts.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// The server binary to benchmark (default: `trove-server` next to this program).
    #[arg(long, env = "TROVE_SERVER_BIN")]
    server_bin: Option<PathBuf>,
    /// Length of each measurement, in milliseconds (overrides the mode).
    #[arg(long)]
    duration_ms: Option<u64>,
    /// Callers in flight for the throughput workloads (overrides the mode).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Size of the small values, in bytes (overrides the mode).
    #[arg(long)]
    small_bytes: Option<usize>,
    /// Sizes of the bulk objects, in MiB, comma separated (overrides the mode).
    #[arg(long, value_delimiter = ',')]
    bulk_mib: Option<Vec<usize>>,
    /// Run only these workload groups, comma separated (for profiling one
    /// path): small-values, find-missing, appends, cassette-reads, bulk,
    /// cache, eviction, tls, sidecar, concurrency-curve, payload-curve,
    /// store-size-curve, bucket.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    #[command(subcommand)]
    command: Option<Internal>,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// Fills a data directory with 1 KiB values (used by the store-size
    /// scaling step, in a process of its own).
    #[command(hide = true)]
    Prefill {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
        #[arg(long)]
        value_bytes: usize,
    },
}

fn params(args: &Args) -> Params {
    let mut params = if args.full {
        Params::full()
    } else if args.tiny {
        Params::tiny()
    } else {
        Params::quick()
    };
    if let Some(ms) = args.duration_ms {
        params.duration = Duration::from_millis(ms.max(1));
    }
    if let Some(c) = args.concurrency {
        params.concurrency = c.max(1);
    }
    if let Some(bytes) = args.small_bytes {
        params.small_bytes = bytes.max(1);
    }
    if let Some(only) = &args.only {
        params.only = only.clone();
    }
    if let Some(sizes) = &args.bulk_mib {
        params.bulk_sizes = sizes.iter().map(|m| m.max(&1) * 1024 * 1024).collect();
    }
    params
}

/// The server binary: the flag or variable, else the one built next to this program.
fn server_binary(args: &Args) -> Result<PathBuf> {
    if let Some(path) = &args.server_bin {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().context("locate trove-bench")?;
    let sibling = exe.with_file_name("trove-server");
    if sibling.is_file() {
        return Ok(sibling);
    }
    bail!(
        "no trove-server binary next to {}; build both with \
         `cargo build --release -p trove-server -p trove-bench`, or pass --server-bin",
        exe.display()
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("start the runtime")
    };
    if let Some(Internal::Prefill {
        data_dir,
        from,
        to,
        value_bytes,
    }) = &args.command
    {
        return runtime()?.block_on(workloads::prefill(data_dir, *from, *to, *value_bytes));
    }
    let server = server_binary(&args)?;
    // The harness that starts servers reads the binary from this variable;
    // set it before any other thread exists.
    std::env::set_var("TROVE_SERVER_BIN", &server);
    let params = params(&args);
    let report = Report {
        mode: params.mode.to_owned(),
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: Machine::describe(),
        rows: vec![],
        comparisons: vec![],
        curves: vec![],
        facts: vec![],
        skipped: vec![],
    };
    println!(
        "trove-bench ({} mode) against {}",
        params.mode,
        server.display()
    );
    let started = std::time::Instant::now();
    let report =
        runtime()?.block_on(async move { Bench::start(params, report).await?.run().await })?;
    print!("{}", report.table());
    for path in report.write(&args.out)? {
        println!("wrote {}", path.display());
    }
    println!("finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
