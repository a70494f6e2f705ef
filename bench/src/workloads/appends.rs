//! Durable single-entry appends of 1 KiB, with Redis under `appendfsync
//! always` (at the run's concurrency and at 64 callers), the disk's own
//! limit (1 KiB `pwrite` + `fdatasync` by one writer, and by as many
//! writers as Trove has callers, sharing flushes), and the latency at half
//! of peak. The append operation itself is shared with the bucket engine
//! and lives in `mod.rs`.

use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use trove_proto::EntryStore;

use super::{entry_json, Bench, KIB};
use crate::baselines::RedisServer;
use crate::disk::DiskLog;
use crate::load::{op, open_loop};

/// The second concurrency at which durable appends are set against Redis.
const MANY_CALLERS: usize = 64;

impl Bench {
    /// Durable single-entry appends of 1 KiB, one cassette per caller.
    pub(super) async fn appends(&mut self) -> Result<()> {
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
        // What the disk under the data folder allows, measured the same way.
        let log = DiskLog::create(&self.work_dir.path().join("disk-baseline"), KIB)?;
        let own = self.measure(1, &log.own_flush()).await?;
        self.row("write+fdatasync 1 KiB", "disk, one writer", 1, &own);
        let shared = self.measure(c, &log.shared_flush()).await?;
        self.row("write+fdatasync 1 KiB", "disk, shared flushes", c, &shared);
        self.report.compare(
            figure,
            "ops/s",
            results[0].ops_per_sec(),
            "disk write+fdatasync, shared flushes",
            shared.ops_per_sec(),
        );
        drop(log);
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
            // More callers share more of each flush, on both sides.
            if c != MANY_CALLERS {
                let append = self.append_op(
                    Arc::clone(&targets[0].1),
                    "append-many",
                    MANY_CALLERS as u64,
                );
                let trove = self.measure(MANY_CALLERS, &append).await?;
                self.row("append 1 KiB (durable)", "trove", MANY_CALLERS, &trove);
                let redis = self.measure(MANY_CALLERS, &set).await?;
                self.row(
                    "SET 1 KiB (appendfsync always)",
                    "redis",
                    MANY_CALLERS,
                    &redis,
                );
                self.report.compare(
                    &format!("{figure}, {MANY_CALLERS} callers"),
                    "ops/s",
                    trove.ops_per_sec(),
                    "redis appendfsync always",
                    redis.ops_per_sec(),
                );
            }
        }
        // Write latency at half of Trove's peak, against the in-process store
        // (storage without the network) and null gRPC (the network without
        // storage) at the same rate.
        let rate = results[0].ops_per_sec() / 2.0;
        let mut at_half = Vec::new();
        for (target, store) in &targets {
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
        self.report.compare_latency(
            "durable append p99 at half of peak",
            at_half[0].p99_us,
            "null gRPC, same rate",
            at_half[2].p99_us,
        );
        Ok(())
    }
}
