//! The scaling curves (concurrency, payload size, items stored) and the
//! hidden `prefill` step that grows the store between points. The shared
//! context and helpers live in `mod.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use trove_proto::artifacts::PutOptions;
use trove_proto::types::Namespace;
use trove_proto::ArtifactStore;
use trove_server::engine::sled::{SledStore, StoreOptions};
use trove_tests::harness::ServerProcess;

use super::{body, disk_usage, drain, filler, name, Bench, KIB};
use crate::load::op;
use crate::report::{Curve, Point, Series};

/// Fills `data_dir` with `from..to` values of `value_bytes` under
/// `item/NNNNNNNNNN` keys, in-process, then flushes. Runs in its own
/// process (the hidden `prefill` command) so the store's lock is surely
/// released before a server opens the folder.
pub async fn prefill(data_dir: &Path, from: u64, to: u64, value_bytes: usize) -> Result<()> {
    let dir = data_dir.to_path_buf();
    let options = StoreOptions {
        durability: trove_server::engine::sled::Durability::Relaxed,
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

/// Runs the hidden `prefill` command of this program: values `from..to` of
/// `value_bytes` into `dir`.
fn run_prefill(exe: &Path, dir: &Path, from: u64, to: u64, value_bytes: usize) -> Result<()> {
    let status = std::process::Command::new(exe)
        .arg("prefill")
        .arg("--data-dir")
        .arg(dir)
        .args(["--from", &from.to_string(), "--to", &to.to_string()])
        .args(["--value-bytes", &value_bytes.to_string()])
        .status()
        .context("run the prefill step")?;
    if !status.success() {
        bail!("prefill to {to} items of {value_bytes} B failed: {status}");
    }
    Ok(())
}

impl Bench {
    /// Small gets at rising concurrency, Trove and the null store.
    pub(super) async fn concurrency_curve(&mut self) -> Result<()> {
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
    pub(super) async fn payload_curve(&mut self) -> Result<()> {
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
    pub(super) async fn store_size_curve(&mut self) -> Result<()> {
        let p = self.params.clone();
        println!("scaling: stored items {:?}", p.store_levels);
        let dir = self.work_dir.path().join("growing");
        let value_bytes = KIB;
        let mut filled = 0u64;
        let mut gets = Vec::new();
        let mut puts = Vec::new();
        let exe = std::env::current_exe()?;
        for &level in &p.store_levels {
            run_prefill(&exe, &dir, filled, level, value_bytes)?;
            filled = level;
            let starting = std::time::Instant::now();
            let mut server = ServerProcess::start_in(&dir, &[]).await;
            let started = starting.elapsed();
            // From spawning the process to its health check saying SERVING.
            println!(
                "  start to SERVING with {level} items: {:.3} s",
                started.as_secs_f64()
            );
            self.report.fact(
                &format!("start to SERVING with {level} items stored"),
                started.as_secs_f64(),
                "s",
            );
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
        // Which part of the folder holds what, for reading the figure.
        let parts: Vec<String> = ["db", "packs", "log"]
            .iter()
            .map(|part| format!("{part} {:.1} MB", disk_usage(&dir.join(part)) as f64 / 1e6))
            .collect();
        println!(
            "  data folder with {filled} values of 1 KiB: {:.1} MB ({})",
            disk_usage(&dir) as f64 / 1e6,
            parts.join(", ")
        );
        self.report.fact(
            &format!("space amplification, {filled} values of 1 KiB (disk / logical)"),
            disk_usage(&dir) as f64 / logical as f64,
            "x",
        );
        // The same bytes in values of 4 KiB: sled's cost per key weighs a
        // quarter as much.
        let larger = 4 * KIB;
        let items = filled * value_bytes as u64 / larger as u64;
        let larger_dir = self.work_dir.path().join("growing-4k");
        run_prefill(&exe, &larger_dir, 0, items, larger)?;
        self.report.fact(
            &format!("space amplification, {items} values of 4 KiB (disk / logical)"),
            disk_usage(&larger_dir) as f64 / (items * larger as u64) as f64,
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
