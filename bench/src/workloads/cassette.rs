//! Chronological reads of a whole large cassette recorded out of order. The
//! shared context and helpers live in `mod.rs`.

use std::sync::Arc;

use anyhow::{bail, Result};
use futures::StreamExt;
use trove_proto::entries::{NewEntry, ReadOptions};
use trove_proto::EntryStore;

use super::{entry_json, name, Bench, KIB};
use crate::load::op;

impl Bench {
    /// Chronological reads of a whole large cassette.
    pub(super) async fn cassette_reads(&mut self) -> Result<()> {
        let n = self.params.cassette_entries;
        println!("cassette reads ({n} entries of 1 KiB, recorded out of order)");
        let targets: Vec<(&str, Arc<dyn EntryStore>)> = vec![
            ("trove", Arc::new(self.trove.clone())),
            ("in-process store", Arc::new(self.local.clone())),
        ];
        let cassette = name("cassette", "read/large".to_owned())?;
        let mut rates = Vec::new();
        for (target, store) in &targets {
            for start in (0..n).step_by(1000) {
                let batch = (start..(start + 1000).min(n))
                    .map(|i| {
                        // Interleaved timestamps, so reading has to reorder.
                        let at = ((i % 2) * n + i) as u64;
                        let recorded_at = i64::try_from(at).unwrap_or(i64::MAX);
                        NewEntry::parse("entry", entry_json(at, KIB), Some(recorded_at))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                store
                    .append_entries(&self.ns, &cassette, batch, Default::default())
                    .await?;
            }
            let read = {
                let (store, ns, cassette) = (Arc::clone(store), self.ns.clone(), cassette.clone());
                op(move |_| {
                    let (store, ns, cassette) = (Arc::clone(&store), ns.clone(), cassette.clone());
                    async move {
                        let mut entries = store
                            .read_entries(&ns, &cassette, ReadOptions::default())
                            .await?;
                        let (mut count, mut bytes, mut last) = (0usize, 0u64, i64::MIN);
                        while let Some(entry) = entries.next().await {
                            let entry = entry?;
                            if entry.recorded_at < last {
                                bail!("entries out of order at {count}");
                            }
                            last = entry.recorded_at;
                            bytes += entry.json.len() as u64;
                            count += 1;
                        }
                        if count != n {
                            bail!("read {count} entries, expected {n}");
                        }
                        Ok(bytes)
                    }
                })
            };
            let m = self.measure(1, &read).await?;
            self.row(&format!("read cassette of {n}"), target, 1, &m);
            rates.push(m.ops_per_sec() * n as f64);
        }
        self.report.compare(
            "cassette read",
            "entries/s",
            rates[0],
            "in-process store",
            rates[1],
        );
        Ok(())
    }
}
