//! Eviction: how fast an over-quota namespace is brought back to its low
//! watermark, and what that costs small gets of another namespace running
//! at the same time. In-process store, strict durability (the eviction
//! writes are logged and fsynced like any write). The shared context and
//! helpers live in `mod.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use trove_proto::types::{Name, Namespace};
use trove_proto::{ObjectStore, UsageStore};
use trove_server::engine::quota::{NamespaceQuota, OnFull, Quotas};
use trove_server::engine::sled::{Durability, SledStore, StoreOptions};
use trove_tests::harness::ServerProcess;

use super::{body, disk_usage, drain, filler, sha256_hex, Bench, KIB};
use crate::load::{closed_loop_while, op, Op};

/// Values of the namespace whose gets are timed.
const READ_KEYS: usize = 1000;

/// Opens a store on a thread of its own: outside the runtime it starts no
/// maintenance task, so eviction runs exactly when the bench asks. The
/// store closed just before may still be finishing on other threads (tasks
/// retiring its files hold it until they end), keeping its folder locked:
/// the open is tried again for a few seconds.
fn open_without_task(dir: &std::path::Path, options: StoreOptions) -> Result<SledStore> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (dir, options) = (dir.to_path_buf(), options.clone());
        let opened = std::thread::spawn(move || SledStore::open(&dir, options))
            .join()
            .map_err(|_| anyhow::anyhow!("the store's open thread panicked"))?;
        match opened {
            Err(trove_proto::Error::Unavailable { .. }) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other.context("open the store"),
        }
    }
}

