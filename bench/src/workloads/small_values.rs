//! Small artifact puts and gets at fixed concurrency, with Redis SET/GET
//! and the latency at half of peak. The shared context and helpers live in
//! `mod.rs`.

use std::sync::Arc;

use anyhow::{bail, Result};
use trove_proto::ArtifactStore;

use super::{filler, Bench};
use crate::baselines::RedisServer;
use crate::load::{op, open_loop};

impl Bench {
    /// Small artifact puts and gets: Trove against the null gRPC store (the
    /// transport limit), the in-process store (the storage limit) and Redis.
    pub(super) async fn small_values(&mut self) -> Result<()> {
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
}
