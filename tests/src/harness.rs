//! Starts the real `trove-server` binary on 127.0.0.1 with an ephemeral port,
//! waits for it by polling the gRPC health check (never by sleeping a fixed
//! time), and can stop it gently (SIGTERM) or brutally (SIGKILL).
//!
//! The binary is looked up in `TROVE_SERVER_BIN`, else next to the test
//! executable's folder (`target/<profile>/trove-server`), which
//! `cargo test --workspace` / `cargo nextest run --workspace` keep fresh
//! because the server package has integration tests of its own.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trove_client::{ClientOptions, TroveClient};

/// Longest wait for the server to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of the server binary under test.
pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TROVE_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target/<profile>/trove-server
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("trove-server"))
        .unwrap_or_default();
    assert!(
        candidate.exists(),
        "trove-server binary not found at {}; run the whole workspace's tests \
         (cargo nextest run --workspace) or set TROVE_SERVER_BIN",
        candidate.display()
    );
    candidate
}

/// A running `trove-server` process. Killed (SIGKILL) when dropped.
pub struct ServerProcess {
    child: Option<Child>,
    /// Address the server listens on.
    pub addr: SocketAddr,
    /// Address of the Prometheus endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Address of the plaintext health listener, when one was asked for.
    pub health_addr: Option<SocketAddr>,
    /// Data directory of the server.
    pub data_dir: PathBuf,
    /// File receiving the server's standard error (its logs).
    pub log_path: PathBuf,
    extra_args: Vec<String>,
    envs: Vec<(String, String)>,
    /// How clients (and the readiness check) reach it: TLS and token.
    pub connect: ClientOptions,
    _temp: Option<TempDir>,
}

impl ServerProcess {
    /// Starts a server on a fresh temporary data directory.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server on a fresh temporary data directory with extra flags.
    pub async fn start_with(extra_args: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("create temp dir");
        let data_dir = temp.path().join("data");
        let mut server = Self::start_in(&data_dir, extra_args).await;
        server._temp = Some(temp);
        server
    }

    /// Starts a server on `data_dir` (which outlives the process).
    pub async fn start_in(data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::start_in_with_env(data_dir, extra_args, &[]).await
    }

    /// Starts a server on a fresh temporary data directory with extra flags
    /// and extra environment variables (kept for restarts).
    pub async fn start_with_env(extra_args: &[&str], envs: &[(String, String)]) -> Self {
        let temp = tempfile::tempdir().expect("create temp dir");
        let data_dir = temp.path().join("data");
        let mut server = Self::start_in_with_env(&data_dir, extra_args, envs).await;
        server._temp = Some(temp);
        server
    }

    async fn start_in_with_env(
        data_dir: &Path,
        extra_args: &[&str],
        envs: &[(String, String)],
    ) -> Self {
        let extra_args: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let log_path = data_dir.with_extension("log");
        let connect = ClientOptions::default();
        let (child, addr, metrics_addr, health_addr) = spawn(
            data_dir,
            "127.0.0.1:0",
            &extra_args,
            envs,
            &log_path,
            &connect,
        )
        .await;
        ServerProcess {
            child: Some(child),
            addr,
            metrics_addr,
            health_addr,
            data_dir: data_dir.to_path_buf(),
            log_path,
            extra_args,
            envs: envs.to_vec(),
            connect,
            _temp: None,
        }
    }

    /// Starts a server on a fresh temporary data directory with extra flags
    /// (TLS, tokens) that clients reach with `connect`; readiness is polled
    /// through the same TLS settings and token.
    pub async fn start_secure(extra_args: &[&str], connect: ClientOptions) -> Self {
        let temp = tempfile::tempdir().expect("create temp dir");
        let data_dir = temp.path().join("data");
        let extra: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let log_path = data_dir.with_extension("log");
        let (child, addr, metrics_addr, health_addr) =
            spawn(&data_dir, "127.0.0.1:0", &extra, &[], &log_path, &connect).await;
        ServerProcess {
            child: Some(child),
            addr,
            metrics_addr,
            health_addr,
            data_dir,
            log_path,
            extra_args: extra,
            envs: Vec::new(),
            connect,
            _temp: Some(temp),
        }
    }

    /// A client connected to this server.
    pub async fn client(&self) -> TroveClient {
        TroveClient::connect_with(&self.addr.to_string(), &self.connect)
            .await
            .expect("connect to trove-server")
    }

    /// A raw tonic channel to this server.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILLs the server and waits for it to die.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM.
    pub fn send_sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit (at most `timeout`) and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data directory (after a kill).
    pub async fn restart(&mut self) {
        self.kill9();
        let (child, addr, metrics_addr, health_addr) = spawn(
            &self.data_dir,
            "127.0.0.1:0",
            &self.extra_args,
            &self.envs,
            &self.log_path,
            &self.connect,
        )
        .await;
        self.child = Some(child);
        self.addr = addr;
        self.metrics_addr = metrics_addr;
        self.health_addr = health_addr;
    }

