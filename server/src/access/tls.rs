//! Transport security: TLS with rustls (1.2 or 1.3 at least), optional mutual
//! TLS against a client CA, a certificate and key that can be replaced on
//! disk while the server runs, and the connection type tonic serves (plain
//! TCP or TLS, with the peer's address and client identity).
//!
//! Handshakes run in tasks of their own with a time limit, so a client that
//! opens a connection and never finishes its handshake holds nothing but its
//! own socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use super::grants::{ClientIdentity, San};

/// Longest a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once; further connections wait to be
/// accepted, so a flood of silent sockets cannot use every descriptor.
const MAX_HANDSHAKES: usize = 512;
/// Pause after a failed accept (out of descriptors, for instance), so the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How often the certificate and key files are checked for changes.
pub const RELOAD_PERIOD: Duration = Duration::from_secs(2);

/// The lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[value(name = "1.2")]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    #[serde(rename = "1.3")]
    V1_3,
}

/// The TLS settings of a server.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM bundle of the CAs client certificates must chain to (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// The lowest version accepted.
    pub min_version: TlsVersion,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a certificate chain and its key as rustls signs with them.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate {} is not PEM: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| format!("the key {} is not usable: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("{} does not match {}: {e}", key.display(), cert.display()))?;
    Ok(certified)
}

/// Serves the current certificate; replaced as a whole when the files
/// change, so new handshakes use the new one and open connections go on.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
    files: (PathBuf, PathBuf),
    /// SHA-256 of both files when last read: content, not timestamps,
    /// decides a reload.
    seen: RwLock<Option<[u8; 32]>>,
}

impl CertStore {
    /// Loads the certificate and key named in `settings`.
    pub fn open(settings: &TlsSettings) -> Result<Arc<Self>, String> {
        let seen = super::content_hash(&[&settings.cert, &settings.key]);
        let key = load_certified_key(&settings.cert, &settings.key)?;
        Ok(Arc::new(CertStore {
            current: RwLock::new(Arc::new(key)),
            files: (settings.cert.clone(), settings.key.clone()),
            seen: RwLock::new(seen),
        }))
    }

    /// Reloads the files if they changed since the last load (or if `force`).
    /// A pair that does not load keeps the current one in service.
    pub fn reload(&self, force: bool) {
        let (cert, key) = &self.files;
        let hash = super::content_hash(&[cert, key]);
        let unchanged = self.seen.read().map(|s| *s == hash).unwrap_or(false);
        if unchanged && !force {
            return;
        }
        if let Ok(mut seen) = self.seen.write() {
            *seen = hash;
        }
        match load_certified_key(cert, key) {
            Ok(loaded) => {
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(loaded);
                }
                tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
            }
            Err(err) => {
                // Reported once per content: the next change is tried again.
                tracing::error!(error = %err, "TLS certificate not reloaded; the previous one stays in use");
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|key| Arc::clone(&key))
    }
}

/// The acceptor for `settings`, serving certificates from `certs`.
pub fn acceptor(settings: &TlsSettings, certs: Arc<CertStore>) -> Result<TlsAcceptor, String> {
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read the client CA {}: {e}", path.display()))?
            {
                let cert =
                    cert.map_err(|e| format!("the client CA {} is not PEM: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("the client CA {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{} holds no CA certificate", path.display()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("the client CA {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What the server knows of a connection's far end.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The client certificate's identity, under mutual TLS.
    pub client: Option<Arc<ClientIdentity>>,
}

/// An accepted connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS, with the client identity read at the handshake.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(stream) => PeerInfo {
                remote: stream.peer_addr().ok(),
                client: None,
            },
            Conn::Tls(_, info) => info.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// The identity in a DER client certificate: its subject attributes and
/// its SANs, each with its kind.
fn identity_of(cert: &CertificateDer<'_>) -> Option<ClientIdentity> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut subject: Vec<(String, String)> = parsed
        .subject()
        .iter_attributes()
        .filter_map(|attr| {
            let oid = attr.attr_type().to_id_string();
            let value = attr.as_str().ok()?.to_owned();
            Some((attribute_name(&oid), value))
        })
        .collect();
    subject.sort();
    let sans = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(San::Dns(dns.to_ascii_lowercase())),
                    GeneralName::URI(uri) => Some(San::Uri((*uri).to_owned())),
                    GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes)
                            .ok()
                            .map(|b| San::Ip(std::net::IpAddr::from(b))),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .ok()
                            .map(|b| San::Ip(std::net::IpAddr::from(b))),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ClientIdentity { subject, sans })
}

/// The RFC 4514 short name of a subject attribute type (what grants files
/// write: `CN=runner,O=ci`); other types keep their dotted OID.
fn attribute_name(oid: &str) -> String {
    match oid {
        "2.5.4.3" => "CN",
        "2.5.4.5" => "SERIALNUMBER",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAILADDRESS",
        other => other,
    }
    .to_owned()
}

/// Accepts connections from `listener`: plain ones as they come, TLS ones
/// once their handshake (in its own task, time-limited) succeeded. The
/// accepting stops when the stream is dropped.
pub fn incoming(
    listener: Arc<TcpListener>,
    tls: Option<TlsAcceptor>,
) -> BoxStream<'static, std::io::Result<Conn>> {
    let Some(acceptor) = tls else {
        return futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                Conn::Plain(stream)
            });
            if accepted.is_err() {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            Some((accepted, listener))
        })
        .boxed();
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let accepting = tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&handshakes).acquire_owned().await else {
                return;
            };
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    if tx.send(Err(err)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let client = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(identity_of)
                            .map(Arc::new);
                        let info = PeerInfo {
                            remote: Some(remote),
                            client,
                        };
                        let _ = tx.send(Ok(Conn::Tls(Box::new(tls), info))).await;
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(%remote, error = %err, "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    let guard = AbortOnDrop(accepting);
    tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(move |conn| {
            let _ = &guard;
            conn
        })
        .boxed()
}

/// Stops the accepting task when the stream that owns it is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
