//! Exact usage: items and bytes per namespace, operation group and cache
//! tier, kept in sled and changed in the same logged write as the data.
//!
//! Every write through `SledStore::write` ends with [`account`], which
//! reads what the write changed (the overlay keeps each key's value before
//! and after) and adds the difference to the counters. The counters are
//! therefore exactly as durable as the data: the same log record carries
//! both, a crash replays or takes out both, and no scan is needed at start.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `usage` | `namespace, group` (cache: `+ prefix` + `m` or `p, branch`) | items, logical bytes, stored bytes (u64 BE each) |
//! | `usage` | empty key | format marker: the counters cover the whole store |
//! | `entry_usage` | generation (u64 BE) | entries and bytes of that generation, then the namespace once a header points at it |
//!
//! Entries are keyed by generation, not namespace: their counts go to their
//! generation, and to the namespace the generation names once a cassette's
//! header points at it (a new cassette, or a replace committing). A header
//! that moves away takes the generation's totals out of its namespace. A
//! generation no header points at (a replace still staging, or one
//! awaiting collection) counts nowhere.

use std::collections::BTreeMap;

use sled::transaction::UnabortableTransactionError;
use sled::IVec;
use trove_proto::types::Namespace;
use trove_proto::Error;

use super::wal::LoggedTx;
use super::{keys, schema, sled_error};
use crate::engine::record;

/// Tree of the counters.
pub(super) const USAGE: &str = "usage";
/// Tree of the per-generation entry counters.
pub(super) const ENTRY_USAGE: &str = "entry_usage";
/// The key under which the format marker lives (no counter key is empty).
const MARKER: &[u8] = b"";
/// The current format marker.
const FORMAT: &[u8] = b"1";

use trove_proto::admin::{
    UsageRow, GROUP_ARTIFACTS as ARTIFACTS, GROUP_CACHE as CACHE, GROUP_CASSETTES as CASSETTES,
    GROUP_ENTRIES as ENTRIES, GROUP_OBJECTS as OBJECTS, GROUP_STREAMS as STREAMS,
};

/// The two counter trees.
#[derive(Debug, Clone)]
pub(super) struct UsageTrees {
    pub(super) usage: sled::Tree,
    pub(super) entry_usage: sled::Tree,
}

/// A change to one counter.
#[derive(Debug, Clone, Copy, Default)]
struct Delta {
    items: i128,
    logical: i128,
    stored: i128,
}

impl Delta {
    fn add(&mut self, other: Delta) {
        self.items += other.items;
        self.logical += other.logical;
        self.stored += other.stored;
    }

    fn minus(self, other: Delta) -> Delta {
        Delta {
            items: self.items - other.items,
            logical: self.logical - other.logical,
            stored: self.stored - other.stored,
        }
    }

    fn is_zero(&self) -> bool {
        self.items == 0 && self.logical == 0 && self.stored == 0
    }
}

type TxResult<T> = Result<T, UnabortableTransactionError>;

fn encode(counter: Delta) -> [u8; 24] {
    let clamp = |v: i128| u64::try_from(v.max(0)).unwrap_or(u64::MAX);
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&clamp(counter.items).to_be_bytes());
    out[8..16].copy_from_slice(&clamp(counter.logical).to_be_bytes());
    out[16..].copy_from_slice(&clamp(counter.stored).to_be_bytes());
    out
}

fn decode(bytes: &[u8]) -> Delta {
    let field = |i: usize| {
        bytes
            .get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, |b| i128::from(u64::from_be_bytes(b)))
    };
    Delta {
        items: field(0),
        logical: field(1),
        stored: field(2),
    }
}

/// What one stored value record counts for.
fn record_weight(value: Option<&IVec>) -> Delta {
    match value.map(|v| record::decode(v)) {
        Some(Ok(record)) => Delta {
            items: 1,
            logical: i128::from(record.size),
            stored: i128::from(record.body_len),
        },
        // A record that does not parse was never written by this engine;
        // it still counts as an item so that removing it balances.
        Some(Err(_)) => Delta {
            items: 1,
            ..Delta::default()
        },
        None => Delta::default(),
    }
}

