//! The limits Trove is measured against, each started by the bench itself:
//! a gRPC server with Trove's own adapters over a store that does nothing
//! (the transport limit), raw TCP over loopback (the wire limit) and, when
//! installed, Redis (what a user would otherwise pick).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trove_proto::artifacts::PutOptions;
use trove_proto::entries::{AppendOptions, EntryStream, NewEntryStream, ReadOptions};
use trove_proto::objects::{ChunkStream, ListedObject, ObjectInfo, StreamInfo};
use trove_proto::pb::artifacts_server::ArtifactsServer;
use trove_proto::pb::entries_server::EntriesServer;
use trove_proto::pb::objects_server::ObjectsServer;
use trove_proto::pb::{ArtifactInfo, ListedArtifact};
use trove_proto::types::{ByteStream, ListPage, Name, Namespace, Page};
use trove_proto::{ArtifactStore, EntryStore, Error, ObjectStore};
use trove_server::grpc::artifacts::ArtifactsService;
use trove_server::grpc::entries::EntriesService;
use trove_server::grpc::objects::ObjectsService;
use trove_server::grpc::Limits;

/// A store that keeps nothing: uploads are read to the end and dropped,
/// downloads return a fixed payload. Served through Trove's own gRPC
/// adapters it measures what the transport and the adapters cost alone.
#[derive(Debug, Clone)]
pub struct NullStore {
    payload: Bytes,
}

fn unsupported(operation: &str) -> Error {
    Error::Unimplemented {
        operation: format!("{operation} (the null store only answers the benchmarked calls)"),
    }
}

async fn drain(mut data: ByteStream) -> Result<u64, Error> {
    let mut len = 0u64;
    while let Some(chunk) = data.next().await {
        len += chunk?.len() as u64;
    }
    Ok(len)
}

impl NullStore {
    fn body(&self) -> ByteStream {
        futures::stream::iter([Ok(self.payload.clone())]).boxed()
    }
}

#[async_trait]
impl ArtifactStore for NullStore {
    async fn put_artifact(
        &self,
        _ns: &Namespace,
        key: &Name,
        options: PutOptions,
        data: ByteStream,
    ) -> Result<ArtifactInfo, Error> {
        let size = drain(data).await?;
        Ok(ArtifactInfo {
            key: key.as_str().to_owned(),
            size,
            content_type: options.content_type,
            ..Default::default()
        })
    }

    async fn get_artifact(
        &self,
        _ns: &Namespace,
        key: &Name,
    ) -> Result<(ArtifactInfo, ByteStream), Error> {
        let info = ArtifactInfo {
            key: key.as_str().to_owned(),
            size: self.payload.len() as u64,
            ..Default::default()
        };
        Ok((info, self.body()))
    }

    async fn delete_artifact(&self, _ns: &Namespace, _key: &Name) -> Result<bool, Error> {
        Err(unsupported("delete_artifact"))
    }

    async fn stat_artifact(&self, _ns: &Namespace, _key: &Name) -> Result<ArtifactInfo, Error> {
        Err(unsupported("stat_artifact"))
    }

    async fn list_artifacts(
        &self,
        _ns: &Namespace,
        _page: &ListPage,
        _with_values: bool,
    ) -> Result<Page<ListedArtifact>, Error> {
        Err(unsupported("list_artifacts"))
    }
}

#[async_trait]
impl ObjectStore for NullStore {
    async fn put_object(
        &self,
        _ns: &Namespace,
        hash: &Name,
        _expected_size: Option<u64>,
        data: ByteStream,
    ) -> Result<ObjectInfo, Error> {
        let size = drain(data).await?;
        Ok(ObjectInfo {
            hash: hash.as_str().to_owned(),
            size,
            ..Default::default()
        })
    }

    async fn get_object(
        &self,
        _ns: &Namespace,
        hash: &Name,
    ) -> Result<(ObjectInfo, ByteStream), Error> {
        let info = ObjectInfo {
            hash: hash.as_str().to_owned(),
            size: self.payload.len() as u64,
            ..Default::default()
        };
        Ok((info, self.body()))
    }

