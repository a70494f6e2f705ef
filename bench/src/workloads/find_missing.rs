//! Find-missing calls over a batch of hashes, half of them present. The
//! shared context and helpers live in `mod.rs`.

use std::sync::Arc;

use anyhow::{bail, Result};
use bytes::Bytes;
use trove_proto::ObjectStore;

use super::{body, filler, name, sha256_hex, Bench};
use crate::load::op;

impl Bench {
    /// Find-missing with half of the hashes present.
    pub(super) async fn find_missing(&mut self) -> Result<()> {
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
}
