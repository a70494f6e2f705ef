//! The entries operation group: cassettes, append-ordered logs of recorded
//! interactions read back in recorded-time order.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::{shorten, Error, Result};
pub use crate::pb::StoredEntry;
use crate::types::{ListPage, Name, Namespace, Page};

/// Entries read back from a cassette, in order. An `Err` item ends the read.
pub type EntryStream = BoxStream<'static, Result<StoredEntry>>;
/// Entries of a Replace body. An `Err` item aborts the Replace.
pub type NewEntryStream = BoxStream<'static, Result<NewEntry>>;

/// A validated entry ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// A JSON object, exactly as it will be returned.
    pub json: Bytes,
    /// Ordering timestamp in microseconds (0 when the caller gave none).
    pub recorded_at: i64,
}

impl NewEntry {
    /// Validates a wire entry: `json` must be a JSON object. The timestamp is
    /// `recorded_at` when given, else a top-level integer `"recorded_at"`
    /// member of the object, else 0. `field` names the entry in errors.
    pub fn parse(field: &str, json: Bytes, recorded_at: Option<i64>) -> Result<Self> {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&json)
            .map_err(|e| {
                let what = if serde_json::from_slice::<serde_json::Value>(&json).is_ok() {
                    "must be a JSON object, not another JSON value".to_owned()
                } else {
                    format!("is not valid JSON ({e})")
                };
                Error::invalid(field, what)
            })?;
        let recorded_at = match recorded_at {
            Some(ts) => ts,
            None => object
                .get("recorded_at")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0),
        };
        Ok(NewEntry { json, recorded_at })
    }
}

/// Position of an entry in a cassette's read order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryCursor {
    /// The entry's `recorded_at`.
    pub recorded_at: i64,
    /// Arrival sequence that breaks ties.
    pub seq: u64,
}

const CURSOR_PREFIX: &str = "c1.";

impl EntryCursor {
    /// Opaque wire form, as returned in `StoredEntry.cursor`.
    pub fn encode(&self) -> String {
        format!("{CURSOR_PREFIX}{:016x}{:016x}", self.recorded_at, self.seq)
    }

    /// Parses a cursor made by [`EntryCursor::encode`]; `field` names it in errors.
    pub fn decode(field: &str, token: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                field,
                format!("{} is not a cursor returned by Read", shorten(token)),
            )
        };
        let body = token.strip_prefix(CURSOR_PREFIX).ok_or_else(bad)?;
        // Only what `encode` writes: 32 lowercase hex digits, so that every
        // cursor has exactly one spelling.
        if body.len() != 32
            || !body
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        let (ts, seq) = body.split_at(16);
        let ts = u64::from_str_radix(ts, 16).map_err(|_| bad())?;
        let seq = u64::from_str_radix(seq, 16).map_err(|_| bad())?;
        Ok(EntryCursor {
            recorded_at: i64::from_ne_bytes(ts.to_ne_bytes()),
            seq,
        })
    }
}

/// Options of an append.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppendOptions {
    /// Makes a retry of the same batch safe (see `EntryStore::append_entries`).
    pub idempotency_key: Option<Name>,
}

/// Which part of a cassette to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadOptions {
    /// Start strictly after this position.
    pub after: Option<EntryCursor>,
    /// Return at most this many entries; `None` reads to the end.
    pub limit: Option<u32>,
}

/// Cassettes of recorded interactions.
///
/// # Contract
/// - Entries are JSON objects. `append_entries` is all or nothing.
/// - `read_entries` yields entries ordered by `recorded_at`, ties (and entries
///   without a timestamp, which count as 0) in arrival order, across batches
///   and concurrent writers. A missing cassette reads as empty. Each entry
///   carries a cursor; reading `after` it continues exactly once past it.
/// - `replace_entries` swaps the whole content atomically: a concurrent reader
///   sees all of the old content or all of the new; an aborted body (an `Err`
///   item or a dropped future) changes nothing. Replacing with nothing leaves
///   an existing, empty cassette.
/// - An append that carries an idempotency key already applied to the
///   cassette's current content writes nothing again, so a batch retried after
///   an ambiguous failure (a lost reply, a failed flush) is never duplicated.
/// - A cassette exists from its first append or replace until deleted.
///   `delete_cassette` is idempotent. `ensure_cassette` only validates.
/// - A successful write is durable: it survives a crash of the process.
#[async_trait]
pub trait EntryStore: Send + Sync + 'static {
    /// Appends entries (at least one); returns how many were written. With
    /// an idempotency key that was already applied to the cassette's current
    /// content, nothing is written and the first call's count is returned.
    async fn append_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: Vec<NewEntry>,
        options: AppendOptions,
    ) -> Result<u64>;

    /// Streams entries in order. A missing cassette is an empty stream.
    async fn read_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        options: ReadOptions,
    ) -> Result<EntryStream>;

    /// Replaces the whole content atomically; returns the new entry count.
    async fn replace_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: NewEntryStream,
    ) -> Result<u64>;

    /// Deletes a cassette; returns whether it existed.
    async fn delete_cassette(&self, ns: &Namespace, cassette: &Name) -> Result<bool>;

    /// Whether the cassette exists.
    async fn cassette_exists(&self, ns: &Namespace, cassette: &Name) -> Result<bool>;

    /// Validates a cassette name; stores nothing.
    async fn ensure_cassette(&self, ns: &Namespace, cassette: &Name) -> Result<()>;

    /// Cassette names in byte order, one page at a time.
    async fn list_cassettes(&self, ns: &Namespace, page: &ListPage) -> Result<Page<String>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only JSON objects are entries; the timestamp comes from the field or the object.
    #[test]
    fn entry_validation() {
        let ok = NewEntry::parse(
            "entries[0]",
            Bytes::from_static(br#"{"recorded_at": 5}"#),
            None,
        );
        assert_eq!(ok.map(|e| e.recorded_at).ok(), Some(5));
        let explicit = NewEntry::parse(
            "entries[0]",
            Bytes::from_static(br#"{"recorded_at": 5}"#),
            Some(9),
        );
        assert_eq!(explicit.map(|e| e.recorded_at).ok(), Some(9));
        for bad in [&b"[1]"[..], b"12", b"\"s\"", b"{", b"", b"\xff"] {
            assert!(NewEntry::parse("entries[0]", Bytes::copy_from_slice(bad), None).is_err());
        }
    }

    /// Cursors round-trip, including negative timestamps, and reject garbage.
    #[test]
    fn cursor_round_trip() {
        for c in [
            EntryCursor {
                recorded_at: -5,
                seq: 0,
            },
            EntryCursor {
                recorded_at: i64::MAX,
                seq: u64::MAX,
            },
        ] {
            assert_eq!(EntryCursor::decode("after", &c.encode()).ok(), Some(c));
        }
        for bad in ["", "c1.", "c1.zz", "x"] {
            assert!(EntryCursor::decode("after", bad).is_err());
        }
        // One spelling per cursor: no upper case, no sign.
        let canonical = EntryCursor {
            recorded_at: 10,
            seq: 11,
        }
        .encode();
        for other in [
            canonical.to_uppercase().replacen("C1.", "c1.", 1),
            canonical.replacen("c1.0", "c1.+", 1),
        ] {
            assert!(EntryCursor::decode("after", &other).is_err(), "{other}");
        }
    }
}
