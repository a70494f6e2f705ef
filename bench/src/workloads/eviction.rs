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
use trove_proto::ObjectStore;
use trove_server::engine::quota::{NamespaceQuota, OnFull, Quotas};
use trove_server::engine::sled::{Durability, SledStore, StoreOptions};

use super::{body, drain, filler, sha256_hex, Bench, KIB};
use crate::load::{closed_loop_while, op, Op};

/// Values of the namespace whose gets are timed.
const READ_KEYS: usize = 1000;

/// Opens a store on a thread of its own: outside the runtime it starts no
/// maintenance task, so eviction runs exactly when the bench asks.
fn open_without_task(dir: &std::path::Path, options: StoreOptions) -> Result<SledStore> {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || SledStore::open(&dir, options))
        .join()
        .map_err(|_| anyhow::anyhow!("the store's open thread panicked"))?
        .context("open the store")
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

fn object_get(store: &SledStore, ns: &Namespace, hashes: Arc<Vec<Name>>) -> Op {
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

impl Bench {
    /// Evictions per second, and small-get p99 while eviction runs against
    /// the same gets without it.
    pub(super) async fn eviction(&mut self) -> Result<()> {
        let p = self.params.clone();
        let count = p.eviction_values;
        println!("eviction ({count} values of 4 KiB, about 55% evicted)");
        let dir = self.work_dir.path().join("eviction");
        let (cache, other) = (Namespace::new("evict")?, Namespace::new("reads")?);
        let filling = StoreOptions {
            durability: Durability::Relaxed,
            ..StoreOptions::default()
        };
        let read_keys = {
            let store = open_without_task(&dir, filling)?;
            // On an empty store this only marks the eviction index complete,
            // so the timed pass below does no indexing.
            tokio::task::block_in_place(|| store.run_eviction())?;
            fill(&store, &cache, count, 1).await?;
            let read_keys = fill(&store, &other, READ_KEYS, 1 << 40).await?;
            store.flush().await?;
            Arc::new(read_keys)
        };
        // Half the values fit: eviction takes the namespace from 100% of
        // the data to 45% of it (90% of the quota).
        let quota = NamespaceQuota {
            max_bytes: (count * 4 * KIB / 2) as u64,
            on_full: OnFull::Evict,
        };
        let quotas = Quotas {
            namespaces: [("evict".to_owned(), quota)].into(),
            ..Quotas::default()
        };
        let options = StoreOptions {
            quotas: Arc::new(quotas),
            ..StoreOptions::default()
        };
        let store = open_without_task(&dir, options)?;
        let get = object_get(&store, &other, read_keys);
        let concurrency = p.concurrency;

        let running = Arc::new(AtomicBool::new(true));
        let evicting = {
            let (store, running) = (store.clone(), Arc::clone(&running));
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let pass = store.run_eviction();
                running.store(false, Ordering::SeqCst);
                pass.map(|pass| (pass, started.elapsed()))
            })
        };
        let flag = Arc::clone(&running);
        let during = closed_loop_while(
            concurrency,
            &self.seq,
            &get,
            Arc::new(move || flag.load(Ordering::SeqCst)),
        )
        .await?;
        let (pass, took) = evicting.await??;
        if pass.evicted == 0 {
            bail!("the eviction pass evicted nothing");
        }
        let deadline = Instant::now() + during.elapsed;
        let without = closed_loop_while(
            concurrency,
            &self.seq,
            &get,
            Arc::new(move || Instant::now() < deadline),
        )
        .await?;
        self.row(
            "get 4 KiB while evicting",
            "in-process store",
            concurrency,
            &during,
        );
        self.row(
            "get 4 KiB, no eviction",
            "in-process store",
            concurrency,
            &without,
        );
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
        self.report.compare_latency(
            "small get p99 while eviction runs",
            during.latency().p99_us,
            "same gets, no eviction",
            without.latency().p99_us,
        );
        Ok(())
    }
}
