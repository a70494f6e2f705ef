//! The grants file (`--auth-tokens`): who the server knows and what each
//! principal may do. It stores only the SHA-256 of each bearer token, never
//! a token, and maps client-certificate subjects or SANs (under mutual TLS)
//! to the same kind of grant:
//!
//! ```toml
//! [[token]]
//! name = "ci-runners"                 # the principal, in logs and metrics
//! sha256 = "<64 lowercase hex>"       # SHA-256 of the token
//! namespaces = ["ci-*", "shared"]     # exact names, or a prefix ending in *
//! permissions = ["read", "write"]     # read, write, delete, admin
//!
//! [[client]]
//! name = "runner-certs"
//! san = "runner.ci.internal"          # or: subject = "CN=runner,O=ci"
//! namespaces = ["ci-*"]
//! permissions = ["read"]
//! ```
//!
//! Parsing is strict: unknown keys, bad hashes, duplicate names or hashes,
//! unknown permissions and patterns with a `*` anywhere but the end are
//! refused with a message naming the entry.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::grpc::Permission;

/// Who made a call, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The name from the grants file.
    pub name: String,
    namespaces: Vec<Pattern>,
    permissions: HashSet<Permission>,
}

impl Principal {
    /// Whether this principal holds every permission in `needed` on `ns`.
    /// `admin` holds every permission.
    pub fn allows(&self, ns: &str, needed: &[Permission]) -> bool {
        let admin = self.permissions.contains(&Permission::Admin);
        self.namespaces.iter().any(|p| p.matches(ns))
            && needed.iter().all(|p| admin || self.permissions.contains(p))
    }
}

/// A namespace pattern: an exact name, or a prefix followed by `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(raw: &str) -> Result<Self, String> {
        match raw.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Ok(Pattern::Prefix(prefix.to_owned())),
            None if !raw.is_empty() && !raw.contains('*') => Ok(Pattern::Exact(raw.to_owned())),
            _ => Err(format!(
                "namespace pattern {raw:?} must be a name, or a prefix ending in a single *"
            )),
        }
    }

    fn matches(&self, ns: &str) -> bool {
        match self {
            Pattern::Exact(name) => ns == name,
            Pattern::Prefix(prefix) => ns.starts_with(prefix.as_str()),
        }
    }
}

/// What a client certificate must show to be a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CertMatch {
    /// Exactly these subject attributes (order aside).
    Subject(Vec<(String, String)>),
    /// A DNS name (case-insensitive), IP address or URI among the SANs.
    San(San),
}

/// One subject alternative name, with its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    /// A DNS name, lower-cased.
    Dns(String),
    /// An IP address.
    Ip(std::net::IpAddr),
    /// A URI, as written.
    Uri(String),
}

impl San {
    /// A SAN as written in the grants file: `uri:...`, `ip:...`, `dns:...`,
    /// or bare (an IP address if it parses as one, else a DNS name).
    fn parse(raw: &str) -> Result<Self, String> {
        if let Some(uri) = raw.strip_prefix("uri:") {
            return Ok(San::Uri(uri.to_owned()));
        }
        if let Some(ip) = raw.strip_prefix("ip:") {
            return ip
                .parse()
                .map(San::Ip)
                .map_err(|_| format!("{ip:?} is not an IP address"));
        }
        let dns = raw.strip_prefix("dns:").unwrap_or(raw);
        Ok(match dns.parse() {
            Ok(ip) => San::Ip(ip),
            Err(_) => San::Dns(dns.to_ascii_lowercase()),
        })
    }
}

/// Parses `CN=runner,O=ci` into attribute pairs (`\,` escapes a comma);
/// attribute names are compared upper-cased.
fn parse_subject(raw: &str) -> Result<Vec<(String, String)>, String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ',' => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    let mut pairs: Vec<(String, String)> = parts
        .iter()
        .map(|part| {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("subject part {part:?} is not NAME=VALUE"))?;
            Ok((key.trim().to_ascii_uppercase(), value.trim().to_owned()))
        })
        .collect::<Result<_, String>>()?;
    pairs.sort();
    Ok(pairs)
}

/// The identity a client certificate presented during the TLS handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject's attributes as (upper-cased short name, value), sorted.
    pub subject: Vec<(String, String)>,
    /// The subject alternative names.
    pub sans: Vec<San>,
}

