//! The workloads, each run against Trove over loopback and against the
//! baselines it is compared with. Workloads are written against the storage
//! traits, so the same code drives the remote client, the in-process store
//! and the null store behind Trove's gRPC adapters.
//!
//! This file owns what every workload shares: the [`Bench`] context, the
//! driver that runs them in order, the operation builders and the byte
//! helpers. Each workload lives in a submodule of its own, as one more
//! `impl Bench` block; the run sizes are in `params.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use trove_client::TroveClient;
use trove_proto::artifacts::PutOptions;
use trove_proto::entries::NewEntry;
use trove_proto::types::{ByteStream, Name, Namespace};
use trove_proto::{ArtifactStore, EntryStore};
use trove_server::engine::sled::{SledStore, StoreOptions};
use trove_tests::harness::ServerProcess;

use crate::baselines::{redis_binary, start_null_server};
use crate::load::{closed_loop, op, Measured, Op, Sequence};
use crate::report::{Report, Row};

mod appends;
mod bucket;
mod bulk;
mod cache;
mod cassette;
mod eviction;
mod find_missing;
mod params;
mod scaling;
mod sidecar;
mod small_values;
mod tls;

pub use params::Params;
pub use scaling::prefill;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

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
    disk_usage_except(dir, &[])
}

/// [`disk_usage`] without the top-level folders named in `skipped`.
pub fn disk_usage_except(dir: &Path, skipped: &[&str]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let skipped: Vec<std::path::PathBuf> = skipped.iter().map(|name| dir.join(name)).collect();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if !skipped.contains(&entry.path()) {
                    stack.push(entry.path());
                }
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
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
        if self.params.runs("small-values") {
            self.small_values().await.context("small values")?;
        }
        if self.params.runs("find-missing") {
            self.find_missing().await.context("find missing")?;
        }
        if self.params.runs("appends") {
            self.appends().await.context("durable appends")?;
        }
        if self.params.runs("cassette-reads") {
            self.cassette_reads().await.context("cassette reads")?;
        }
        if self.params.runs("bulk") {
            self.bulk().await.context("bulk objects")?;
        }
        if self.params.runs("cache") {
            self.cache().await.context("cache archives")?;
        }
        if self.params.runs("eviction") {
            self.eviction().await.context("eviction")?;
        }
        if self.params.runs("tls") {
            self.tls().await.context("TLS with a token")?;
        }
        if self.params.runs("sidecar") {
            self.sidecar().await.context("sidecar tier")?;
        }
        if self.params.runs("concurrency-curve") {
            self.concurrency_curve()
                .await
                .context("concurrency scaling")?;
        }
        if self.params.runs("payload-curve") {
            self.payload_curve().await.context("payload scaling")?;
        }
        if self.params.runs("store-size-curve") {
            self.store_size_curve()
                .await
                .context("store-size scaling")?;
        }
        match bucket::S3Cluster::from_env() {
            Some(_) if !self.params.runs("bucket") => {}
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