/// Stores `count` distinct 4 KiB objects in `ns`; returns their names.
async fn fill(store: &SledStore, ns: &Namespace, count: usize, seed: u64) -> Result<Vec<Name>> {
    futures::stream::iter(0..count)
        .map(|i| {
            let (store, ns) = (store.clone(), ns.clone());
            async move {
                let value = filler(4 * KIB, seed + i as u64);
                let hash = Name::new("hash", sha256_hex(&value))?;
                store
                    .put_object(&ns, &hash, Some(value.len() as u64), body(&value))
                    .await?;
                anyhow::Ok(hash)
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

fn object_get<S: ObjectStore + Clone + 'static>(
    store: &S,
    ns: &Namespace,
    hashes: Arc<Vec<Name>>,
) -> Op {
    let (store, ns) = (store.clone(), ns.clone());
    op(move |seq| {
        let (store, ns, hashes) = (store.clone(), ns.clone(), Arc::clone(&hashes));
        async move {
            let index = usize::try_from(seq.wrapping_mul(7919)).unwrap_or(0) % hashes.len();
            let hash = &hashes[index];
            let (_, data) = store.get_object(&ns, hash).await?;
            let len = drain(data).await?;
            if len != 4 * KIB as u64 {
                bail!("read {len} bytes of {hash}, expected {}", 4 * KIB);
            }
            Ok(len)
        }
    })
}

/// Fills `dir` with `count` 4 KiB objects in the namespace `evict` and
/// [`READ_KEYS`] in `reads` (no quota, so nothing is evicted yet); returns
/// the names of the latter. The store is closed on return.
async fn prepare(dir: &std::path::Path, count: usize) -> Result<Arc<Vec<Name>>> {
    let (cache, other) = (Namespace::new("evict")?, Namespace::new("reads")?);
    let filling = StoreOptions {
        durability: Durability::Relaxed,
        ..StoreOptions::default()
    };
    let store = open_without_task(dir, filling)?;
    // On an empty store this only marks the eviction index complete, so
    // the timed pass does no indexing.
    tokio::task::block_in_place(|| store.run_eviction())?;
    fill(&store, &cache, count, 1).await?;
    let read_keys = fill(&store, &other, READ_KEYS, 1 << 40).await?;
    store.flush().await?;
    Ok(Arc::new(read_keys))
}

/// Polls the `evict` namespace's usage every 5 ms until `done(held bytes)`,
/// then clears `running`; yields how long that took and the bytes held.
fn watch_usage(
    client: &trove_client::TroveClient,
    running: Arc<AtomicBool>,
    done: impl Fn(u64) -> bool + Send + 'static,
) -> Result<tokio::task::JoinHandle<Result<(std::time::Duration, u64)>>> {
    let client = client.clone();
    let ns = Namespace::new("evict")?;
    Ok(tokio::spawn(async move {
        let started = Instant::now();
        loop {
            let rows = client.namespace_usage(Some(&ns)).await?;
            let held: u64 = rows.iter().map(|row| row.logical_bytes).sum();
            if done(held) {
                running.store(false, Ordering::SeqCst);
                return anyhow::Ok((started.elapsed(), held));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }))
}

/// The evicting quota: half the values fit, so eviction takes the
/// namespace from 100% of the data to 45% of it (90% of the quota).
fn half_of(count: usize) -> NamespaceQuota {
    NamespaceQuota {
        max_bytes: (count * 4 * KIB / 2) as u64,
        on_full: OnFull::Evict,
    }
}

impl Bench {
    /// Evictions per second of one pass on an idle store, then a server
    /// evicting the same backlog while it serves small gets.
    pub(super) async fn eviction(&mut self) -> Result<()> {
        let p = self.params.clone();
        let count = p.eviction_values;
        println!("eviction ({count} values of 4 KiB, about 55% evicted)");
        let dir = self.work_dir.path().join("eviction");
        prepare(&dir, count).await?;
        let quotas = Quotas {
            namespaces: [("evict".to_owned(), half_of(count))].into(),
            ..Quotas::default()
        };
        let options = StoreOptions {
            quotas: Arc::new(quotas),
            ..StoreOptions::default()
        };
        let store = open_without_task(&dir, options)?;
        // The pass alone: the rate of an idle server.
        let evicting = store.clone();
        let (pass, took) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            evicting
                .run_eviction()
                .map(|pass| (pass, started.elapsed()))
        })
        .await??;
        if pass.evicted == 0 {
            bail!("the eviction pass evicted nothing");
        }
        let rate = pass.evicted as f64 / took.as_secs_f64();
        println!(
            "  evicted {} values ({} bytes) in {:.2} s: {rate:.0}/s",
            pass.evicted,
            pass.bytes,
            took.as_secs_f64()
        );
        self.report.fact(
            "evictions per second, 4 KiB values (goal >= 7000)",
            rate,
            "/s",
        );
        // Evicted values leave dead bytes in their packs until compaction.
        let before = disk_usage(&dir);
        let compacting = store.clone();
        let (compaction, took) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            compacting
                .compact_packs()
                .map(|pass| (pass, started.elapsed()))
        })
        .await??;
        let after = disk_usage(&dir);
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        println!(
            "  compaction: {} packs ({:.0} MiB) deleted, {} values moved, in {:.2} s; \
             data folder {:.0} -> {:.0} MiB",
            compaction.packs_removed,
            mib(compaction.bytes_reclaimed),
            compaction.values_moved,
            took.as_secs_f64(),
            mib(before),
            mib(after)
        );
        self.report.fact(
            "data folder after eviction and compaction / before compaction",
            after as f64 / before.max(1) as f64,
            "x",
        );
        drop(store);
        self.eviction_served(count).await
    }

    /// The same eviction inside a running server (its backlog at start),
    /// with small gets over gRPC while it runs; then the same gets on a twin
    /// server started on an identical folder without the quota, for as long
    /// from its start: both phases begin on a cold server, so the ratio is
    /// eviction's alone (a just-started server is slower by itself, about
    /// 1.5x at p99 here). The gets that follow on the first server, warm and
    /// with eviction done, are reported too.
    async fn eviction_served(&mut self, count: usize) -> Result<()> {
        let p = self.params.clone();
        let quota = half_of(count);
        let config = self.work_dir.path().join("eviction.toml");
        std::fs::write(
            &config,
            format!(
                "[namespaces.\"evict\"]\nmax_bytes = {}\non_full = \"evict\"\n",
                quota.max_bytes
            ),
        )?;
        let config = config.to_str().context("config path")?.to_owned();
        let dir = self.work_dir.path().join("eviction-served");
        let read_keys = prepare(&dir, count).await?;
        let twin = self.work_dir.path().join("eviction-twin");
        let twin_keys = prepare(&twin, count).await?;
        let mut server = ServerProcess::start_in(&dir, &["--config", &config]).await;
        let client = server.client().await;
        let get = object_get(&client, &Namespace::new("reads")?, read_keys);
        let running = Arc::new(AtomicBool::new(true));
        let low = quota.low_watermark();
        let watcher = watch_usage(&client, Arc::clone(&running), move |held| held <= low)?;
        let flag = Arc::clone(&running);
        let during = closed_loop_while(
            p.concurrency,
            &self.seq,
            &get,
            Arc::new(move || flag.load(Ordering::SeqCst)),
        )
        .await?;
        let (took, held) = watcher.await??;
        let evicted = (count as u64).saturating_sub(held / (4 * KIB) as u64);
        let deadline = Instant::now() + during.elapsed.max(p.duration);
        let after = closed_loop_while(
            p.concurrency,
            &self.seq,
            &get,
            Arc::new(move || Instant::now() < deadline),
        )
        .await?;
        server.send_sigterm();
        let _ = server.wait_exit(std::time::Duration::from_secs(60));
        let mut twin_server = ServerProcess::start_in(&twin, &[]).await;
        let twin_client = twin_server.client().await;
        let twin_get = object_get(&twin_client, &Namespace::new("reads")?, twin_keys);
        // The same usage polling as above, so that only eviction differs.
        let deadline = Instant::now() + during.elapsed;
        let running = Arc::new(AtomicBool::new(true));
        let watcher = watch_usage(&twin_client, Arc::clone(&running), move |_| {
            Instant::now() >= deadline
        })?;
        let without = closed_loop_while(
            p.concurrency,
            &self.seq,
            &twin_get,
            Arc::new(move || running.load(Ordering::SeqCst)),
        )
        .await?;
        watcher.await??;
        twin_server.send_sigterm();
        let _ = twin_server.wait_exit(std::time::Duration::from_secs(60));
        println!(
            "  server evicted {evicted} values in {:.2} s after SERVING, beside the reads",
            took.as_secs_f64()
        );
        self.report.fact(
            "evictions per second inside a server under full read load",
            evicted as f64 / took.as_secs_f64(),
            "/s",
        );
        self.row("get 4 KiB while evicting", "trove", p.concurrency, &during);
        self.row(
            "get 4 KiB, just started, no eviction",
            "trove",
            p.concurrency,
            &without,
        );
        self.row("get 4 KiB, no eviction", "trove", p.concurrency, &after);
        self.report.compare_latency(
            "small get p99 while eviction runs",
            during.latency().p99_us,
            "same gets, just started, no eviction",
            without.latency().p99_us,
        );
        Ok(())
    }
}