impl ClientIdentity {
    /// The subject as text, for messages.
    pub fn subject_text(&self) -> String {
        self.subject
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Every principal the server knows, as loaded from one grants file.
#[derive(Debug, Default)]
pub struct Grants {
    tokens: Vec<([u8; 32], Arc<Principal>)>,
    clients: Vec<(CertMatch, Arc<Principal>)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<TokenEntry>,
    #[serde(default)]
    client: Vec<ClientEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    namespaces: Vec<String>,
    permissions: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    name: String,
    subject: Option<String>,
    san: Option<String>,
    namespaces: Vec<String>,
    permissions: Vec<String>,
}

fn principal(
    name: &str,
    namespaces: &[String],
    permissions: &[String],
) -> Result<Principal, String> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(format!(
            "principal name {name:?} must be 1 to 128 printable characters"
        ));
    }
    if namespaces.is_empty() {
        return Err(format!("{name}: namespaces must list at least one pattern"));
    }
    let namespaces = namespaces
        .iter()
        .map(|raw| Pattern::parse(raw).map_err(|e| format!("{name}: {e}")))
        .collect::<Result<_, _>>()?;
    let permissions = permissions
        .iter()
        .map(|raw| match raw.as_str() {
            "read" => Ok(Permission::Read),
            "write" => Ok(Permission::Write),
            "delete" => Ok(Permission::Delete),
            "admin" => Ok(Permission::Admin),
            other => Err(format!(
                "{name}: unknown permission {other:?} (read, write, delete, admin)"
            )),
        })
        .collect::<Result<HashSet<_>, _>>()?;
    if permissions.is_empty() {
        return Err(format!("{name}: permissions must list at least one"));
    }
    Ok(Principal {
        name: name.to_owned(),
        namespaces,
        permissions,
    })
}

impl Grants {
    /// Parses a grants file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())?;
        let mut names = HashSet::new();
        let mut grants = Grants::default();
        for entry in &file.token {
            let who = principal(&entry.name, &entry.namespaces, &entry.permissions)?;
            if !names.insert(entry.name.clone()) {
                return Err(format!("principal name {:?} is used twice", entry.name));
            }
            let digest = parse_digest(&entry.sha256).ok_or_else(|| {
                format!(
                    "{}: sha256 must be 64 lowercase hex characters (the SHA-256 of the token, \
                     e.g. from `printf %s TOKEN | sha256sum`)",
                    entry.name
                )
            })?;
            if grants.tokens.iter().any(|(d, _)| *d == digest) {
                return Err(format!("{}: this token hash is listed twice", entry.name));
            }
            grants.tokens.push((digest, Arc::new(who)));
        }
        for entry in &file.client {
            let who = principal(&entry.name, &entry.namespaces, &entry.permissions)?;
            if !names.insert(entry.name.clone()) {
                return Err(format!("principal name {:?} is used twice", entry.name));
            }
            let matcher = match (&entry.subject, &entry.san) {
                (Some(subject), None) if !subject.is_empty() => CertMatch::Subject(
                    parse_subject(subject).map_err(|e| format!("{}: {e}", entry.name))?,
                ),
                (None, Some(san)) if !san.is_empty() => {
                    CertMatch::San(San::parse(san).map_err(|e| format!("{}: {e}", entry.name))?)
                }
                _ => {
                    return Err(format!(
                        "{}: a [[client]] names exactly one of subject or san",
                        entry.name
                    ))
                }
            };
            if grants.clients.iter().any(|(m, _)| *m == matcher) {
                return Err(format!(
                    "{}: another [[client]] already maps the same certificate",
                    entry.name
                ));
            }
            grants.clients.push((matcher, Arc::new(who)));
        }
        Ok(grants)
    }

    /// Reads and parses a grants file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The principal holding `token`. Every listed hash is compared, in
    /// constant time, so the time taken says nothing about the hashes.
    pub fn by_token(&self, token: &str) -> Option<Arc<Principal>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (listed, who) in &self.tokens {
            if bool::from(listed.ct_eq(&digest)) {
                found = Some(Arc::clone(who));
            }
        }
        found
    }

    /// The principal a client certificate maps to, if any.
    pub fn by_client(&self, identity: &ClientIdentity) -> Option<Arc<Principal>> {
        self.clients.iter().find_map(|(matcher, who)| {
            let hit = match matcher {
                CertMatch::Subject(subject) => identity.subject == *subject,
                CertMatch::San(san) => identity.sans.contains(san),
            };
            hit.then(|| Arc::clone(who))
        })
    }

    /// The names of every principal (the bounded label set of the metrics).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tokens
            .iter()
            .map(|(_, p)| p.name.as_str())
            .chain(self.clients.iter().map(|(_, p)| p.name.as_str()))
    }
}

