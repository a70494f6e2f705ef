//! Validated domain types shared by every trait: namespaces, names (keys,
//! hashes, cassette and branch names), list pages and streamed payloads.
//!
//! Validation lives here, once, so the server's adapters and the client reject
//! exactly the same inputs with exactly the same messages.

use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::{shorten, Error, Result};

/// Longest key, hash, name or prefix accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Page size used when a request asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 1000;
/// Largest page size served; larger requests are capped.
pub const MAX_PAGE_SIZE: u32 = 10_000;
/// Namespace used when a request leaves it empty.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A stream of byte chunks: an upload's body or a download's content.
///
/// An `Err` item aborts the transfer: a consumer must treat the value as
/// incomplete and never store it.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

fn check_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes long; the limit is {MAX_NAME_BYTES} bytes",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(Error::invalid(
            field,
            format!("must not contain a NUL byte: {}", shorten(value)),
        ));
    }
    Ok(())
}

/// A tenant. Nothing is shared, listed or deleted across namespaces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Namespace(String);

impl Namespace {
    /// Validates a namespace as sent on the wire; empty means [`DEFAULT_NAMESPACE`].
    pub fn new(raw: &str) -> Result<Self> {
        if raw.is_empty() {
            return Ok(Self::default());
        }
        check_name("namespace", raw)?;
        Ok(Namespace(raw.to_owned()))
    }

    /// The namespace as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace(DEFAULT_NAMESPACE.to_owned())
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key, hash, cassette or branch name: 1 to 1024 bytes of UTF-8 with no NUL.
///
/// Names are opaque: `/`, `..` and any other character carry no meaning and
/// never become file paths.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Validates `raw` as the request field `field` (named in the error).
    pub fn new(field: &str, raw: impl Into<String>) -> Result<Self> {
        let raw = raw.into();
        check_name(field, &raw)?;
        Ok(Name(raw))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// When the name is 64 lowercase hex characters it is a SHA-256 digest
    /// that content must match; returns those 32 bytes.
    pub fn sha256_digest(&self) -> Option<[u8; 32]> {
        let s = self.0.as_bytes();
        if s.len() != 64
            || !s
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(out)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A validated request for one page of a sorted listing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListPage {
    /// Only names starting with these bytes.
    pub prefix: String,
    /// Items per page, already clamped to 1..=[`MAX_PAGE_SIZE`].
    pub page_size: u32,
    /// Resume strictly after this name (decoded from the page token).
    pub after: Option<String>,
}

impl ListPage {
    /// Validates the wire fields of a listing request.
    pub fn new(prefix: &str, page_size: u32, page_token: &str) -> Result<Self> {
        if prefix.len() > MAX_NAME_BYTES {
            return Err(Error::invalid(
                "prefix",
                format!(
                    "is {} bytes long; the limit is {MAX_NAME_BYTES} bytes",
                    prefix.len()
                ),
            ));
        }
        if prefix.contains('\0') {
            return Err(Error::invalid("prefix", "must not contain a NUL byte"));
        }
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode_page_token(page_token)?)
        };
        Ok(ListPage {
            prefix: prefix.to_owned(),
            page_size: clamp_page_size(page_size),
            after,
        })
    }

    /// The wire form of this request: `(prefix, page_size, page_token)`.
    pub fn to_wire(&self) -> (String, u32, String) {
        (
            self.prefix.clone(),
            self.page_size,
            self.after
                .as_deref()
                .map(encode_page_token)
                .unwrap_or_default(),
        )
    }

    /// First page of everything under `prefix`, with the default page size.
    pub fn first(prefix: &str) -> Self {
        ListPage {
            prefix: prefix.to_owned(),
            page_size: DEFAULT_PAGE_SIZE,
            after: None,
        }
    }
}

/// Maps a requested page size to the one served: 0 means the default, and
/// sizes above the maximum are capped rather than refused.
pub fn clamp_page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

const PAGE_TOKEN_PREFIX: &str = "p1.";

/// Encodes the last name of a page as the opaque token for the next page.
pub fn encode_page_token(last: &str) -> String {
    format!("{PAGE_TOKEN_PREFIX}{}", hex::encode(last.as_bytes()))
}

/// Decodes a page token made by [`encode_page_token`].
pub fn decode_page_token(token: &str) -> Result<String> {
    let bad = || {
        Error::invalid(
            "page_token",
            format!(
                "{} is not a token returned by a previous page",
                shorten(token)
            ),
        )
    };
    let body = token.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(bad)?;
    // Only what `encode_page_token` writes (lowercase hex): one spelling per token.
    if !body
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let bytes = hex::decode(body).map_err(|_| bad())?;
    let name = String::from_utf8(bytes).map_err(|_| bad())?;
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.contains('\0') {
        return Err(bad());
    }
    Ok(name)
}

/// One page of a sorted listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in the listing's order.
    pub items: Vec<T>,
    /// Token for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

impl<T> Page<T> {
    /// The wire form of the next-page token (empty on the last page).
    pub fn token_or_empty(&self) -> String {
        self.next_page_token.clone().unwrap_or_default()
    }
}

/// Microseconds since the Unix epoch, from the system clock.
pub fn now_micros() -> i64 {
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX)
}

/// Lowercase hex of a SHA-256 digest.
pub fn hex_digest(digest: &[u8]) -> String {
    hex::encode(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn assert_invalid(result: Result<Name>, field: &str) {
        match result {
            Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected InvalidArgument on {field}, got {other:?}"),
        }
    }

    /// Names follow DESIGN.md's rule: 1..=1024 bytes, no NUL, anything else goes.
    #[test]
    fn name_validation_boundaries() {
        assert_invalid(Name::new("key", ""), "key");
        assert_invalid(Name::new("key", "a\0b"), "key");
        assert_invalid(Name::new("key", "x".repeat(1025)), "key");
        for ok in [
            "x".repeat(1024),
            "../a/b".into(),
            "ключ/ü/🦀".into(),
            "\u{1}".into(),
        ] {
            assert!(Name::new("key", ok.clone()).is_ok(), "{ok:?}");
        }
    }

    /// An empty namespace is the default one; others are validated like names.
    #[test]
    fn namespace_defaults_and_validates() {
        assert_eq!(Namespace::new("").map(|n| n.0).ok(), Some("default".into()));
        assert!(Namespace::new("a\0").is_err());
    }

    /// Only 64 lowercase hex characters count as a SHA-256 digest.
    #[test]
    fn sha256_digest_detection() {
        let lower = "a".repeat(64);
        let upper = "A".repeat(64);
        assert!(Name::new("hash", lower)
            .map(|n| n.sha256_digest().is_some())
            .unwrap_or(false));
        assert!(Name::new("hash", upper)
            .map(|n| n.sha256_digest().is_none())
            .unwrap_or(false));
        assert!(Name::new("hash", "abc")
            .map(|n| n.sha256_digest().is_none())
            .unwrap_or(false));
    }

    /// Page tokens round-trip any name and reject anything else.
    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        for name in ["a", "a/b/../c", "ü\u{1}"] {
            assert_eq!(
                decode_page_token(&encode_page_token(name)).ok().as_deref(),
                Some(name)
            );
        }
        for bad in ["", "zz", "p1.zz", "p1.", "p1.00", "p1.6A"] {
            assert!(decode_page_token(bad).is_err(), "{bad:?}");
        }
        assert_eq!(clamp_page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(clamp_page_size(u32::MAX), MAX_PAGE_SIZE);
    }
}
