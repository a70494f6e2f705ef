//! Who may do what: authentication (bearer tokens, client certificates) as
//! a tower layer in front of every service, and authorization as the
//! [`Authorize`] policy the gRPC adapters ask once they know a call's
//! namespace, before any storage is touched.
//!
//! - No or unknown credentials: UNAUTHENTICATED, before routing.
//! - A namespace or permission outside the principal's grant:
//!   PERMISSION_DENIED, the same whether or not the item exists.
//! - The health check stays open for probes; reflection needs credentials
//!   like any other service.
//! - The grants file is re-read when it changes (and on SIGHUP); a file that
//!   does not parse keeps the previous grants in force and is logged.
//!
//! # Layout
//! - [`grants`]: the grants file and principals.
//! - [`tls`]: TLS, mutual TLS, reloadable certificates, the connection type.

pub mod grants;
pub mod tls;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;
use tower::{Layer, Service};
use trove_proto::types::Namespace;

use crate::grpc::{Authorize, Permission};
use crate::telemetry::calls::CallNote;
use grants::{Grants, Principal};
use tls::PeerInfo;

/// Longest `authorization` header value accepted, in bytes.
const MAX_AUTHORIZATION_BYTES: usize = 4096;

/// The caller of a call, once authenticated; in the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

/// The server's access control: the grants in force and how callers prove
/// who they are.
#[derive(Debug)]
pub struct AccessControl {
    grants: RwLock<Arc<Grants>>,
    file: Option<PathBuf>,
    /// SHA-256 of the file's content when it was last read, loaded or not:
    /// a change of content (not of a timestamp, which can miss a quick
    /// rewrite) is what triggers a reload.
    seen: RwLock<Option<[u8; 32]>>,
    client_certs: bool,
}

/// SHA-256 of a file's content, or `None` when it cannot be read.
pub(crate) fn content_hash(paths: &[&std::path::Path]) -> Option<[u8; 32]> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for path in paths {
        hasher.update(std::fs::read(path).ok()?);
    }
    Some(hasher.finalize().into())
}

impl AccessControl {
    /// Access control from a grants file (`None`: no tokens) and whether
    /// client certificates are required (mutual TLS). With neither, every
    /// caller may do everything.
    pub fn open(file: Option<PathBuf>, client_certs: bool) -> Result<Arc<Self>, String> {
        // The hash is taken before the load, so a file replaced in between
        // differs from it and is read again at the next check.
        let seen = file.as_deref().and_then(|f| content_hash(&[f]));
        let grants = match &file {
            Some(path) => Grants::load(path)?,
            None => Grants::default(),
        };
        Ok(Arc::new(AccessControl {
            grants: RwLock::new(Arc::new(grants)),
            file,
            seen: RwLock::new(seen),
            client_certs,
        }))
    }

    /// Whether callers must prove who they are.
    pub fn enabled(&self) -> bool {
        self.file.is_some() || self.client_certs
    }

    fn current(&self) -> Arc<Grants> {
        self.grants
            .read()
            .map(|g| Arc::clone(&g))
            .unwrap_or_default()
    }

    /// Re-reads the grants file if it changed (or if `force`). A file that
    /// does not parse leaves the grants in force unchanged.
    pub fn reload(&self, force: bool) {
        let Some(path) = &self.file else {
            return;
        };
        let hash = content_hash(&[path]);
        let unchanged = self.seen.read().map(|s| *s == hash).unwrap_or(false);
        if unchanged && !force {
            return;
        }
        if let Ok(mut seen) = self.seen.write() {
            *seen = hash;
        }
        match Grants::load(path) {
            Ok(grants) => {
                let names: Vec<&str> = grants.names().collect();
                tracing::info!(principals = ?names, "grants reloaded");
                if let Ok(mut current) = self.grants.write() {
                    *current = Arc::new(grants);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "grants file not reloaded; the previous grants stay in force");
            }
        }
    }