/// The counter key of a change to the tree `tree` at `key`, if that tree
/// is counted.
fn counter_key(tree: &[u8], key: &[u8]) -> Option<Vec<u8>> {
    let (ns, rest) = keys::take_part(key)?;
    match tree {
        t if t == schema::ARTIFACTS.as_bytes() => Some(keys::key(&[&ns, ARTIFACTS.as_bytes()])),
        t if t == schema::OBJECTS.as_bytes() => {
            let (_, kind) = keys::take_part(rest)?;
            let group = if kind.first() == Some(&schema::KIND_STREAM) {
                STREAMS
            } else {
                OBJECTS
            };
            Some(keys::key(&[&ns, group.as_bytes()]))
        }
        t if t == schema::CACHE_REFS.as_bytes() => {
            let (prefix, rest) = keys::take_part(rest)?;
            let mut counter = keys::key(&[&ns, CACHE.as_bytes(), &prefix]);
            match rest.first() {
                Some(&schema::TIER_MAIN) => counter.push(schema::TIER_MAIN),
                Some(&schema::TIER_PR) => {
                    let (branch, _) = keys::take_part(&rest[1..])?;
                    counter.push(schema::TIER_PR);
                    keys::push_part(&mut counter, &branch);
                }
                _ => return None,
            }
            Some(counter)
        }
        _ => None,
    }
}

/// A generation's totals and, once a header points at it, its namespace.
fn read_generation(
    tree: &super::wal::LoggedTree<'_>,
    gen: u64,
) -> TxResult<(Delta, Option<Vec<u8>>)> {
    Ok(match tree.get(gen.to_be_bytes())? {
        Some(value) => {
            let ns = value
                .get(24..)
                .filter(|ns| !ns.is_empty())
                .map(<[u8]>::to_vec);
            (decode(&value), ns)
        }
        None => (Delta::default(), None),
    })
}

fn generation_value(total: Delta, ns: Option<&[u8]>) -> Vec<u8> {
    let mut value = encode(total).to_vec();
    value.extend_from_slice(ns.unwrap_or_default());
    value
}

fn generation_of(header: Option<&IVec>) -> Option<u64> {
    header
        .and_then(|h| schema::decode_header(h))
        .map(|(gen, _)| gen)
}

/// Adds what the write in `tx` changed in its first `data_trees` trees to
/// the counters in trees `data_trees` (usage) and `data_trees + 1` (entry
/// usage). Runs at the end of every write body.
pub(super) fn account(tx: &LoggedTx<'_>, data_trees: usize) -> TxResult<()> {
    let usage = tx.tree(data_trees);
    let entry_usage = tx.tree(data_trees + 1);
    let mut counters: BTreeMap<Vec<u8>, Delta> = BTreeMap::new();
    let mut generations: BTreeMap<u64, Delta> = BTreeMap::new();
    let mut headers: Vec<(Vec<u8>, Option<u64>, Option<u64>)> = Vec::new();
    for index in 0..data_trees {
        let name = tx.tree_name(index);
        let changes = tx.changes(index);
        if *name == *schema::ENTRIES.as_bytes() {
            for (key, change) in changes.iter() {
                let Some((gen, _)) = keys::take_u64(key) else {
                    continue;
                };
                let len = |v: &Option<IVec>| v.as_ref().map_or(0, |v| i128::from(v.len() as u64));
                let weight = |v: &Option<IVec>| Delta {
                    items: i128::from(v.is_some()),
                    logical: len(v),
                    stored: len(v),
                };
                generations
                    .entry(gen)
                    .or_default()
                    .add(weight(&change.after).minus(weight(&change.before)));
            }
        } else if *name == *schema::CASSETTES.as_bytes() {
            for (key, change) in changes.iter() {
                let Some((ns, _)) = keys::take_part(key) else {
                    continue;
                };
                let before = generation_of(change.before.as_ref());
                let after = generation_of(change.after.as_ref());
                counters
                    .entry(keys::key(&[&ns, CASSETTES.as_bytes()]))
                    .or_default()
                    .add(Delta {
                        items: i128::from(after.is_some()) - i128::from(before.is_some()),
                        ..Delta::default()
                    });
                headers.push((ns, before, after));
            }
        } else {
            for (key, change) in changes.iter() {
                if let Some(counter) = counter_key(&name, key) {
                    let delta = record_weight(change.after.as_ref())
                        .minus(record_weight(change.before.as_ref()));
                    counters.entry(counter).or_default().add(delta);
                }
            }
        }
    }
    // Headers first: a generation a header starts or stops pointing at is
    // settled here, with this write's own entries included.
    let mut settled: Vec<u64> = Vec::new();
    for (ns, before, after) in headers {
        if before == after {
            continue;
        }
        let mut entries_delta = Delta::default();
        if let Some(gen) = before {
            let (stored, _) = read_generation(&entry_usage, gen)?;
            entries_delta = entries_delta.minus(stored);
            entry_usage.remove(gen.to_be_bytes())?;
            settled.push(gen);
        }
        if let Some(gen) = after {
            let (mut total, _) = read_generation(&entry_usage, gen)?;
            total.add(generations.get(&gen).copied().unwrap_or_default());
            entries_delta.add(total);
            entry_usage.insert(gen.to_be_bytes(), generation_value(total, Some(&ns)))?;
            settled.push(gen);
        }
        counters
            .entry(keys::key(&[&ns, ENTRIES.as_bytes()]))
            .or_default()
            .add(entries_delta);
    }
    for (gen, delta) in &generations {
        if settled.contains(gen) {
            continue;
        }
        let (mut total, ns) = read_generation(&entry_usage, *gen)?;
        total.add(*delta);
        if let Some(ns) = &ns {
            counters
                .entry(keys::key(&[ns, ENTRIES.as_bytes()]))
                .or_default()
                .add(*delta);
        }
        entry_usage.insert(gen.to_be_bytes(), generation_value(total, ns.as_deref()))?;
    }
    for (key, delta) in counters {
        if delta.is_zero() {
            continue;
        }
        let mut total = usage
            .get(&key)?
            .as_deref()
            .map_or_else(Delta::default, decode);
        total.add(delta);
        if total.items <= 0 && total.logical <= 0 && total.stored <= 0 {
            usage.remove(key)?;
        } else {
            usage.insert(key, &encode(total)[..])?;
        }
    }
    Ok(())
}

