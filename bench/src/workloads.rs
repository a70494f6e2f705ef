//! The workloads, each run against Trove over loopback and against the
//! baselines it is compared with. Workloads are written against the storage
//! traits, so the same code drives the remote client, the in-process store
//! and the null store behind Trove's gRPC adapters.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use trove_client::TroveClient;
use trove_proto::artifacts::PutOptions;
use trove_proto::cache::{CacheScope, UploadOptions};
use trove_proto::entries::{NewEntry, ReadOptions};
use trove_proto::types::{ByteStream, Name, Namespace};
use trove_proto::{ArtifactStore, CacheStore, EntryStore, ObjectStore};
use trove_server::store::{SledStore, StoreOptions};
use trove_tests::harness::ServerProcess;

use crate::baselines::{redis_binary, start_null_server, RawTcpPeer, RedisServer};
use crate::load::{closed_loop, op, open_loop, Measured, Op, Sequence};
use crate::report::{Curve, Point, Report, Row, Series};

mod bucket;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Sizes and durations of one run.
#[derive(Debug, Clone)]
pub struct Params {
    /// `tiny`, `quick` or `full`.
    pub mode: &'static str,
    /// How long each closed-loop or open-loop measurement runs.
    pub duration: Duration,
    /// Callers in flight for the throughput workloads.
    pub concurrency: usize,
    /// Size of the small values.
    pub small_bytes: usize,
    /// Keys the small gets pick from.
    pub small_keys: usize,
    /// Hashes per find-missing call.
    pub find_missing_batch: usize,
    /// Entries in the cassette that is read back.
    pub cassette_entries: usize,
    /// Sizes of the bulk object puts and gets.
    pub bulk_sizes: Vec<usize>,
    /// Size of a cache archive.
    pub archive_bytes: usize,
    /// Concurrency levels of the scaling curve.
    pub concurrency_levels: Vec<usize>,
    /// Payload sizes of the scaling curve.
    pub payload_sizes: Vec<usize>,
    /// Stored-item counts of the scaling curve.
    pub store_levels: Vec<u64>,
}

impl Params {
    /// Finishes in under two minutes on 2 cores.
    pub fn quick() -> Self {
        Params {
            mode: "quick",
            duration: Duration::from_millis(1000),
            concurrency: 16,
            small_bytes: 4 * KIB,
            small_keys: 1000,
            find_missing_batch: 1000,
            cassette_entries: 20_000,
            bulk_sizes: vec![64 * MIB],
            archive_bytes: 5 * MIB,
            concurrency_levels: vec![1, 4, 16, 64, 256],
            payload_sizes: vec![KIB, 16 * KIB, 256 * KIB, 4 * MIB, 64 * MIB],
            store_levels: vec![1_000, 10_000, 100_000],
        }
    }

    /// Every size the issue asks for, with longer measurements.
    pub fn full() -> Self {
        Params {
            mode: "full",
            duration: Duration::from_secs(5),
            small_keys: 10_000,
            cassette_entries: 200_000,
            bulk_sizes: vec![64 * MIB, 1024 * MIB],
            concurrency_levels: vec![1, 2, 4, 8, 16, 32, 64, 128, 256],
            payload_sizes: vec![
                KIB,
                4 * KIB,
                16 * KIB,
                64 * KIB,
                256 * KIB,
                MIB,
                4 * MIB,
                16 * MIB,
                64 * MIB,
            ],
            store_levels: vec![1_000, 10_000, 100_000, 1_000_000],
            ..Self::quick()
        }
    }

    /// Tiny sizes: checks that every workload still runs, measures nothing useful.
    pub fn tiny() -> Self {
        Params {
            mode: "tiny",
            duration: Duration::from_millis(100),
            concurrency: 4,
            small_keys: 20,
            find_missing_batch: 20,
            cassette_entries: 300,
            bulk_sizes: vec![2 * MIB],
            archive_bytes: 64 * KIB,
            concurrency_levels: vec![1, 4],
            payload_sizes: vec![KIB, 128 * KIB],
            store_levels: vec![100, 300],
            ..Self::quick()
        }
    }
}

/// Deterministic filler bytes (no two seeds alike), cheap to make in bulk.
pub fn filler(len: usize, seed: u64) -> Bytes {
    let mut out = Vec::with_capacity(len + 8);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        // xorshift64*: fast, and different for every seed.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn body(data: &Bytes) -> ByteStream {
    let chunks: Vec<Result<Bytes, trove_proto::Error>> = (0..data.len().div_ceil(MIB).max(1))
        .map(|i| Ok(data.slice(i * MIB..((i + 1) * MIB).min(data.len()))))
        .collect();
    futures::stream::iter(chunks).boxed()
}

async fn drain(mut data: ByteStream) -> Result<u64> {
    let mut len = 0u64;
    while let Some(chunk) = data.next().await {
        len += chunk?.len() as u64;
    }
    Ok(len)
}

