//! Bulk SHA-256-verified object puts and gets, against raw loopback TCP and
//! the in-process store, with their space amplification. The shared context
//! and helpers live in `mod.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Result};
use bytes::Bytes;
use trove_proto::types::Name;
use trove_proto::ObjectStore;

use super::{body, disk_usage_except, drain, filler, name, sha256_hex, Bench, MIB};
use crate::baselines::RawTcpPeer;
use crate::load::{op, Measured};

impl Bench {
    /// Bulk verified object puts and gets against raw TCP and the in-process store.
    pub(super) async fn bulk(&mut self) -> Result<()> {
        for &size in &self.params.bulk_sizes.clone() {
            let label = format!("object {} MiB", size / MIB);
            println!("bulk objects ({label}, SHA-256 verified)");
            // Two distinct contents; a repeated put still streams, hashes,
            // stages and fsyncs the whole body before finding the copy.
            let payloads: Vec<(Name, Bytes)> = (0..2u64)
                .map(|i| {
                    let data = filler(size, 100 + i);
                    Ok((name("hash", sha256_hex(&data))?, data))
                })
                .collect::<Result<_>>()?;
            let payloads = Arc::new(payloads);
            // The write-ahead log is left out: its segments come and go with
            // checkpoints, whatever this workload stores.
            let disk_before = disk_usage_except(&self.server.data_dir, &["log"]);
            let targets: Vec<(&str, Arc<dyn ObjectStore>)> = vec![
                ("trove", Arc::new(self.trove.clone())),
                ("in-process store", Arc::new(self.local.clone())),
            ];
            let mut puts = Vec::new();
            let mut gets = Vec::new();
            for (target, store) in &targets {
                let put = {
                    let (store, ns, payloads) =
                        (Arc::clone(store), self.ns.clone(), Arc::clone(&payloads));
                    op(move |seq| {
                        let (store, ns) = (Arc::clone(&store), ns.clone());
                        let (hash, data) = payloads[(seq % 2) as usize].clone();
                        async move {
                            store
                                .put_object(&ns, &hash, Some(data.len() as u64), body(&data))
                                .await?;
                            Ok(data.len() as u64)
                        }
                    })
                };
                // Both contents exist before timing, so every timed put does the same work.
                put(0).await?;
                put(1).await?;
                let m = self.measure(1, &put).await?;
                self.row(&format!("{label} put"), target, 1, &m);
                puts.push(m);
                let get = {
                    let (store, ns, payloads) =
                        (Arc::clone(store), self.ns.clone(), Arc::clone(&payloads));
                    op(move |seq| {
                        let (store, ns) = (Arc::clone(&store), ns.clone());
                        let hash = payloads[(seq % 2) as usize].0.clone();
                        async move {
                            let (_, data) = store.get_object(&ns, &hash).await?;
                            let len = drain(data).await?;
                            if len != size as u64 {
                                bail!("read {len} bytes, expected {size}");
                            }
                            Ok(len)
                        }
                    })
                };
                let m = self.measure(1, &get).await?;
                self.row(&format!("{label} get"), target, 1, &m);
                gets.push(m);
            }
            let stored =
                disk_usage_except(&self.server.data_dir, &["log"]).saturating_sub(disk_before);
            self.report.fact(
                &format!("space amplification, two {label}s (disk / logical)"),
                stored as f64 / (2 * size) as f64,
                "x",
            );

            let peer = RawTcpPeer::start(size as u64).await?;
            let send = {
                let (addr, data): (SocketAddr, Bytes) = (peer.sink, payloads[0].1.clone());
                op(move |_| RawTcpPeer::send(addr, data.clone()))
            };
            let m_send = self.measure(1, &send).await?;
            self.row(&format!("{label} send"), "raw tcp", 1, &m_send);
            let receive = {
                let addr = peer.source;
                op(move |_| RawTcpPeer::receive(addr))
            };
            let m_recv = self.measure(1, &receive).await?;
            self.row(&format!("{label} receive"), "raw tcp", 1, &m_recv);

            let gib = |m: &Measured| m.bytes_per_sec() / (1024.0 * MIB as f64);
            for (kind, m, tcp) in [("put", &puts, &m_send), ("get", &gets, &m_recv)] {
                let figure = format!("bulk {kind} {label}");
                self.report
                    .compare(&figure, "GiB/s", gib(&m[0]), "raw loopback tcp", gib(tcp));
                self.report
                    .compare(&figure, "GiB/s", gib(&m[0]), "in-process store", gib(&m[1]));
            }
        }
        Ok(())
    }
}