fn parse_digest(hex_text: &str) -> Option<[u8; 32]> {
    if hex_text.len() != 64
        || !hex_text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn file(entries: &str) -> String {
        entries
            .replace("HASH_A", &sha("token-a"))
            .replace("HASH_B", &sha("token-b"))
    }

    /// Tokens resolve to their principal by hash; patterns and permissions
    /// decide what each may do; admin holds everything.
    #[test]
    fn tokens_patterns_and_permissions() {
        let grants = Grants::parse(&file(
            r#"
            [[token]]
            name = "ci"
            sha256 = "HASH_A"
            namespaces = ["ci-*", "shared"]
            permissions = ["read", "write"]
            [[token]]
            name = "ops"
            sha256 = "HASH_B"
            namespaces = ["*"]
            permissions = ["admin"]
            "#,
        ))
        .expect("valid file");
        let ci = grants.by_token("token-a").expect("known token");
        assert_eq!(ci.name, "ci");
        assert!(ci.allows("ci-42", &[Permission::Read, Permission::Write]));
        assert!(ci.allows("shared", &[Permission::Read]));
        assert!(!ci.allows("shared-not", &[Permission::Read]));
        assert!(!ci.allows("ci-42", &[Permission::Delete]));
        assert!(!ci.allows("other", &[Permission::Read]));
        let ops = grants.by_token("token-b").expect("known token");
        assert!(ops.allows("anything", &[Permission::Delete, Permission::Admin]));
        assert!(grants.by_token("token-c").is_none());
        assert!(grants.by_token("").is_none());
        assert_eq!(grants.names().collect::<Vec<_>>(), ["ci", "ops"]);
    }

    /// Client certificates map by subject or by SAN.
    #[test]
    fn clients_by_subject_or_san() {
        let grants = Grants::parse(
            r#"
            [[client]]
            name = "by-san"
            san = "runner.ci"
            namespaces = ["ci"]
            permissions = ["read"]
            [[client]]
            name = "by-subject"
            subject = "CN=ops,O=trove"
            namespaces = ["ops"]
            permissions = ["delete"]
            "#,
        )
        .expect("valid file");
        let runner = ClientIdentity {
            subject: vec![("CN".into(), "someone".into())],
            sans: vec![San::Dns("x".into()), San::Dns("runner.ci".into())],
        };
        assert_eq!(
            grants.by_client(&runner).map(|p| p.name.clone()).as_deref(),
            Some("by-san")
        );
        let ops = ClientIdentity {
            subject: parse_subject("O=trove, CN=ops").expect("subject"),
            sans: vec![],
        };
        assert_eq!(
            grants.by_client(&ops).map(|p| p.name.clone()).as_deref(),
            Some("by-subject")
        );
        assert!(grants.by_client(&ClientIdentity::default()).is_none());
        // A single CN that reads like two attributes is one attribute.
        let forged = ClientIdentity {
            subject: vec![("CN".into(), "ops, O=trove".into())],
            sans: vec![],
        };
        assert!(grants.by_client(&forged).is_none());
        // An IP SAN is not a DNS name that happens to look the same.
        assert_eq!(San::parse("10.0.0.1"), Ok(San::Ip([10, 0, 0, 1].into())));
        assert_eq!(
            San::parse("dns:Runner.CI"),
            Ok(San::Dns("runner.ci".into()))
        );
    }

    /// Every malformed entry is refused with a message naming it.
    #[test]
    fn malformed_files_are_refused() {
        let valid = "namespaces = [\"a\"]\npermissions = [\"read\"]\n";
        for (text, expect) in [
            (format!("[[token]]\nname = \"t\"\nsha256 = \"abc\"\n{valid}"), "sha256"),
            (format!("[[token]]\nname = \"t\"\nsha256 = \"{}\"\n{valid}", sha("x").to_uppercase()), "sha256"),
            (format!("[[token]]\nname = \"t\"\nsha256 = \"{}\"\nnamespaces = [\"a*b\"]\npermissions = [\"read\"]\n", sha("x")), "a*b"),
            (format!("[[token]]\nname = \"t\"\nsha256 = \"{}\"\nnamespaces = [\"a\"]\npermissions = [\"fly\"]\n", sha("x")), "fly"),
            (format!("[[token]]\nname = \"t\"\nsha256 = \"{}\"\nnamespaces = []\npermissions = [\"read\"]\n", sha("x")), "namespaces"),
            (format!("[[token]]\nname = \"t\"\nsha256 = \"{0}\"\n{valid}[[token]]\nname = \"t\"\nsha256 = \"{1}\"\n{valid}", sha("x"), sha("y")), "twice"),
            (format!("[[token]]\nname = \"t\"\nsha256 = \"{0}\"\n{valid}[[token]]\nname = \"u\"\nsha256 = \"{0}\"\n{valid}", sha("x")), "twice"),
            (format!("[[client]]\nname = \"c\"\n{valid}"), "subject or san"),
            (format!("[[client]]\nname = \"c\"\nsan = \"a\"\n{valid}[[client]]\nname = \"d\"\nsan = \"A\"\n{valid}"), "same certificate"),
            (format!("[[client]]\nname = \"c\"\nsubject = \"CN\"\n{valid}"), "NAME=VALUE"),
            (format!("[[token]]\nname = \"t\"\nsha256 = \"{}\"\nsecret = \"x\"\n{valid}", sha("x")), "secret"),
            ("not toml [".to_owned(), ""),
        ] {
            let err = Grants::parse(&text).expect_err(&text);
            assert!(err.contains(expect), "{text}: {err}");
        }
    }
}
