//! Small and bulk gets over TLS with a bearer token, beside the same gets in
//! plaintext measured back to back in the same run: what access control
//! costs. The shared context and helpers live in `mod.rs`.

use std::sync::Arc;

use anyhow::{bail, Result};
use sha2::Digest;
use trove_client::ClientOptions;
use trove_proto::{ArtifactStore, ObjectStore};
use trove_tests::harness::ServerProcess;
use trove_tests::pki::TestCa;

use super::{body, drain, filler, name, sha256_hex, Bench, MIB};
use crate::load::{op, Measured};

/// The token the TLS server knows.
const TOKEN: &str = "bench-token";

impl Bench {
    /// Small artifact gets and bulk object gets over TLS with a token
    /// against the plaintext server, each pair measured back to back.
    pub(super) async fn tls(&mut self) -> Result<()> {
        let p = self.params.clone();
        println!("TLS with a token, against plaintext");
        let dir = self.work_dir.path().join("tls");
        std::fs::create_dir_all(&dir)?;
        let ca = TestCa::new("bench CA");
        let (cert, key) = ca.server(&["127.0.0.1"], false).write(&dir, "server");
        let grants = dir.join("grants.toml");
        std::fs::write(
            &grants,
            format!(
                "[[token]]\nname = \"bench\"\nsha256 = \"{}\"\nnamespaces = [\"*\"]\npermissions = [\"read\", \"write\"]\n",
                hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
            ),
        )?;
        let options = ClientOptions {
            ca_pem: Some(ca.pem.clone().into_bytes()),
            token: Some(TOKEN.to_owned()),
            ..Default::default()
        };
        let (cert, key, grants) = (
            cert.to_string_lossy().into_owned(),
            key.to_string_lossy().into_owned(),
            grants.to_string_lossy().into_owned(),
        );
        let server = ServerProcess::start_secure(
            &[
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--auth-tokens",
                &grants,
            ],
            options,
        )
        .await;
        let secure = server.client().await;

        let label = format!("artifact {} B get", p.small_bytes);
        let value = filler(p.small_bytes, 3);
        let mut small = Vec::new();
        for (target, store) in [
            (
                "trove",
                Arc::new(self.trove.clone()) as Arc<dyn ArtifactStore>,
            ),
            ("trove tls+token", Arc::new(secure.clone())),
        ] {
            let put = self.artifact_put(Arc::clone(&store), "tls", value.clone(), p.small_keys);
            self.fill(&put, p.small_keys).await?;
            let get = self.artifact_get(store, "tls", p.small_bytes, p.small_keys);
            let m = self.measure(p.concurrency, &get).await?;
            self.row(&label, target, p.concurrency, &m);
            small.push(m);
        }
        self.report.compare(
            "small get over TLS with a token",
            "ops/s",
            small[1].ops_per_sec(),
            "plaintext, same run",
            small[0].ops_per_sec(),
        );

        let size = p.bulk_sizes.first().copied().unwrap_or(64 * MIB);
        let label = format!("object {} MiB get", size / MIB);
        let data = filler(size, 7);
        let hash = name("hash", sha256_hex(&data))?;
        let mut bulk = Vec::new();
        for (target, store) in [
            (
                "trove",
                Arc::new(self.trove.clone()) as Arc<dyn ObjectStore>,
            ),
            ("trove tls+token", Arc::new(secure.clone())),
        ] {
            store
                .put_object(&self.ns, &hash, Some(size as u64), body(&data))
                .await?;
            let get = {
                let (store, ns, hash) = (Arc::clone(&store), self.ns.clone(), hash.clone());
                op(move |_| {
                    let (store, ns, hash) = (Arc::clone(&store), ns.clone(), hash.clone());
                    async move {
                        let (_, body) = store.get_object(&ns, &hash).await?;
                        let len = drain(body).await?;
                        if len != size as u64 {
                            bail!("read {len} bytes, expected {size}");
                        }
                        Ok(len)
                    }
                })
            };
            let m = self.measure(1, &get).await?;
            self.row(&label, target, 1, &m);
            bulk.push(m);
        }
        let gib = |m: &Measured| m.bytes_per_sec() / (1024.0 * MIB as f64);
        self.report.compare(
            &format!("bulk get {} MiB over TLS with a token", size / MIB),
            "GiB/s",
            gib(&bulk[1]),
            "plaintext, same run",
            gib(&bulk[0]),
        );
        Ok(())
    }
}