impl UsageTrees {
    /// Opens the counter trees.
    pub(super) fn open(db: &sled::Db) -> Result<Self, Error> {
        Ok(UsageTrees {
            usage: db.open_tree(USAGE).map_err(sled_error)?,
            entry_usage: db.open_tree(ENTRY_USAGE).map_err(sled_error)?,
        })
    }

    /// True when the counters cover the whole store.
    pub(super) fn ready(&self) -> Result<bool, Error> {
        Ok(self.usage.get(MARKER).map_err(sled_error)?.as_deref() == Some(FORMAT))
    }

    /// The counters of `namespace`, or of every namespace; sorted by key.
    pub(super) fn rows(&self, namespace: Option<&Namespace>) -> Result<Vec<UsageRow>, Error> {
        let prefix = namespace.map_or_else(Vec::new, schema::namespace_key);
        let mut rows = Vec::new();
        for item in self.usage.scan_prefix(&prefix) {
            let (key, value) = item.map_err(sled_error)?;
            if let Some(row) = parse_row(&key, &value) {
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

fn parse_row(key: &[u8], value: &[u8]) -> Option<UsageRow> {
    let (ns, rest) = keys::take_part(key)?;
    let (group, rest) = keys::take_part(rest)?;
    let total = decode(value);
    let mut row = UsageRow {
        namespace: String::from_utf8(ns).ok()?,
        group: String::from_utf8(group).ok()?,
        prefix: String::new(),
        branch: String::new(),
        pr_tier: false,
        items: u64::try_from(total.items).unwrap_or(0),
        logical_bytes: u64::try_from(total.logical).unwrap_or(0),
        stored_bytes: u64::try_from(total.stored).unwrap_or(0),
    };
    if row.group == CACHE {
        let (prefix, rest) = keys::take_part(rest)?;
        row.prefix = String::from_utf8(prefix).ok()?;
        if rest.first() == Some(&schema::TIER_PR) {
            let (branch, _) = keys::take_part(&rest[1..])?;
            row.pr_tier = true;
            row.branch = String::from_utf8(branch).ok()?;
        }
    }
    Some(row)
}

/// The trees the counters are computed from, for [`UsageTrees::prepare`].
pub(super) struct Sources<'a> {
    pub(super) objects: &'a sled::Tree,
    pub(super) artifacts: &'a sled::Tree,
    pub(super) cache_refs: &'a sled::Tree,
    pub(super) cassettes: &'a sled::Tree,
    pub(super) entries: &'a sled::Tree,
}

impl UsageTrees {
    /// Makes the counters cover the whole store: a store written before
    /// they existed is counted once by a scan; afterwards every write keeps
    /// them exact.
    /// Blocking.
    pub(super) fn prepare(&self, from: &Sources<'_>) -> Result<(), Error> {
        if self.ready()? {
            return Ok(());
        }
        let mut counters: BTreeMap<Vec<u8>, Delta> = BTreeMap::new();
        for tree in [from.objects, from.artifacts, from.cache_refs] {
            let name = tree.name();
            for item in tree.iter() {
                let (key, value) = item.map_err(sled_error)?;
                if let Some(counter) = counter_key(&name, &key) {
                    counters
                        .entry(counter)
                        .or_default()
                        .add(record_weight(Some(&value)));
                }
            }
        }
        let mut generations: BTreeMap<u64, Delta> = BTreeMap::new();
        for item in from.entries.iter() {
            let (key, value) = item.map_err(sled_error)?;
            if let Some((gen, _)) = keys::take_u64(&key) {
                let len = i128::from(value.len() as u64);
                generations.entry(gen).or_default().add(Delta {
                    items: 1,
                    logical: len,
                    stored: len,
                });
            }
        }
        let mut live: BTreeMap<u64, (Delta, Vec<u8>)> = BTreeMap::new();
        for item in from.cassettes.iter() {
            let (key, header) = item.map_err(sled_error)?;
            let Some((ns, _)) = keys::take_part(&key) else {
                continue;
            };
            counters
                .entry(keys::key(&[&ns, CASSETTES.as_bytes()]))
                .or_default()
                .add(Delta {
                    items: 1,
                    ..Delta::default()
                });
            if let Some(gen) = generation_of(Some(&header)) {
                let total = generations.get(&gen).copied().unwrap_or_default();
                live.insert(gen, (total, ns.clone()));
                counters
                    .entry(keys::key(&[&ns, ENTRIES.as_bytes()]))
                    .or_default()
                    .add(total);
            }
        }
        let counted = counters.len();
        // Written straight to sled, not through the log: only at open, with
        // no write running, and the marker last. sled recovers a prefix, so
        // a marker that survives a crash comes with every counter; a lost
        // marker only means counting again at the next start, and counters
        // that later logged writes changed are replayed with them.
        for (key, total) in &counters {
            self.usage
                .insert(key.as_slice(), &encode(*total)[..])
                .map_err(sled_error)?;
        }
        for (gen, (total, ns)) in &live {
            self.entry_usage
                .insert(gen.to_be_bytes(), generation_value(*total, Some(ns)))
                .map_err(sled_error)?;
        }
        self.usage.insert(MARKER, FORMAT).map_err(sled_error)?;
        if counted > 0 {
            tracing::info!(counters = counted, "counted what the store holds, once");
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl trove_proto::UsageStore for super::SledStore {
    /// Reads wait like every strict read.
    async fn namespace_usage(&self, namespace: Option<&Namespace>) -> Result<Vec<UsageRow>, Error> {
        let ticket = self.ticket();
        let store = self.clone();
        let namespace = namespace.cloned();
        let rows = super::blocking(move || store.inner.usage.rows(namespace.as_ref())).await?;
        self.visible(ticket).await?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::StreamExt;
    use trove_proto::cache::{CacheScope, UploadOptions};
    use trove_proto::entries::NewEntry;
    use trove_proto::types::{ByteStream, Name};
    use trove_proto::{ArtifactStore, CacheStore, EntryStore, ObjectStore, UsageStore};

    use super::super::{SledStore, StoreOptions};
    use super::*;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SledStore::open(dir.path(), StoreOptions::default()).expect("open");
        (dir, store)
    }

    fn body(bytes: &'static [u8]) -> ByteStream {
        futures::stream::iter([Ok(Bytes::from_static(bytes))]).boxed()
    }

    fn name(raw: &str) -> Name {
        Name::new("name", raw).expect("name")
    }

    fn entry(json: &'static str, at: i64) -> NewEntry {
        NewEntry::parse("entry", Bytes::from_static(json.as_bytes()), Some(at)).expect("entry")
    }

    fn row<'a>(rows: &'a [UsageRow], ns: &str, group: &str) -> Option<&'a UsageRow> {
        rows.iter().find(|r| r.namespace == ns && r.group == group)
    }

    fn figures(rows: &[UsageRow], ns: &str, group: &str) -> (u64, u64) {
        row(rows, ns, group).map_or((0, 0), |r| (r.items, r.logical_bytes))
    }

    /// Forgets the counters and counts the store again from scratch.
    async fn recount(store: &SledStore) -> Vec<UsageRow> {
        let trees = &store.inner.usage;
        trees.usage.clear().expect("clear");
        trees.entry_usage.clear().expect("clear");
        let entries = &store.inner.entry_trees;
        trees
            .prepare(&Sources {
                objects: &store.inner.objects,
                artifacts: &store.inner.artifacts,
                cache_refs: &store.inner.cache.refs,
                cassettes: &entries.cassettes,
                entries: &entries.entries,
            })
            .expect("recount");
        store.namespace_usage(None).await.expect("rows")
    }

    /// Writes, overwrites and deletes in every group move the counters by
    /// exactly what they stored, and a recount from scratch agrees.
    #[tokio::test]
    async fn counters_follow_every_group_and_match_a_recount() {
        let (_dir, store) = store();
        let (a, b) = (
            Namespace::new("team-a").expect("ns"),
            Namespace::new("team-b").expect("ns"),
        );
        let put = |ns: Namespace, key: &'static str, value: &'static [u8]| {
            let store = store.clone();
            async move {
                store
                    .put_artifact(&ns, &name(key), Default::default(), body(value))
                    .await
                    .expect("put")
            }
        };
        put(a.clone(), "one", b"0123456789").await;
        put(a.clone(), "two", b"01234567890123456789").await;
        put(a.clone(), "one", b"abc").await;
        put(b.clone(), "x", b"xyz").await;
        store
            .delete_artifact(&a, &name("two"))
            .await
            .expect("delete");
        let hash = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        store
            .put_object(&a, &name(hash), None, body(b"abc"))
            .await
            .expect("object");
        store
            .append_entries(
                &a,
                &name("cassette"),
                vec![entry(r#"{"n":1}"#, 1), entry(r#"{"n":22}"#, 2)],
                Default::default(),
            )
            .await
            .expect("append");
        store
            .append_entries(
                &a,
                &name("cassette"),
                vec![entry(r#"{"n":3}"#, 3)],
                Default::default(),
            )
            .await
            .expect("append again");
        store
            .append_entries(
                &a,
                &name("gone"),
                vec![entry(r#"{"n":4}"#, 4)],
                Default::default(),
            )
            .await
            .expect("append");
        store
            .delete_cassette(&a, &name("gone"))
            .await
            .expect("delete cassette");
        let replacement = futures::stream::iter([Ok(entry(r#"{"n":5}"#, 5))]).boxed();
        store
            .replace_entries(&b, &name("swapped"), replacement)
            .await
            .expect("replace");
        let scope = |branch: &str| CacheScope {
            namespace: a.clone(),
            prefix: "ci".into(),
            branch: name(branch),
            default_branch: name("main"),
            test_suite_id: String::new(),
        };
        store
            .upload(
                &scope("main"),
                &name("r1"),
                UploadOptions::default(),
                body(b"archive"),
            )
            .await
            .expect("upload main");
        store
            .upload(
                &scope("feature"),
                &name("r2"),
                UploadOptions::default(),
                body(b"pr"),
            )
            .await
            .expect("upload pr");

        let rows = store.namespace_usage(None).await.expect("rows");
        assert_eq!(figures(&rows, "team-a", ARTIFACTS), (1, 3));
        assert_eq!(figures(&rows, "team-b", ARTIFACTS), (1, 3));
        assert_eq!(figures(&rows, "team-a", OBJECTS), (1, 3));
        assert_eq!(figures(&rows, "team-a", CASSETTES), (1, 0));
        assert_eq!(figures(&rows, "team-a", ENTRIES), (3, 7 + 8 + 7));
        assert_eq!(figures(&rows, "team-b", CASSETTES), (1, 0));
        assert_eq!(figures(&rows, "team-b", ENTRIES), (1, 7));
        let cache: Vec<_> = rows.iter().filter(|r| r.group == CACHE).collect();
        assert_eq!(cache.len(), 2, "{cache:?}");
        let main = cache.iter().find(|r| !r.pr_tier).expect("main tier");
        assert_eq!(
            (main.prefix.as_str(), main.items, main.logical_bytes),
            ("ci", 1, 7)
        );
        let pr = cache.iter().find(|r| r.pr_tier).expect("PR tier");
        assert_eq!(
            (pr.branch.as_str(), pr.items, pr.logical_bytes),
            ("feature", 1, 2)
        );
        let only_b = store.namespace_usage(Some(&b)).await.expect("rows of b");
        assert!(only_b.iter().all(|r| r.namespace == "team-b"), "{only_b:?}");

        assert_eq!(recount(&store).await, rows);
    }

    /// The counters are written with the data: a reopened store reports
    /// the same figures without counting again.
    #[tokio::test]
    async fn counters_survive_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ns = Namespace::new("team").expect("ns");
        let before = {
            let store = SledStore::open(dir.path(), StoreOptions::default()).expect("open");
            store
                .put_artifact(&ns, &name("k"), Default::default(), body(b"12345"))
                .await
                .expect("put");
            store.namespace_usage(None).await.expect("rows")
        };
        let store = SledStore::open(dir.path(), StoreOptions::default()).expect("reopen");
        assert!(store.inner.usage.ready().expect("ready"));
        assert_eq!(store.namespace_usage(None).await.expect("rows"), before);
        assert_eq!(figures(&before, "team", ARTIFACTS), (1, 5));
    }
}