    /// Starts the server again on the same data directory and the same
    /// address, so existing clients reconnect to it.
    pub async fn restart_same_address(&mut self) {
        self.kill9();
        let listen = self.addr.to_string();
        let (child, addr, metrics_addr, health_addr) = spawn(
            &self.data_dir,
            &listen,
            &self.extra_args,
            &self.envs,
            &self.log_path,
            &self.connect,
        )
        .await;
        self.child = Some(child);
        self.addr = addr;
        self.metrics_addr = metrics_addr;
        self.health_addr = health_addr;
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Peak resident memory of the server process, in bytes (Linux).
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn spawn(
    data_dir: &Path,
    listen: &str,
    extra_args: &[String],
    envs: &[(String, String)],
    log_path: &Path,
    connect: &ClientOptions,
) -> (Child, SocketAddr, Option<SocketAddr>, Option<SocketAddr>) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("open server log");
    let mut child = Command::new(server_binary())
        .arg("--listen")
        .arg(listen)
        .arg("--data-dir")
        .arg(data_dir)
        // An ephemeral metrics port, unless the test chose one.
        .args(if extra_args.iter().any(|a| a == "--metrics-listen") {
            vec![]
        } else {
            vec!["--metrics-listen", "127.0.0.1:0"]
        })
        .args(extra_args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn trove-server");
    let stdout = child.stdout.take().expect("stdout");
    let log_copy = log_path.to_path_buf();
    let addr = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let (mut metrics, mut health) = (None, None);
        while let Some(Ok(line)) = lines.next() {
            if let Some(addr) = line.strip_prefix("metrics on ") {
                metrics = addr.trim().parse::<SocketAddr>().ok();
            }
            if let Some(addr) = line.strip_prefix("health on ") {
                health = addr.trim().parse::<SocketAddr>().ok();
            }
            if let Some(addr) = line.strip_prefix("listening on ") {
                return addr
                    .trim()
                    .parse::<SocketAddr>()
                    .ok()
                    .map(|a| (a, metrics, health));
            }
        }
        None
    });
    let (addr, metrics_addr, health_addr) = match tokio::time::timeout(START_TIMEOUT, addr).await {
        Ok(Ok(Some(addrs))) => addrs,
        _ => {
            let _ = child.kill();
            panic!(
                "trove-server did not report its address; log:\n{}",
                std::fs::read_to_string(&log_copy).unwrap_or_default()
            );
        }
    };
    wait_serving_with(addr, connect).await;
    (child, addr, metrics_addr, health_addr)
}

/// Fetches `/metrics` from `addr` with a plain HTTP/1.1 request.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: trove\r\nConnection: close\r\n\r\n")
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    body.to_owned()
}

/// The store gauges a server exports: items by kind, and the logical and
/// on-disk bytes when the engine reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreGauges {
    /// `trove_store_items` by its `kind` label.
    pub items: std::collections::BTreeMap<String, f64>,
    /// `trove_store_logical_bytes`, when exported.
    pub logical_bytes: Option<f64>,
    /// `trove_store_disk_bytes`, when exported.
    pub disk_bytes: Option<f64>,
    /// `trove_usage_items` and `trove_usage_logical_bytes` by their
    /// `(namespace, group, tier)` labels.
    pub usage: std::collections::BTreeMap<(String, String, String), (f64, f64)>,
}

/// Reads the store gauges from a server's `/metrics`.
pub async fn store_gauges(metrics: SocketAddr) -> StoreGauges {
    let text = scrape(metrics).await;
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text");
    let mut gauges = StoreGauges::default();
    for sample in parsed.samples {
        let prometheus_parse::Value::Gauge(value) = sample.value else {
            continue;
        };
        match sample.metric.as_str() {
            "trove_store_items" => {
                let kind = sample.labels.get("kind").unwrap_or_default().to_owned();
                gauges.items.insert(kind, value);
            }
            "trove_store_logical_bytes" => gauges.logical_bytes = Some(value),
            "trove_store_disk_bytes" => gauges.disk_bytes = Some(value),
            "trove_usage_items" | "trove_usage_logical_bytes" => {
                let label = |name: &str| sample.labels.get(name).unwrap_or_default().to_owned();
                let entry = gauges
                    .usage
                    .entry((label("namespace"), label("group"), label("tier")))
                    .or_default();
                if sample.metric == "trove_usage_items" {
                    entry.0 = value;
                } else {
                    entry.1 = value;
                }
            }
            _ => {}
        }
    }
    gauges
}

/// Polls the store gauges until `ready` accepts them (they are refreshed in
/// the background); panics with the last reading after `timeout`.
pub async fn wait_store_gauges(
    metrics: SocketAddr,
    timeout: Duration,
    ready: impl Fn(&StoreGauges) -> bool,
) -> StoreGauges {
    let deadline = Instant::now() + timeout;
    loop {
        let gauges = store_gauges(metrics).await;
        if ready(&gauges) {
            return gauges;
        }
        assert!(
            Instant::now() < deadline,
            "the store gauges never showed what was stored: {gauges:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the gRPC health check until the server reports SERVING.
pub async fn wait_serving(addr: SocketAddr) {
    wait_serving_with(addr, &ClientOptions::default()).await;
}

/// Polls the gRPC health check, reached with `connect`, until the server
/// reports SERVING.
pub async fn wait_serving_with(addr: SocketAddr, connect: &ClientOptions) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if health_status_with(addr, "", connect).await == Some(ServingStatus::Serving) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "trove-server at {addr} never became SERVING"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The health status of `service` reached with `connect` (TLS, token), or
/// `None` when the server cannot be reached.
pub async fn health_status_with(
    addr: SocketAddr,
    service: &str,
    connect: &ClientOptions,
) -> Option<ServingStatus> {
    if connect.ca_pem.is_none() && connect.identity_pem.is_none() {
        return health_status(addr, service).await;
    }
    let client = tokio::time::timeout(
        Duration::from_secs(2),
        TroveClient::connect_with(&addr.to_string(), connect),
    )
    .await
    .ok()?
    .ok()?;
    let reply = HealthClient::new(client.channel())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(reply.into_inner().status).ok()
}

/// The health status of `service` ("" for the whole server), or `None` when
/// the server cannot be reached.
pub async fn health_status(addr: SocketAddr, service: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(reply.into_inner().status).ok()
}

/// The sum of every sample of counter `name` whose labels include `labels`,
/// read from a server's `/metrics` (0 when there is none yet).
pub async fn counter_sum(metrics: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = scrape(metrics).await;
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text");
    parsed
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}
