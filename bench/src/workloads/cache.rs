//! Cache archive uploads to main and downloads from a PR branch that fall
//! back to main. The shared context and helpers live in `mod.rs`.

use std::sync::Arc;

use anyhow::{bail, Result};
use trove_proto::cache::{CacheScope, UploadOptions};
use trove_proto::CacheStore;

use super::{body, drain, filler, name, Bench, KIB, MIB};
use crate::load::{op, Measured};

impl Bench {
    /// Cache uploads to main and downloads from a PR branch that fall back to main.
    pub(super) async fn cache(&mut self) -> Result<()> {
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
}