    async fn delete_object(&self, _ns: &Namespace, _hash: &Name) -> Result<bool, Error> {
        Err(unsupported("delete_object"))
    }

    async fn stat_object(&self, _ns: &Namespace, _hash: &Name) -> Result<ObjectInfo, Error> {
        Err(unsupported("stat_object"))
    }

    async fn list_objects(
        &self,
        _ns: &Namespace,
        _page: &ListPage,
    ) -> Result<Page<ListedObject>, Error> {
        Err(unsupported("list_objects"))
    }

    /// Answers with every second hash, the share the measured workload
    /// leaves missing, so the reply has the same size as Trove's.
    async fn find_missing(&self, _ns: &Namespace, hashes: &[Name]) -> Result<Vec<Name>, Error> {
        Ok(hashes.iter().skip(1).step_by(2).cloned().collect())
    }

    async fn put_stream(
        &self,
        _ns: &Namespace,
        _hash: &Name,
        _chunks: ChunkStream,
    ) -> Result<StreamInfo, Error> {
        Err(unsupported("put_stream"))
    }

    async fn get_stream(
        &self,
        _ns: &Namespace,
        _hash: &Name,
    ) -> Result<(StreamInfo, ChunkStream), Error> {
        Err(unsupported("get_stream"))
    }
}

#[async_trait]
impl EntryStore for NullStore {
    async fn append_entries(
        &self,
        _ns: &Namespace,
        _cassette: &Name,
        entries: Vec<trove_proto::entries::NewEntry>,
        _options: AppendOptions,
    ) -> Result<u64, Error> {
        Ok(entries.len() as u64)
    }

    async fn read_entries(
        &self,
        _ns: &Namespace,
        _cassette: &Name,
        _options: ReadOptions,
    ) -> Result<EntryStream, Error> {
        Err(unsupported("read_entries"))
    }

    async fn replace_entries(
        &self,
        _ns: &Namespace,
        _cassette: &Name,
        _entries: NewEntryStream,
    ) -> Result<u64, Error> {
        Err(unsupported("replace_entries"))
    }

    async fn delete_cassette(&self, _ns: &Namespace, _cassette: &Name) -> Result<bool, Error> {
        Err(unsupported("delete_cassette"))
    }

    async fn cassette_exists(&self, _ns: &Namespace, _cassette: &Name) -> Result<bool, Error> {
        Err(unsupported("cassette_exists"))
    }

    async fn ensure_cassette(&self, _ns: &Namespace, _cassette: &Name) -> Result<(), Error> {
        Err(unsupported("ensure_cassette"))
    }

    async fn list_cassettes(
        &self,
        _ns: &Namespace,
        _page: &ListPage,
    ) -> Result<Page<String>, Error> {
        Err(unsupported("list_cassettes"))
    }
}