/// A JSON entry of exactly `len` bytes (at least 40).
fn entry_json(recorded_at: u64, len: usize) -> Bytes {
    let head = format!(r#"{{"recorded_at":{recorded_at},"pad":""#);
    let pad = len.saturating_sub(head.len() + 2);
    Bytes::from(format!("{head}{}\"}}", "x".repeat(pad)))
}

fn name(field: &str, value: String) -> Result<Name> {
    Ok(Name::new(field, value)?)
}

/// On-disk bytes (allocated blocks) under `dir`.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// Fills `data_dir` with `from..to` values of `value_bytes` under
/// `item/NNNNNNNNNN` keys, in-process, then flushes. Runs in its own
/// process (the hidden `prefill` command) so the store's lock is surely
/// released before a server opens the folder.
pub async fn prefill(data_dir: &Path, from: u64, to: u64, value_bytes: usize) -> Result<()> {
    let dir = data_dir.to_path_buf();
    let options = StoreOptions {
        durability: trove_server::store::Durability::Relaxed,
        ..StoreOptions::default()
    };
    let store = tokio::task::spawn_blocking(move || SledStore::open(&dir, options)).await??;
    let ns = Namespace::new("bench")?;
    let value = filler(value_bytes, 7);
    futures::stream::iter(from..to)
        .map(|i| {
            let (store, ns, value) = (store.clone(), ns.clone(), value.clone());
            async move {
                let key = name("key", format!("item/{i:010}"))?;
                store
                    .put_artifact(&ns, &key, PutOptions::default(), body(&value))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    store.flush().await?;
    Ok(())
}

/// One benchmark run.
pub struct Bench {
    params: Params,
    report: Report,
    seq: Arc<Sequence>,
    ns: Namespace,
    work_dir: tempfile::TempDir,
    server: ServerProcess,
    trove: TroveClient,
    local: SledStore,
    redis: Option<PathBuf>,
}

impl Bench {
    /// Starts the Trove server (defaults: strict durability) and opens the
    /// in-process store with the same options.
    pub async fn start(params: Params, report: Report) -> Result<Self> {
        let work_dir = tempfile::Builder::new().prefix("trove-bench").tempdir()?;
        let server = ServerProcess::start_in(&work_dir.path().join("server"), &[]).await;
        let trove = server.client().await;
        let local_dir = work_dir.path().join("in-process");
        let local = tokio::task::spawn_blocking(move || {
            SledStore::open(&local_dir, StoreOptions::default())
        })
        .await??;
        Ok(Bench {
            params,
            report,
            seq: Arc::new(Sequence::default()),
            ns: Namespace::new("bench")?,
            work_dir,
            server,
            trove,
            local,
            redis: redis_binary(),
        })
    }

    /// Runs every workload and returns the report.
    pub async fn run(mut self) -> Result<Report> {
        if self.redis.is_none() {
            self.report.skipped.push(
                "Redis baselines: no redis-server on PATH (install the distribution's \
                 redis-server package, or point TROVE_BENCH_REDIS at the binary)"
                    .to_owned(),
            );
        }
        self.small_values().await.context("small values")?;
        self.find_missing().await.context("find missing")?;
        self.appends().await.context("durable appends")?;
        self.cassette_reads().await.context("cassette reads")?;
        self.bulk().await.context("bulk objects")?;
        self.cache().await.context("cache archives")?;
        self.concurrency_curve()
            .await
            .context("concurrency scaling")?;
        self.payload_curve().await.context("payload scaling")?;
        self.store_size_curve()
            .await
            .context("store-size scaling")?;
        match bucket::S3Cluster::from_env() {
            Some(cluster) => self
                .bucket_workloads(&cluster)
                .await
                .context("bucket engine")?,
            None => self.report.skipped.push(
                "S3 engine: no cluster (set TROVE_S3_ENDPOINT, TROVE_S3_BUCKET and AWS_*; \
                 `.ci/seaweedfs.sh start DIR` starts a SeaweedFS cluster and writes them to DIR/env)"
                    .to_owned(),
            ),
        }
        if let Some(rss) = self.server.peak_rss_bytes() {
            self.report.fact(
                "server peak RSS over the whole run",
                rss as f64 / MIB as f64,
                "MiB",
            );
        }
        Ok(self.report)
    }

    async fn measure(&self, concurrency: usize, op: &Op) -> Result<Measured> {
        closed_loop(concurrency, self.params.duration, &self.seq, op).await
    }

    fn row(&mut self, workload: &str, target: &str, concurrency: usize, m: &Measured) {
        let row = Row::new(workload, target, concurrency, m);
        println!(
            "  {workload:<34} {target:<18} {:>10.0} ops/s  p99 {} µs",
            row.ops_per_sec, row.latency.p99_us
        );
        self.report.rows.push(row);
    }

    async fn null_client(
        &self,
        payload: Bytes,
    ) -> Result<(crate::baselines::BackgroundServer, TroveClient)> {
        let server = start_null_server(payload)?;
        let client = TroveClient::connect(&server.addr.to_string()).await?;
        Ok((server, client))
    }

    fn artifact_put(
        &self,
        store: Arc<dyn ArtifactStore>,
        prefix: &str,
        value: Bytes,
        keys: usize,
    ) -> Op {
        let (ns, prefix) = (self.ns.clone(), prefix.to_owned());
        op(move |seq| {
            let (store, ns, value) = (Arc::clone(&store), ns.clone(), value.clone());
            let key = format!("{prefix}/{}", seq % keys as u64);
            async move {
                let key = name("key", key)?;
                store
                    .put_artifact(&ns, &key, PutOptions::default(), body(&value))
                    .await?;
                Ok(value.len() as u64)
            }
        })
    }

    fn artifact_get(
        &self,
        store: Arc<dyn ArtifactStore>,
        prefix: &str,
        size: usize,
        keys: usize,
    ) -> Op {
        let (ns, prefix) = (self.ns.clone(), prefix.to_owned());
        op(move |seq| {
            let (store, ns) = (Arc::clone(&store), ns.clone());
            // A stride that is coprime with any key count spreads reads over the keys.
            let key = format!("{prefix}/{}", seq.wrapping_mul(7919) % keys as u64);
            async move {
                let key = name("key", key)?;
                let (_, data) = store.get_artifact(&ns, &key).await?;
                let len = drain(data).await?;
                if len != size as u64 {
                    bail!("read {len} bytes of {key}, expected {size}");
                }
                Ok(len)
            }
        })
    }

    async fn fill(&self, put: &Op, keys: usize) -> Result<()> {
        futures::stream::iter(0..keys as u64)
            .map(|i| put(i))
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Ok(())
    }

    /// Small artifact puts and gets: Trove against the null gRPC store (the
    /// transport limit), the in-process store (the storage limit) and Redis.
    async fn small_values(&mut self) -> Result<()> {
        let p = self.params.clone();
        let label = format!("artifact {} B", p.small_bytes);
        println!("small values ({label}, concurrency {})", p.concurrency);
        let value = filler(p.small_bytes, 1);
        let (_null, null) = self.null_client(value.clone()).await?;
        let targets: Vec<(&str, Arc<dyn ArtifactStore>)> = vec![
            ("trove", Arc::new(self.trove.clone())),
            ("in-process store", Arc::new(self.local.clone())),
            ("null gRPC", Arc::new(null)),
        ];
        let mut puts = Vec::new();
        let mut gets = Vec::new();
        for (target, store) in &targets {
            let put = self.artifact_put(Arc::clone(store), "small", value.clone(), p.small_keys);
            self.fill(&put, p.small_keys).await?;
            let m = self.measure(p.concurrency, &put).await?;
            self.row(&format!("{label} put"), target, p.concurrency, &m);
            puts.push(m);
            let get = self.artifact_get(Arc::clone(store), "small", p.small_bytes, p.small_keys);
            let m = self.measure(p.concurrency, &get).await?;
            self.row(&format!("{label} get"), target, p.concurrency, &m);
            gets.push(m);
        }
        let unit = "ops/s";
        for (kind, m) in [("put", &puts), ("get", &gets)] {
            let figure = format!("small {kind} throughput");
            self.report.compare(
                &figure,
                unit,
                m[0].ops_per_sec(),
                "null gRPC",
                m[2].ops_per_sec(),
            );
            self.report.compare(
                &figure,
                unit,
                m[0].ops_per_sec(),
                "in-process store",
                m[1].ops_per_sec(),
            );
        }

        if let Some(binary) = self.redis.clone() {
            let redis =
                RedisServer::start(&binary, &self.work_dir.path().join("redis"), false).await?;
            let keys = p.small_keys as u64;
            let set = {
                let (conn, value) = (redis.connection.clone(), value.clone());
                op(move |seq| {
                    let (mut conn, value) = (conn.clone(), value.clone());
                    async move {
                        redis::cmd("SET")
                            .arg(format!("small/{}", seq % keys))
                            .arg(&value[..])
                            .query_async::<()>(&mut conn)
                            .await?;
                        Ok(value.len() as u64)
                    }
                })
            };
            self.fill(&set, p.small_keys).await?;
            let m_set = self.measure(p.concurrency, &set).await?;
            self.row(&format!("{label} SET"), "redis", p.concurrency, &m_set);
            let get = {
                let conn = redis.connection.clone();
                let size = p.small_bytes;
                op(move |seq| {
                    let mut conn = conn.clone();
                    async move {
                        let value: Vec<u8> = redis::cmd("GET")
                            .arg(format!("small/{}", seq.wrapping_mul(7919) % keys))
                            .query_async(&mut conn)
                            .await?;
                        if value.len() != size {
                            bail!("redis returned {} bytes, expected {size}", value.len());
                        }
                        Ok(value.len() as u64)
                    }
                })
            };
            let m_get = self.measure(p.concurrency, &get).await?;
            self.row(&format!("{label} GET"), "redis", p.concurrency, &m_get);
            self.report.compare(
                "small put throughput",
                unit,
                puts[0].ops_per_sec(),
                "redis SET (no persistence)",
                m_set.ops_per_sec(),
            );
            self.report.compare(
                "small get throughput",
                unit,
                gets[0].ops_per_sec(),
                "redis GET",
                m_get.ops_per_sec(),
            );
        }

        // Latency at half of Trove's peak, against the null store at the same rate.
        let rate = gets[0].ops_per_sec() / 2.0;
        let mut at_half = Vec::new();
        for (target, store) in [&targets[0], &targets[2]] {
            let get = self.artifact_get(Arc::clone(store), "small", p.small_bytes, p.small_keys);
            let m = open_loop(rate, p.duration, p.concurrency * 4, &self.seq, &get).await?;
            self.row(
                &format!("{label} get @ {rate:.0}/s"),
                target,
                p.concurrency * 4,
                &m,
            );
            at_half.push(m.latency());
        }
        self.report.compare_latency(
            "small get p50 at half of peak",
            at_half[0].p50_us,
            "null gRPC, same rate",
            at_half[1].p50_us,
        );
        self.report.compare_latency(
            "small get p99 at half of peak",
            at_half[0].p99_us,
            "null gRPC, same rate",
            at_half[1].p99_us,
        );
        Ok(())
    }

    /// Find-missing with half of the hashes present.
    async fn find_missing(&mut self) -> Result<()> {
        let batch = self.params.find_missing_batch;
        println!("find missing ({batch} hashes per call)");
        let mut hashes = Vec::with_capacity(batch);
        let mut present = Vec::new();
        for i in 0..batch {
            let content = filler(64, 10_000 + i as u64);
            let hash = name("hash", sha256_hex(&content))?;
            // Even positions exist, odd ones are missing: the null store
            // answers with the odd ones, the same reply size.
            if i % 2 == 0 {
                present.push((hash.clone(), content));
            }
            hashes.push(hash);
        }
        let (_null, null) = self.null_client(Bytes::new()).await?;
        let targets: Vec<(&str, Arc<dyn ObjectStore>)> = vec![
            ("trove", Arc::new(self.trove.clone())),
            ("in-process store", Arc::new(self.local.clone())),
            ("null gRPC", Arc::new(null)),
        ];
        let hashes = Arc::new(hashes);
        let mut results = Vec::new();
        for (target, store) in &targets {
            if *target != "null gRPC" {
                for (hash, content) in &present {
                    store
                        .put_object(&self.ns, hash, None, body(content))
                        .await?;
                }
            }
            let expected = batch - present.len();
            let find = {
                let (store, ns, hashes) = (Arc::clone(store), self.ns.clone(), Arc::clone(&hashes));
                op(move |_| {
                    let (store, ns, hashes) = (Arc::clone(&store), ns.clone(), Arc::clone(&hashes));
                    async move {
                        let missing = store.find_missing(&ns, &hashes).await?;
                        if missing.len() != expected {
                            bail!("{} hashes missing, expected {expected}", missing.len());
                        }
                        Ok(0)
                    }
                })
            };
            let m = self.measure(self.params.concurrency, &find).await?;
            self.row(
                &format!("find-missing x{batch}"),
                target,
                self.params.concurrency,
                &m,
            );
            results.push(m);
        }
        let figure = format!("find-missing ({batch} hashes) calls");
        self.report.compare(
            &figure,
            "ops/s",
            results[0].ops_per_sec(),
            "null gRPC",
            results[2].ops_per_sec(),
        );
        self.report.compare(
            &figure,
            "ops/s",
            results[0].ops_per_sec(),
            "in-process store",
            results[1].ops_per_sec(),
        );
        Ok(())
    }

    fn append_op(&self, store: Arc<dyn EntryStore>, prefix: &'static str, cassettes: u64) -> Op {
        let ns = self.ns.clone();
        op(move |seq| {
            let (store, ns) = (Arc::clone(&store), ns.clone());
            async move {
                let cassette = name("cassette", format!("{prefix}/{}", seq % cassettes))?;
                let recorded_at = i64::try_from(seq).unwrap_or(i64::MAX);
                let entry = NewEntry::parse("entry", entry_json(seq, KIB), Some(recorded_at))?;
                store
                    .append_entries(&ns, &cassette, vec![entry], Default::default())
                    .await?;
                Ok(KIB as u64)
            }
        })
    }

    /// Durable single-entry appends of 1 KiB, one cassette per caller.
    async fn appends(&mut self) -> Result<()> {
        let c = self.params.concurrency;
        println!("durable appends (1 KiB entries, concurrency {c})");
        let (_null, null) = self.null_client(Bytes::new()).await?;
        let targets: Vec<(&str, Arc<dyn EntryStore>)> = vec![
            ("trove", Arc::new(self.trove.clone())),
            ("in-process store", Arc::new(self.local.clone())),
            ("null gRPC", Arc::new(null)),
        ];
        let mut results = Vec::new();
        for (target, store) in &targets {
            let append = self.append_op(Arc::clone(store), "append", c as u64);
            let m = self.measure(c, &append).await?;
            self.row("append 1 KiB (durable)", target, c, &m);
            results.push(m);
        }
        let figure = "durable append throughput";
        self.report.compare(
            figure,
            "ops/s",
            results[0].ops_per_sec(),
            "in-process store",
            results[1].ops_per_sec(),
        );
        self.report.compare(
            figure,
            "ops/s",
            results[0].ops_per_sec(),
            "null gRPC",
            results[2].ops_per_sec(),
        );
        if let Some(binary) = self.redis.clone() {
            let redis =
                RedisServer::start(&binary, &self.work_dir.path().join("redis-aof"), true).await?;
            let set = {
                let conn = redis.connection.clone();
                op(move |seq| {
                    let mut conn = conn.clone();
                    async move {
                        redis::cmd("SET")
                            .arg(format!("append/{seq}"))
                            .arg(&entry_json(seq, KIB)[..])
                            .query_async::<()>(&mut conn)
                            .await?;
                        Ok(KIB as u64)
                    }
                })
            };
            let m = self.measure(c, &set).await?;
            self.row("SET 1 KiB (appendfsync always)", "redis", c, &m);
            self.report.compare(
                figure,
                "ops/s",
                results[0].ops_per_sec(),
                "redis appendfsync always",
                m.ops_per_sec(),
            );
        }
        // Write latency at half of Trove's peak, against the in-process store.
        let rate = results[0].ops_per_sec() / 2.0;
        let mut at_half = Vec::new();
        for (target, store) in [&targets[0], &targets[1]] {
            let append = self.append_op(Arc::clone(store), "append-rate", c as u64);
            let m = open_loop(rate, self.params.duration, c * 4, &self.seq, &append).await?;
            self.row(&format!("append 1 KiB @ {rate:.0}/s"), target, c * 4, &m);
            at_half.push(m.latency());
        }
        self.report.compare_latency(
            "durable append p50 at half of peak",
            at_half[0].p50_us,
            "in-process store, same rate",
            at_half[1].p50_us,
        );
        self.report.compare_latency(
            "durable append p99 at half of peak",
            at_half[0].p99_us,
            "in-process store, same rate",
            at_half[1].p99_us,
        );
        Ok(())
    }

    /// Chronological reads of a whole large cassette.
    async fn cassette_reads(&mut self) -> Result<()> {
        let n = self.params.cassette_entries;
        println!("cassette reads ({n} entries of 1 KiB, recorded out of order)");
        let targets: Vec<(&str, Arc<dyn EntryStore>)> = vec![
            ("trove", Arc::new(self.trove.clone())),
            ("in-process store", Arc::new(self.local.clone())),
        ];
        let cassette = name("cassette", "read/large".to_owned())?;
        let mut rates = Vec::new();
        for (target, store) in &targets {
            for start in (0..n).step_by(1000) {
                let batch = (start..(start + 1000).min(n))
                    .map(|i| {
                        // Interleaved timestamps, so reading has to reorder.
                        let at = ((i % 2) * n + i) as u64;
                        let recorded_at = i64::try_from(at).unwrap_or(i64::MAX);
                        NewEntry::parse("entry", entry_json(at, KIB), Some(recorded_at))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                store
                    .append_entries(&self.ns, &cassette, batch, Default::default())
                    .await?;
            }
            let read = {
                let (store, ns, cassette) = (Arc::clone(store), self.ns.clone(), cassette.clone());
                op(move |_| {
                    let (store, ns, cassette) = (Arc::clone(&store), ns.clone(), cassette.clone());
                    async move {
                        let mut entries = store
                            .read_entries(&ns, &cassette, ReadOptions::default())
                            .await?;
                        let (mut count, mut bytes, mut last) = (0usize, 0u64, i64::MIN);
                        while let Some(entry) = entries.next().await {
                            let entry = entry?;
                            if entry.recorded_at < last {
                                bail!("entries out of order at {count}");
                            }
                            last = entry.recorded_at;
                            bytes += entry.json.len() as u64;
                            count += 1;
                        }
                        if count != n {
                            bail!("read {count} entries, expected {n}");
                        }
                        Ok(bytes)
                    }
                })
            };
            let m = self.measure(1, &read).await?;
            self.row(&format!("read cassette of {n}"), target, 1, &m);
            rates.push(m.ops_per_sec() * n as f64);
        }
        self.report.compare(
            "cassette read",
            "entries/s",
            rates[0],
            "in-process store",
            rates[1],
        );
        Ok(())
    }

    /// Bulk verified object puts and gets against raw TCP and the in-process store.
    async fn bulk(&mut self) -> Result<()> {
        for &size in &self.params.bulk_sizes.clone() {
            let label = format!("object {} MiB", size / MIB);
            println!("bulk objects ({label}, SHA-256 verified)");
            // Two distinct contents; a repeated put still streams, hashes,
            // stages and fsyncs the whole body before finding the copy.
            let payloads: Vec<(Name, Bytes)> = (0..2u64)
                .map(|i| {
                    let data = filler(size, 100 + i);
                    Ok((name("hash", sha256_hex(&data))?, data))
                })
                .collect::<Result<_>>()?;
            let payloads = Arc::new(payloads);
            let disk_before = disk_usage(&self.server.data_dir);
            let targets: Vec<(&str, Arc<dyn ObjectStore>)> = vec![
                ("trove", Arc::new(self.trove.clone())),
                ("in-process store", Arc::new(self.local.clone())),
            ];
            let mut puts = Vec::new();
            let mut gets = Vec::new();
            for (target, store) in &targets {
                let put = {
                    let (store, ns, payloads) =
                        (Arc::clone(store), self.ns.clone(), Arc::clone(&payloads));
                    op(move |seq| {
                        let (store, ns) = (Arc::clone(&store), ns.clone());
                        let (hash, data) = payloads[(seq % 2) as usize].clone();
                        async move {
                            store
                                .put_object(&ns, &hash, Some(data.len() as u64), body(&data))
                                .await?;
                            Ok(data.len() as u64)
                        }
                    })
                };
                // Both contents exist before timing, so every timed put does the same work.
                put(0).await?;
                put(1).await?;
                let m = self.measure(1, &put).await?;
                self.row(&format!("{label} put"), target, 1, &m);
                puts.push(m);
                let get = {
                    let (store, ns, payloads) =
                        (Arc::clone(store), self.ns.clone(), Arc::clone(&payloads));
                    op(move |seq| {
                        let (store, ns) = (Arc::clone(&store), ns.clone());
                        let hash = payloads[(seq % 2) as usize].0.clone();
                        async move {
                            let (_, data) = store.get_object(&ns, &hash).await?;
                            let len = drain(data).await?;
                            if len != size as u64 {
                                bail!("read {len} bytes, expected {size}");
                            }
                            Ok(len)
                        }
                    })
                };
                let m = self.measure(1, &get).await?;
                self.row(&format!("{label} get"), target, 1, &m);
                gets.push(m);
            }
            let stored = disk_usage(&self.server.data_dir).saturating_sub(disk_before);
            self.report.fact(
                &format!("space amplification, two {label}s (disk / logical)"),
                stored as f64 / (2 * size) as f64,
                "x",
            );

            let peer = RawTcpPeer::start(size as u64).await?;
            let send = {
                let (addr, data): (SocketAddr, Bytes) = (peer.sink, payloads[0].1.clone());
                op(move |_| RawTcpPeer::send(addr, data.clone()))
            };
            let m_send = self.measure(1, &send).await?;
            self.row(&format!("{label} send"), "raw tcp", 1, &m_send);
            let receive = {
                let addr = peer.source;
                op(move |_| RawTcpPeer::receive(addr))
            };
            let m_recv = self.measure(1, &receive).await?;
            self.row(&format!("{label} receive"), "raw tcp", 1, &m_recv);

            let gib = |m: &Measured| m.bytes_per_sec() / (1024.0 * MIB as f64);
            for (kind, m, tcp) in [("put", &puts, &m_send), ("get", &gets, &m_recv)] {
                let figure = format!("bulk {kind} {label}");
                self.report
                    .compare(&figure, "GiB/s", gib(&m[0]), "raw loopback tcp", gib(tcp));
                self.report
                    .compare(&figure, "GiB/s", gib(&m[0]), "in-process store", gib(&m[1]));
            }
        }
        Ok(())
    }

    /// Cache uploads to main and downloads from a PR branch that fall back to main.
    async fn cache(&mut self) -> Result<()> {
        let size = self.params.archive_bytes;
        let c = self.params.concurrency.min(4);
        println!("cache archives ({} KiB, PR-tier fallback)", size / KIB);
        let archive = filler(size, 42);
        let scope = |branch: &str| -> Result<CacheScope> {
            Ok(CacheScope {
                namespace: self.ns.clone(),
                prefix: "bench".into(),
                branch: name("branch", branch.to_owned())?,
                default_branch: name("default_branch", "main".to_owned())?,
                test_suite_id: String::new(),
            })
        };
        let (main, pr) = (scope("main")?, scope("feature/bench")?);
        let refs = 8u64;
        let targets: Vec<(&str, Arc<dyn CacheStore>)> = vec![
            ("trove", Arc::new(self.trove.clone())),
            ("in-process store", Arc::new(self.local.clone())),
        ];
        let mut ups = Vec::new();
        let mut downs = Vec::new();
        for (target, store) in &targets {
            let upload = {
                let (store, main, archive) = (Arc::clone(store), main.clone(), archive.clone());
                op(move |seq| {
                    let (store, main, archive) =
                        (Arc::clone(&store), main.clone(), archive.clone());
                    async move {
                        let reference = name("ref", format!("r{}", seq % refs))?;
                        store
                            .upload(&main, &reference, UploadOptions::default(), body(&archive))
                            .await?;
                        Ok(archive.len() as u64)
                    }
                })
            };
            for i in 0..refs {
                upload(i).await?;
            }
            let m = self.measure(c, &upload).await?;
            self.row("cache upload (main)", target, c, &m);
            ups.push(m);
            let download = {
                let (store, pr) = (Arc::clone(store), pr.clone());
                op(move |seq| {
                    let (store, pr) = (Arc::clone(&store), pr.clone());
                    async move {
                        let reference = format!("r{}", seq % refs);
                        let Some((_, data)) = store.download(&pr, &reference, None).await? else {
                            bail!(
                                "cache miss for {reference}: the PR tier should fall back to main"
                            );
                        };
                        let len = drain(data).await?;
                        if len != size as u64 {
                            bail!("read {len} bytes, expected {size}");
                        }
                        Ok(len)
                    }
                })
            };
            let m = self.measure(c, &download).await?;
            self.row("cache download (PR -> main)", target, c, &m);
            downs.push(m);
        }
        let mib = |m: &Measured| m.bytes_per_sec() / MIB as f64;
        self.report.compare(
            "cache upload",
            "MiB/s",
            mib(&ups[0]),
            "in-process store",
            mib(&ups[1]),
        );
        self.report.compare(
            "cache download with fallback",
            "MiB/s",
            mib(&downs[0]),
            "in-process store",
            mib(&downs[1]),
        );
        Ok(())
    }

    /// Small gets at rising concurrency, Trove and the null store.
    async fn concurrency_curve(&mut self) -> Result<()> {
        let p = self.params.clone();
        println!("scaling: concurrency {:?}", p.concurrency_levels);
        let (_null, null) = self.null_client(filler(p.small_bytes, 1)).await?;
        let targets: Vec<(&str, Arc<dyn ArtifactStore>)> = vec![
            ("trove", Arc::new(self.trove.clone())),
            ("null gRPC", Arc::new(null)),
        ];
        let mut series = Vec::new();
        for (target, store) in &targets {
            let mut points = Vec::new();
            for &c in &p.concurrency_levels {
                let get =
                    self.artifact_get(Arc::clone(store), "small", p.small_bytes, p.small_keys);
                let m = self.measure(c, &get).await?;
                self.row(&format!("artifact {} B get", p.small_bytes), target, c, &m);
                points.push(Point::new(c as f64, &m));
            }
            series.push(Series {
                label: (*target).to_owned(),
                points,
            });
        }
        self.report.curves.push(Curve {
            id: "scaling-concurrency".into(),
            title: format!("small get ({} B) vs concurrency", p.small_bytes),
            x_label: "callers in flight".into(),
            bytes: false,
            series,
        });
        Ok(())
    }

    /// Artifact put and get at rising value sizes, Trove and the null store.
    async fn payload_curve(&mut self) -> Result<()> {
        let p = self.params.clone();
        let c = 4;
        println!("scaling: payload sizes {:?} B", p.payload_sizes);
        let mut series: Vec<Series> = ["trove put", "trove get", "null gRPC put", "null gRPC get"]
            .iter()
            .map(|label| Series {
                label: (*label).to_owned(),
                points: vec![],
            })
            .collect();
        for &size in &p.payload_sizes {
            let value = filler(size, size as u64);
            let (_null, null) = self.null_client(value.clone()).await?;
            let targets: [(&str, Arc<dyn ArtifactStore>); 2] = [
                ("trove", Arc::new(self.trove.clone())),
                ("null gRPC", Arc::new(null)),
            ];
            for (i, (target, store)) in targets.iter().enumerate() {
                let prefix = format!("size-{size}");
                let keys = 8;
                let put = self.artifact_put(Arc::clone(store), &prefix, value.clone(), keys);
                self.fill(&put, keys).await?;
                let m = self.measure(c, &put).await?;
                self.row(&format!("artifact {} KiB put", size / KIB), target, c, &m);
                series[2 * i].points.push(Point::new(size as f64, &m));
                let get = self.artifact_get(Arc::clone(store), &prefix, size, keys);
                let m = self.measure(c, &get).await?;
                self.row(&format!("artifact {} KiB get", size / KIB), target, c, &m);
                series[2 * i + 1].points.push(Point::new(size as f64, &m));
            }
        }
        self.report.curves.push(Curve {
            id: "scaling-payload".into(),
            title: format!("artifact put/get vs value size (concurrency {c})"),
            x_label: "value bytes".into(),
            bytes: true,
            series,
        });
        Ok(())
    }

    /// Get and put latency as the store grows from 10^3 to 10^6 items.
    async fn store_size_curve(&mut self) -> Result<()> {
        let p = self.params.clone();
        println!("scaling: stored items {:?}", p.store_levels);
        let dir = self.work_dir.path().join("growing");
        let value_bytes = KIB;
        let mut filled = 0u64;
        let mut gets = Vec::new();
        let mut puts = Vec::new();
        let exe = std::env::current_exe()?;
        for &level in &p.store_levels {
            let status = std::process::Command::new(&exe)
                .arg("prefill")
                .arg("--data-dir")
                .arg(&dir)
                .args(["--from", &filled.to_string(), "--to", &level.to_string()])
                .args(["--value-bytes", &value_bytes.to_string()])
                .status()
                .context("run the prefill step")?;
            if !status.success() {
                bail!("prefill to {level} items failed: {status}");
            }
            filled = level;
            let mut server = ServerProcess::start_in(&dir, &[]).await;
            let client: Arc<dyn ArtifactStore> = Arc::new(server.client().await);
            let get = {
                let (ns, client) = (self.ns.clone(), Arc::clone(&client));
                op(move |seq| {
                    let (ns, client) = (ns.clone(), Arc::clone(&client));
                    async move {
                        let key = name(
                            "key",
                            format!("item/{:010}", seq.wrapping_mul(7919) % level),
                        )?;
                        let (_, data) = client.get_artifact(&ns, &key).await?;
                        drain(data).await
                    }
                })
            };
            let m = self.measure(1, &get).await?;
            self.row(&format!("get among {level} items"), "trove", 1, &m);
            gets.push(Point::new(level as f64, &m));
            let value = filler(value_bytes, 9);
            let put = self.artifact_put(Arc::clone(&client), "fresh", value, 1000);
            let m = self.measure(1, &put).await?;
            self.row(&format!("put among {level} items"), "trove", 1, &m);
            puts.push(Point::new(level as f64, &m));
            server.send_sigterm();
            let _ = server.wait_exit(Duration::from_secs(60));
        }
        if let (Some(first), Some(last)) = (gets.first(), gets.last()) {
            let figure = format!("get p99 with {} items stored", last.x);
            self.report.compare_latency(
                &figure,
                last.p99_us,
                &format!("with {} items", first.x),
                first.p99_us,
            );
        }
        if let (Some(first), Some(last)) = (puts.first(), puts.last()) {
            let figure = format!("put p99 with {} items stored", last.x);
            self.report.compare_latency(
                &figure,
                last.p99_us,
                &format!("with {} items", first.x),
                first.p99_us,
            );
        }
        let logical = filled * (value_bytes as u64) + 1000 * value_bytes as u64;
        self.report.fact(
            &format!("space amplification, {filled} values of 1 KiB (disk / logical)"),
            disk_usage(&dir) as f64 / logical as f64,
            "x",
        );
        self.report.curves.push(Curve {
            id: "scaling-store-size".into(),
            title: "1 KiB get/put latency vs items stored (concurrency 1)".into(),
            x_label: "items stored".into(),
            bytes: false,
            series: vec![
                Series {
                    label: "get".into(),
                    points: gets,
                },
                Series {
                    label: "put".into(),
                    points: puts,
                },
            ],
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_have_the_asked_length_and_parse() {
        let json = entry_json(12345, KIB);
        assert_eq!(json.len(), KIB);
        let entry = NewEntry::parse("entry", json, None).expect("entry parses");
        assert_eq!(entry.recorded_at, 12345);
    }

    #[test]
    fn filler_differs_by_seed_and_has_the_asked_length() {
        assert_eq!(filler(1001, 1).len(), 1001);
        assert_ne!(filler(64, 1), filler(64, 2));
        assert_eq!(filler(64, 3), filler(64, 3));
    }

    #[tokio::test]
    async fn bodies_are_cut_in_mebibyte_chunks() {
        let data = filler(2 * MIB + 5, 1);
        let chunks: Vec<_> = body(&data).collect().await;
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2].as_ref().expect("chunk").len(), 5);
    }
}
