//! The same workloads on the bucket engine: a Trove server with
//! `--store s3://...` against the raw `object_store` get and put on the same
//! cluster (the store's own limit) and the engine in-process (Trove's
//! storage layer without gRPC).
//! The shared context, helpers and operation builders it reuses live in
//! `mod.rs`.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore as Bucket, ObjectStoreExt, PutPayload, WriteMultipart};
use trove_proto::{ArtifactStore, EntryStore, ObjectStore};
use trove_server::engine::bucket::{BucketOptions, BucketStore};
use trove_tests::harness::ServerProcess;

use super::{filler, name, sha256_hex, Bench, MIB};
use crate::load::{op, Measured, Op};

/// Where the S3 cluster is: from `TROVE_S3_ENDPOINT` and `TROVE_S3_BUCKET`
/// (with credentials in `AWS_*`), as `.ci/seaweedfs.sh` writes them.
pub struct S3Cluster {
    endpoint: String,
    bucket: String,
}

impl S3Cluster {
    /// The cluster named by the environment, if any.
    pub fn from_env() -> Option<Self> {
        let endpoint = std::env::var("TROVE_S3_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())?;
        let bucket = std::env::var("TROVE_S3_BUCKET")
            .ok()
            .filter(|b| !b.is_empty())?;
        Some(S3Cluster { endpoint, bucket })
    }
}

/// One run's targets on the cluster.
struct Targets {
    /// The Trove server on the bucket engine (kept alive for the run).
    _server: ServerProcess,
    trove: trove_client::TroveClient,
    /// A second server on the same bucket and root, with a local blob cache.
    _cached_server: ServerProcess,
    cached: trove_client::TroveClient,
    engine: BucketStore,
    raw: Arc<dyn Bucket>,
    raw_root: String,
}

impl Bench {
    /// Runs the bucket-engine workloads against `cluster`.
    pub async fn bucket_workloads(&mut self, cluster: &S3Cluster) -> Result<()> {
        let run: u64 = rand::random();
        let url = |what: &str| format!("s3://{}/bench-{run:016x}/{what}", cluster.bucket);
        let server_url = url("server");
        let server = ServerProcess::start_in(
            &self.work_dir.path().join("bucket-server"),
            &["--store", &server_url, "--s3-endpoint", &cluster.endpoint],
        )
        .await;
        let trove = server.client().await;
        let engine = trove_server::engine::bucket::connect(
            &url("in-process"),
            Some(&cluster.endpoint),
            BucketOptions::default(),
        )
        .await
        .context("open the bucket engine in-process")?;
        let raw = Arc::clone(engine.bucket());
        let cached_server = ServerProcess::start_in(
            &self.work_dir.path().join("bucket-server-cached"),
            &[
                "--store",
                &server_url,
                "--s3-endpoint",
                &cluster.endpoint,
                "--blob-cache-bytes",
                "1073741824",
            ],
        )
        .await;
        let cached = cached_server.client().await;
        let targets = Targets {
            _server: server,
            _cached_server: cached_server,
            cached,
            trove,
            engine,
            raw,
            raw_root: format!("bench-{run:016x}/raw"),
        };
        self.bucket_small(&targets)
            .await
            .context("bucket small values")?;
        self.bucket_appends(&targets)
            .await
            .context("bucket appends")?;
        self.bucket_bulk(&targets).await.context("bucket bulk")?;
        Ok(())
    }

    fn raw_put(&self, t: &Targets, prefix: &str, value: Bytes, keys: usize) -> Op {
        let (raw, root, prefix) = (Arc::clone(&t.raw), t.raw_root.clone(), prefix.to_owned());
        op(move |seq| {
            let (raw, value) = (Arc::clone(&raw), value.clone());
            let path = StorePath::from(format!("{root}/{prefix}/{}", seq % keys as u64));
            async move {
                let len = value.len() as u64;
                if value.len() > 8 * MIB {
                    // Large values go in parts, as the engine sends them.
                    let upload = raw.put_multipart(&path).await?;
                    let mut writer = WriteMultipart::new_with_chunk_size(upload, 8 * MIB);
                    for piece in value.chunks(MIB) {
                        writer.wait_for_capacity(2).await?;
                        writer.write(piece);
                    }
                    writer.finish().await?;
                } else {
                    raw.put(&path, PutPayload::from(value)).await?;
                }
                Ok(len)
            }
        })
    }