    /// Who sent `request`: the bearer token if there is one, else the client
    /// certificate. `Ok(None)` when access control is off.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Option<Arc<Principal>>, Status> {
        if !self.enabled() {
            return Ok(None);
        }
        let grants = self.current();
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(Status::unauthenticated(
                "send exactly one authorization header",
            ));
        }
        if let Some(value) = first {
            let token = bearer_token(value)?;
            return grants.by_token(token).map(Some).ok_or_else(|| {
                Status::unauthenticated(
                    "the bearer token is not known to this server (revoked, mistyped, or for another server)",
                )
            });
        }
        if let Some(identity) = peer.and_then(|p| p.client.as_deref()) {
            return grants.by_client(identity).map(Some).ok_or_else(|| {
                Status::unauthenticated(format!(
                    "the client certificate ({}) is not mapped to a principal in the grants file",
                    identity.subject_text()
                ))
            });
        }
        Err(Status::unauthenticated(
            "credentials required: send `authorization: Bearer <token>`, or a client certificate",
        ))
    }
}

/// The token of an `authorization: Bearer <token>` header value.
fn bearer_token(value: &http::HeaderValue) -> Result<&str, Status> {
    let malformed =
        || Status::unauthenticated("malformed authorization header: expected `Bearer <token>`");
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(Status::unauthenticated(format!(
            "the authorization header is longer than {MAX_AUTHORIZATION_BYTES} bytes"
        )));
    }
    let text = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = text.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(malformed());
    }
    Ok(token)
}

/// Authenticates every call but the health check before it is routed.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    access: Arc<AccessControl>,
}

impl AuthLayer {
    /// A layer checking callers against `access`.
    pub fn new(access: Arc<AccessControl>) -> Self {
        AuthLayer { access }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            access: Arc::clone(&self.access),
        }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    access: Arc<AccessControl>,
}

impl<S> Service<http::Request<Body>> for AuthService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Box::pin(self.inner.call(request));
        }
        let peer = request.extensions().get::<PeerInfo>();
        match self.access.authenticate(request.headers(), peer) {
            Ok(None) => Box::pin(self.inner.call(request)),
            Ok(Some(principal)) => {
                if let Some(note) = request.extensions().get::<CallNote>() {
                    note.update(|n| n.principal = Some(principal.name.clone()));
                }
                request.extensions_mut().insert(Caller(principal));
                Box::pin(self.inner.call(request))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

/// The authorization policy the adapters ask: the caller's grant must
/// cover the namespace and every permission the call needs.
#[derive(Debug, Clone)]
pub struct Policy {
    access: Arc<AccessControl>,
}

impl Policy {
    /// The policy of `access`.
    pub fn new(access: Arc<AccessControl>) -> Self {
        Policy { access }
    }
}

fn permission_name(permission: Permission) -> &'static str {
    match permission {
        Permission::Read => "read",
        Permission::Write => "write",
        Permission::Delete => "delete",
        Permission::Admin => "admin",
    }
}

impl Authorize for Policy {
    fn authorize(
        &self,
        extensions: &tonic::Extensions,
        ns: &Namespace,
        needed: &[Permission],
    ) -> Result<(), Status> {
        if let Some(note) = extensions.get::<CallNote>() {
            let changes = needed
                .iter()
                .any(|p| matches!(p, Permission::Write | Permission::Delete));
            note.update(|n| {
                n.namespace = Some(ns.as_str().to_owned());
                n.audited |= changes;
            });
        }
        if !self.access.enabled() {
            return Ok(());
        }
        let Some(Caller(principal)) = extensions.get::<Caller>() else {
            return Err(Status::unauthenticated("credentials required"));
        };
        if principal.allows(ns.as_str(), needed) {
            return Ok(());
        }
        let wanted: Vec<&str> = needed.iter().map(|p| permission_name(*p)).collect();
        Err(Status::permission_denied(format!(
            "principal {:?} may not {} in namespace {:?}; ask for a grant that covers it",
            principal.name,
            wanted.join(" and "),
            ns.as_str()
        )))
    }
}
