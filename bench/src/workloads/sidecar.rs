//! A sidecar tier (`--upstream`) in front of the benchmark's server, against
//! that server reached directly, in the same run: small and bulk object gets
//! the sidecar serves from its local copy (hits), and small gets it must
//! fetch from the upstream first (misses). The shared context and helpers
//! live in `mod.rs`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use futures::StreamExt;
use trove_proto::types::Name;
use trove_proto::ObjectStore;
use trove_tests::harness::ServerProcess;

use super::{body, drain, filler, name, sha256_hex, Bench, MIB};
use crate::load::{op, Op};

impl Bench {
    /// Sidecar hits and misses against the server it fronts.
    pub(super) async fn sidecar(&mut self) -> Result<()> {
        let p = self.params.clone();
        println!("sidecar tier in front of the server");
        let upstream = format!("http://{}", self.server.addr);
        let sidecar = ServerProcess::start_in(
            &self.work_dir.path().join("sidecar"),
            &["--upstream", &upstream],
        )
        .await;
        let tier = sidecar.client().await;
        let targets: [(&str, Arc<dyn ObjectStore>); 2] = [
            ("trove", Arc::new(self.trove.clone())),
            ("sidecar hit", Arc::new(tier.clone())),
        ];

        // Small objects written through the sidecar: it holds every one.
        let hashes = Arc::new(self.small_objects(&tier, p.small_keys, 0).await?);
        let label = format!("object {} B get", p.small_bytes);
        let mut small = Vec::new();
        for (target, store) in &targets {
            let get = object_get(store, &self.ns, &hashes, p.small_bytes);
            let m = self.measure(p.concurrency, &get).await?;
            self.row(&label, target, p.concurrency, &m);
            small.push(m);
        }
        self.report.compare(
            "small get: sidecar hit",
            "ops/s",
            small[1].ops_per_sec(),
            "the server itself, same run",
            small[0].ops_per_sec(),
        );

        let size = p.bulk_sizes.first().copied().unwrap_or(64 * MIB);
        let data = filler(size, 19);
        let hash = name("hash", sha256_hex(&data))?;
        tier.put_object(&self.ns, &hash, Some(size as u64), body(&data))
            .await?;
        let one = Arc::new(vec![hash]);
        let label = format!("object {} MiB get", size / MIB);
        let mut bulk = Vec::new();
        for (target, store) in &targets {
            let get = object_get(store, &self.ns, &one, size);
            let m = self.measure(1, &get).await?;
            self.row(&label, target, 1, &m);
            bulk.push(m);
        }
        self.report.compare(
            &format!("bulk get {} MiB: sidecar hit", size / MIB),
            "GiB/s",
            bulk[1].bytes_per_sec() / (1024.0 * MIB as f64),
            "the server itself, same run",
            bulk[0].bytes_per_sec() / (1024.0 * MIB as f64),
        );

        // Misses: objects stored on the server only, each read once through
        // the sidecar (which fetches and keeps it), against reading a second
        // set once each from the server directly.
        let count = p.small_keys;
        let direct_set = self.small_objects(&self.trove, count, 1).await?;
        let miss_set = self.small_objects(&self.trove, count, 2).await?;
        let direct = self
            .read_each(&self.trove, &direct_set, p.concurrency)
            .await?;
        let missed = self.read_each(&tier, &miss_set, p.concurrency).await?;
        self.report.compare(
            "small get: sidecar miss (fetch and keep)",
            "ops/s",
            missed,
            "the server itself, same run",
            direct,
        );
        println!("  small get once each: direct {direct:.0}/s, sidecar miss {missed:.0}/s");
        Ok(())
    }

    /// Stores `count` small verified objects through `store`; returns their hashes.
    async fn small_objects(
        &self,
        store: &dyn ObjectStore,
        count: usize,
        salt: u64,
    ) -> Result<Vec<Name>> {
        let mut hashes = Vec::with_capacity(count);
        for i in 0..count as u64 {
            let data = filler(self.params.small_bytes, 50_000 + salt * 1_000_000 + i);
            let hash = name("hash", sha256_hex(&data))?;
            store.put_object(&self.ns, &hash, None, body(&data)).await?;
            hashes.push(hash);
        }
        Ok(hashes)
    }

    /// Reads every hash once, `concurrency` at a time; returns reads per second.
    async fn read_each(
        &self,
        store: &dyn ObjectStore,
        hashes: &[Name],
        concurrency: usize,
    ) -> Result<f64> {
        let started = Instant::now();
        let results: Vec<Result<u64>> = futures::stream::iter(hashes.iter().cloned())
            .map(|hash| async move {
                let (_, body) = store.get_object(&self.ns, &hash).await?;
                drain(body).await
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        for result in results {
            result?;
        }
        Ok(hashes.len() as f64 / started.elapsed().as_secs_f64())
    }
}

/// Gets of `hashes` in turn, each checked for length.
fn object_get(
    store: &Arc<dyn ObjectStore>,
    ns: &trove_proto::types::Namespace,
    hashes: &Arc<Vec<Name>>,
    size: usize,
) -> Op {
    let (store, ns, hashes) = (Arc::clone(store), ns.clone(), Arc::clone(hashes));
    op(move |seq| {
        let (store, ns) = (Arc::clone(&store), ns.clone());
        let index = usize::try_from(seq.wrapping_mul(7919) % hashes.len() as u64).unwrap_or(0);
        let hash = hashes[index].clone();
        async move {
            let (_, body) = store.get_object(&ns, &hash).await?;
            let len = drain(body).await?;
            if len != size as u64 {
                bail!("read {len} bytes of {hash}, expected {size}");
            }
            Ok(len)
        }
    })
}