    fn raw_get(&self, t: &Targets, prefix: &str, size: usize, keys: usize) -> Op {
        let (raw, root, prefix) = (Arc::clone(&t.raw), t.raw_root.clone(), prefix.to_owned());
        op(move |seq| {
            let raw = Arc::clone(&raw);
            let path = StorePath::from(format!(
                "{root}/{prefix}/{}",
                seq.wrapping_mul(7919) % keys as u64
            ));
            async move {
                let data = raw.get(&path).await?.bytes().await?;
                if data.len() != size {
                    bail!("read {} bytes of {path}, expected {size}", data.len());
                }
                Ok(data.len() as u64)
            }
        })
    }

    /// Small puts and gets: Trove on the bucket, the engine in-process, the
    /// raw store.
    async fn bucket_small(&mut self, t: &Targets) -> Result<()> {
        let p = self.params.clone();
        let label = format!("artifact {} B", p.small_bytes);
        println!(
            "bucket engine: small values ({label}, concurrency {})",
            p.concurrency
        );
        let value = filler(p.small_bytes, 2);
        let keys = p.small_keys.min(2_000);
        let stores: Vec<(&str, Arc<dyn ArtifactStore>)> = vec![
            ("trove on s3", Arc::new(t.trove.clone())),
            ("engine in-process", Arc::new(t.engine.clone())),
        ];
        let mut results: Vec<(Measured, Measured)> = Vec::new();
        for (target, store) in &stores {
            let put = self.artifact_put(Arc::clone(store), "s3-small", value.clone(), keys);
            self.fill(&put, keys).await?;
            let put_m = self.measure(p.concurrency, &put).await?;
            self.row(&format!("{label} put"), target, p.concurrency, &put_m);
            let get = self.artifact_get(Arc::clone(store), "s3-small", p.small_bytes, keys);
            let get_m = self.measure(p.concurrency, &get).await?;
            self.row(&format!("{label} get"), target, p.concurrency, &get_m);
            results.push((put_m, get_m));
        }
        let put = self.raw_put(t, "small", value.clone(), keys);
        self.fill(&put, keys).await?;
        let raw_put = self.measure(p.concurrency, &put).await?;
        self.row(
            &format!("{label} PUT"),
            "raw object_store",
            p.concurrency,
            &raw_put,
        );
        let get = self.raw_get(t, "small", p.small_bytes, keys);
        let raw_get = self.measure(p.concurrency, &get).await?;
        self.row(
            &format!("{label} GET"),
            "raw object_store",
            p.concurrency,
            &raw_get,
        );
        let unit = "ops/s";
        let (trove, engine) = (&results[0], &results[1]);
        self.report.compare(
            "s3 engine small put throughput",
            unit,
            trove.0.ops_per_sec(),
            "raw object_store PUT",
            raw_put.ops_per_sec(),
        );
        self.report.compare(
            "s3 engine small put throughput",
            unit,
            trove.0.ops_per_sec(),
            "engine in-process",
            engine.0.ops_per_sec(),
        );
        self.report.compare(
            "s3 engine small get throughput",
            unit,
            trove.1.ops_per_sec(),
            "raw object_store GET",
            raw_get.ops_per_sec(),
        );
        self.report.compare(
            "s3 engine small get throughput",
            unit,
            trove.1.ops_per_sec(),
            "engine in-process",
            engine.1.ops_per_sec(),
        );
        Ok(())
    }