/// A server on its own runtime, stopped when dropped.
pub struct BackgroundServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves the null store through Trove's gRPC adapters, with the server's
/// default message limit, on a runtime of its own (like a separate server
/// process, it does not share the load generator's worker threads).
pub fn start_null_server(payload: Bytes) -> Result<BackgroundServer> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind null server")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let store = Arc::new(NullStore { payload });
    let limits = Limits {
        max_message_bytes: 16 * 1024 * 1024,
    };
    let thread = std::thread::Builder::new()
        .name("null-server".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("null server: cannot start a runtime: {err}");
                    return;
                }
            };
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    eprintln!("null server: cannot register the listener");
                    return;
                };
                // Like Trove's server, answer without waiting on Nagle's
                // algorithm: small replies would otherwise stall for the
                // peer's delayed ACK (about 40 ms).
                let incoming =
                    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
                        conn.and_then(|conn| {
                            conn.set_nodelay(true)?;
                            Ok(conn)
                        })
                    });
                let served = tonic::transport::Server::builder()
                    .add_service(ArtifactsServer::new(ArtifactsService::new(
                        Arc::clone(&store),
                        limits,
                    )))
                    .add_service(ObjectsServer::new(ObjectsService::new(
                        Arc::clone(&store),
                        limits,
                    )))
                    .add_service(EntriesServer::new(EntriesService::new(store, limits)))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(err) = served {
                    eprintln!("null server stopped: {err}");
                }
            });
        })?;
    Ok(BackgroundServer {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// A loopback TCP peer that sinks every byte it is sent (answering one byte
/// once the sender shuts its side) and, on a second port, sends a fixed
/// number of bytes to whoever connects.
pub struct RawTcpPeer {
    /// Connect here and send; read one byte once everything arrived.
    pub sink: SocketAddr,
    /// Connect here and read `source_bytes`.
    pub source: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RawTcpPeer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

const TCP_BUFFER: usize = 1024 * 1024;

impl RawTcpPeer {
    /// Starts both listeners on the current runtime.
    pub async fn start(source_bytes: u64) -> Result<Self> {
        let sink_listener = TcpListener::bind("127.0.0.1:0").await?;
        let source_listener = TcpListener::bind("127.0.0.1:0").await?;
        let (sink, source) = (sink_listener.local_addr()?, source_listener.local_addr()?);
        let sink_task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = sink_listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; TCP_BUFFER];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 {
                            let _ = conn.write_all(b"k").await;
                            break;
                        }
                    }
                });
            }
        });
        let payload = Bytes::from(vec![0x5a; TCP_BUFFER]);
        let source_task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = source_listener.accept().await {
                let payload = payload.clone();
                tokio::spawn(async move {
                    let mut left = source_bytes;
                    while left > 0 {
                        let n = usize::try_from(left.min(payload.len() as u64)).unwrap_or(0);
                        if conn.write_all(&payload[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = conn.shutdown().await;
                });
            }
        });
        Ok(RawTcpPeer {
            sink,
            source,
            tasks: vec![sink_task, source_task],
        })
    }

    /// Sends `data` over a new connection and waits until the peer has all of it.
    pub async fn send(addr: SocketAddr, data: Bytes) -> Result<u64> {
        let mut conn = TcpStream::connect(addr).await?;
        for chunk in data.chunks(TCP_BUFFER) {
            conn.write_all(chunk).await?;
        }
        conn.shutdown().await?;
        let mut ack = [0u8; 1];
        conn.read_exact(&mut ack).await?;
        Ok(data.len() as u64)
    }

    /// Reads everything the source sends over a new connection.
    pub async fn receive(addr: SocketAddr) -> Result<u64> {
        let mut conn = TcpStream::connect(addr).await?;
        let mut buf = vec![0u8; TCP_BUFFER];
        let mut total = 0u64;
        loop {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    }
}

/// A `redis-server` process on a free loopback port, killed when dropped.
pub struct RedisServer {
    child: Child,
    /// Multiplexed connection shared by every caller, like Trove's one channel.
    pub connection: redis::aio::MultiplexedConnection,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `redis-server` is, if installed.
pub fn redis_binary() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("TROVE_BENCH_REDIS") {
        return Some(path.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    })
}

impl RedisServer {
    /// Starts Redis with its data in `dir`. With `durable`, every write is
    /// fsynced to the append-only file before it is acknowledged
    /// (`appendfsync always`); without, nothing is persisted.
    pub async fn start(binary: &Path, dir: &Path, durable: bool) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        std::fs::create_dir_all(dir)?;
        let persistence: &[&str] = if durable {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .args(persistence)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut server = None;
        while Instant::now() < deadline {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut connection).await;
                if pong.is_ok() {
                    server = Some(connection);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut child = child;
        match server {
            Some(connection) => Ok(RedisServer { child, connection }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("redis-server did not answer PING within 20 s")
            }
        }
    }
}
