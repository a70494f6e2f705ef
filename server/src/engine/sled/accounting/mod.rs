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

use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, UnabortableTransactionError,
};
use sled::IVec;
use trove_proto::types::Namespace;
use trove_proto::Error;

use super::packs::spill;
use super::wal::LoggedTx;
use super::{keys, schema, sled_error};
use crate::engine::quota::{OnFull, Quotas};
use crate::engine::record;

mod recount;
mod room;
pub(in crate::engine::sled) use room::Room;

pub(super) use recount::Sources;
use room::{eviction_behind, over_quota, records_fill_quota};

/// Tree of the counters.
pub(super) const USAGE: &str = "usage";
/// Tree of the per-generation entry counters.
pub(super) const ENTRY_USAGE: &str = "entry_usage";
/// The key under which the format marker lives (no counter key is empty).
const MARKER: &[u8] = b"";
/// The current format marker (a store with another one is counted again).
const FORMAT: &[u8] = b"2";

use trove_proto::admin::{
    UsageRow, GROUP_ARTIFACTS as ARTIFACTS, GROUP_CACHE as CACHE, GROUP_CASSETTES as CASSETTES,
    GROUP_ENTRIES as ENTRIES, GROUP_OBJECTS as OBJECTS, GROUP_STREAMS as STREAMS,
};

/// The two counter trees.
#[derive(Debug, Clone)]
pub(super) struct UsageTrees {
    pub(super) usage: sled::Tree,
    pub(super) entry_usage: sled::Tree,
    /// The free-space floor of the data folder.
    pub(super) free: std::sync::Arc<crate::engine::quota::FreeSpace>,
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

/// The sum of the committed counter rows under `prefix` (every row for an
/// empty prefix).
fn committed_total(tree: &sled::Tree, prefix: &[u8]) -> Result<Delta, sled::Error> {
    let mut total = Delta::default();
    for item in tree.scan_prefix(prefix) {
        let (key, value) = item?;
        if key.as_ref() != MARKER {
            total.add(decode(&value));
        }
    }
    Ok(total)
}

/// Adds `delta` to the counter under `key` (removed once it counts
/// nothing).
fn add_to(tree: &super::wal::LoggedTree<'_>, key: Vec<u8>, delta: Delta) -> TxResult<()> {
    let mut total = tree
        .get(&key)?
        .as_deref()
        .map_or_else(Delta::default, decode);
    total.add(delta);
    if total.items <= 0 && total.logical <= 0 && total.stored <= 0 {
        tree.remove(key)?;
    } else {
        tree.insert(key, &encode(total)[..])?;
    }
    Ok(())
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
pub(super) fn account(
    tx: &LoggedTx<'_>,
    data_trees: usize,
    quotas: &Quotas,
) -> ConflictableTransactionResult<bool, Error> {
    // A move between packs changes where bytes are, not how many; and a
    // moved entry of a garbage generation must not bring its counter back.
    if tx.relocating() {
        return Ok(false);
    }
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
                let len =
                    |v: &Option<IVec>| v.as_ref().map_or(0, |v| i128::from(spill::logical_len(v)));
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
    // Per namespace: (every group, records only).
    let mut namespaces: BTreeMap<Vec<u8>, (Delta, Delta)> = BTreeMap::new();
    let mut server = Delta::default();
    for (key, delta) in counters {
        if delta.is_zero() {
            continue;
        }
        if let Some((ns, rest)) = keys::take_part(&key) {
            let sums = namespaces.entry(ns).or_default();
            sums.0.add(delta);
            if !is_evictable_group(rest) {
                sums.1.add(delta);
            }
            server.add(delta);
        }
        add_to(&usage, key, delta)?;
    }
    // Totals are summed from the committed rows only when a limit needs
    // them: keeping them as counters of their own would cost every write
    // two more reads and writes.
    let mut past_quota = false;
    for (ns, (delta, records_delta)) in namespaces {
        let name = String::from_utf8_lossy(&ns);
        let Some(quota) = quotas.namespace(&name).filter(|_| delta.logical > 0) else {
            continue;
        };
        let (before, records) = committed_split(usage.committed(), &keys::key(&[&ns]))
            .map_err(UnabortableTransactionError::Storage)?;
        let after = before.logical + delta.logical;
        let refusal = match quota.on_full {
            OnFull::Reject => (after > i128::from(quota.max_bytes))
                .then(|| over_quota(&name, quota.max_bytes, before.logical, delta.logical)),
            OnFull::Evict => {
                // What eviction can never free: the records, and a new
                // evictable value's own bytes.
                let kept = records
                    + records_delta.logical
                    + (delta.logical - records_delta.logical).max(0);
                if kept > i128::from(quota.max_bytes) {
                    Some(records_fill_quota(
                        &name,
                        quota.max_bytes,
                        records,
                        delta.logical,
                    ))
                } else if before.logical > i128::from(quota.max_bytes)
                    && after > i128::from(quota.ceiling())
                {
                    Some(eviction_behind(&name, quota, before.logical, delta.logical))
                } else {
                    past_quota |= after > i128::from(quota.max_bytes);
                    None
                }
            }
        };
        if let Some(refusal) = refusal {
            return Err(ConflictableTransactionError::Abort(refusal));
        }
    }
    if let Some(max) = quotas.max_disk_bytes.filter(|_| server.stored > 0) {
        let before = committed_total(usage.committed(), &[])
            .map_err(UnabortableTransactionError::Storage)?;
        let total = before.stored + server.stored;
        if total > i128::from(max) {
            return Err(ConflictableTransactionError::Abort(Error::exhausted(
                "max_disk_bytes",
                format!(
                    "storing {} more bytes would bring the server to {total} stored bytes, over \
                     its max_disk_bytes of {max}; delete something or raise the limit",
                    server.stored
                ),
            )));
        }
    }
    Ok(past_quota)
}

/// True for the counter key rest (after the namespace) of a group whose
/// values eviction may remove.
fn is_evictable_group(rest: &[u8]) -> bool {
    keys::take_part(rest)
        .is_some_and(|(group, _)| group == OBJECTS.as_bytes() || group == CACHE.as_bytes())
}

/// The committed totals under `prefix`: every group, and records only
/// (groups eviction never removes), in logical bytes.
fn committed_split(tree: &sled::Tree, prefix: &[u8]) -> Result<(Delta, i128), sled::Error> {
    let (mut total, mut records) = (Delta::default(), 0i128);
    for item in tree.scan_prefix(prefix) {
        let (key, value) = item?;
        let counted = decode(&value);
        total.add(counted);
        if !is_evictable_group(&key[prefix.len()..]) {
            records += counted.logical;
        }
    }
    Ok((total, records))
}

/// The logical bytes a namespace holds (`ns_key`: its key part).
pub(super) fn namespace_logical(tree: &sled::Tree, ns_key: &[u8]) -> Result<u64, Error> {
    let total = committed_total(tree, ns_key).map_err(sled_error)?;
    Ok(u64::try_from(total.logical.max(0)).unwrap_or(u64::MAX))
}

impl UsageTrees {
    /// Opens the counter trees.
    pub(super) fn open(db: &sled::Db, root: &std::path::Path, floor: u64) -> Result<Self, Error> {
        Ok(UsageTrees {
            usage: db.open_tree(USAGE).map_err(sled_error)?,
            entry_usage: db.open_tree(ENTRY_USAGE).map_err(sled_error)?,
            free: std::sync::Arc::new(crate::engine::quota::FreeSpace::new(root, floor)),
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
mod quota_tests;
#[cfg(test)]
pub(super) mod tests;