    /// Durable appends of 1 KiB, one cassette per caller, against a raw PUT
    /// of the same size (what one durable write costs on the store).
    async fn bucket_appends(&mut self, t: &Targets) -> Result<()> {
        let c = self.params.concurrency;
        println!("bucket engine: durable appends (1 KiB entries, concurrency {c})");
        let stores: Vec<(&str, Arc<dyn EntryStore>)> = vec![
            ("trove on s3", Arc::new(t.trove.clone())),
            ("engine in-process", Arc::new(t.engine.clone())),
        ];
        let mut results = Vec::new();
        for (target, store) in &stores {
            let append = self.append_op(Arc::clone(store), "s3-append", c as u64);
            let m = self.measure(c, &append).await?;
            self.row("append 1 KiB (durable)", target, c, &m);
            results.push(m);
        }
        let put = self.raw_put(t, "append", filler(1024, 3), 10_000);
        let raw = self.measure(c, &put).await?;
        self.row("PUT 1 KiB", "raw object_store", c, &raw);
        self.report.compare(
            "s3 engine durable append throughput",
            "ops/s",
            results[0].ops_per_sec(),
            "raw object_store PUT",
            raw.ops_per_sec(),
        );
        self.report.compare(
            "s3 engine durable append throughput",
            "ops/s",
            results[0].ops_per_sec(),
            "engine in-process",
            results[1].ops_per_sec(),
        );
        Ok(())
    }

    /// Verified bulk object puts and gets against the raw multipart put and get.
    async fn bucket_bulk(&mut self, t: &Targets) -> Result<()> {
        let Some(&size) = self.params.bulk_sizes.first() else {
            return Ok(());
        };
        let label = format!("object {} MiB", size / MIB);
        println!("bucket engine: bulk objects ({label}, SHA-256 verified)");
        let data = filler(size, 200);
        let hash = name("hash", sha256_hex(&data))?;
        let mut results = Vec::new();
        let stores: Vec<(&str, Arc<dyn ObjectStore>)> = vec![
            ("trove on s3", Arc::new(t.trove.clone())),
            ("engine in-process", Arc::new(t.engine.clone())),
            ("trove on s3, cached", Arc::new(t.cached.clone())),
        ];
        for (target, store) in &stores {
            let put = {
                let (store, ns, hash, data) = (
                    Arc::clone(store),
                    self.ns.clone(),
                    hash.clone(),
                    data.clone(),
                );
                op(move |_| {
                    let (store, ns, hash, data) =
                        (Arc::clone(&store), ns.clone(), hash.clone(), data.clone());
                    async move {
                        store
                            .put_object(&ns, &hash, Some(data.len() as u64), super::body(&data))
                            .await?;
                        Ok(data.len() as u64)
                    }
                })
            };
            let put_m = self.measure(1, &put).await?;
            self.row(&format!("{label} put"), target, 1, &put_m);
            let get = {
                let (store, ns, hash) = (Arc::clone(store), self.ns.clone(), hash.clone());
                op(move |_| {
                    let (store, ns, hash) = (Arc::clone(&store), ns.clone(), hash.clone());
                    async move {
                        let (_, stream) = store.get_object(&ns, &hash).await?;
                        super::drain(stream).await
                    }
                })
            };
            let get_m = self.measure(1, &get).await?;
            self.row(&format!("{label} get"), target, 1, &get_m);
            results.push((put_m, get_m));
        }
        let put = self.raw_put(t, "bulk", data.clone(), 1);
        let raw_put = self.measure(1, &put).await?;
        self.row(
            &format!("{label} PUT (multipart)"),
            "raw object_store",
            1,
            &raw_put,
        );
        let get = self.raw_get(t, "bulk", size, 1);
        let raw_get = self.measure(1, &get).await?;
        self.row(&format!("{label} GET"), "raw object_store", 1, &raw_get);
        let gib = |m: &Measured| m.bytes_per_sec() / (1024.0 * MIB as f64);
        self.report.compare(
            &format!("s3 engine bulk put {label}"),
            "GiB/s",
            gib(&results[0].0),
            "raw object_store multipart PUT",
            gib(&raw_put),
        );
        self.report.compare(
            &format!("s3 engine bulk get {label}"),
            "GiB/s",
            gib(&results[0].1),
            "raw object_store GET",
            gib(&raw_get),
        );
        self.report.compare(
            &format!("s3 engine bulk get {label}"),
            "GiB/s",
            gib(&results[0].1),
            "engine in-process",
            gib(&results[1].1),
        );
        self.report.compare(
            &format!("s3 engine bulk get {label}, local blob cache"),
            "GiB/s",
            gib(&results[2].1),
            "raw object_store GET",
            gib(&raw_get),
        );
        Ok(())
    }
}
