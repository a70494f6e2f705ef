//! The eviction index: kept in step with every logged write, and moved
//! by the uses the maintenance task writes.

use sled::IVec;

use super::{TxResult, CLASS_MAIN, CLASS_PR, SOURCE_CACHE, SOURCE_OBJECT};
use crate::engine::sled::wal::{LoggedTree, LoggedTx};
use crate::engine::sled::{keys, schema};

/// Microseconds since the epoch: the stamp of a use.
pub(super) fn now_stamp() -> u64 {
    u64::try_from(trove_proto::types::now_micros()).unwrap_or(0)
}

/// The class and namespace key part of the value under `key` of `source`,
/// or `None` when it is not evictable (a stream, a key this engine did not
/// write).
pub(super) fn classify(source: u8, key: &[u8]) -> Option<(u8, Vec<u8>)> {
    let (ns, rest) = keys::take_part(key)?;
    let (_, rest) = keys::take_part(rest)?;
    let class = match (source, rest.first()) {
        (SOURCE_OBJECT, Some(&schema::KIND_OBJECT)) => CLASS_MAIN,
        (SOURCE_CACHE, Some(&schema::TIER_MAIN)) => CLASS_MAIN,
        (SOURCE_CACHE, Some(&schema::TIER_PR)) => CLASS_PR,
        _ => return None,
    };
    Some((class, keys::key(&[&ns])))
}

pub(super) fn index_key(ns_key: &[u8], class: u8, stamp: u64, source_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(ns_key.len() + 9 + source_key.len());
    key.extend_from_slice(ns_key);
    key.push(class);
    key.extend_from_slice(&stamp.to_be_bytes());
    key.extend_from_slice(source_key);
    key
}

pub(super) fn at_value(class: u8, stamp: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = class;
    out[1..].copy_from_slice(&stamp.to_be_bytes());
    out
}

pub(super) fn parse_at(value: &[u8]) -> Option<(u8, u64)> {
    let (&class, rest) = value.split_first()?;
    Some((class, keys::take_u64(rest)?.0))
}

/// Moves (or adds) the index entry of `source_key` (source byte + key) to
/// `stamp`; removes it when `present` is false.
pub(super) fn relink(
    lru: &LoggedTree<'_>,
    lru_at: &LoggedTree<'_>,
    source_key: &[u8],
    present: bool,
    stamp: u64,
) -> TxResult<()> {
    let Some((&source, key)) = source_key.split_first() else {
        return Ok(());
    };
    let Some((class, ns_key)) = classify(source, key) else {
        return Ok(());
    };
    if let Some((old_class, old_stamp)) = lru_at.get(source_key)?.as_deref().and_then(parse_at) {
        lru.remove(index_key(&ns_key, old_class, old_stamp, source_key))?;
    }
    if present {
        lru.insert(index_key(&ns_key, class, stamp, source_key), &[][..])?;
        lru_at.insert(source_key, &at_value(class, stamp)[..])?;
    } else {
        lru_at.remove(source_key)?;
    }
    Ok(())
}

/// The eviction index trees (`lru`, `lru_at`) of a write over `data_trees`
/// trees: `SledStore::write` puts them after the data and counter trees.
pub(crate) fn index_trees<'t>(
    tx: &'t LoggedTx<'_>,
    data_trees: usize,
) -> (LoggedTree<'t>, LoggedTree<'t>) {
    (tx.tree(data_trees + 2), tx.tree(data_trees + 3))
}

/// Keeps the index in step with what the write in `tx` changed in its first
/// `data_trees` trees: a value written counts as used now, a value removed
/// leaves the index. The index trees are `data_trees + 2` and `+ 3`.
pub(crate) fn track(tx: &LoggedTx<'_>, data_trees: usize) -> TxResult<()> {
    // Moving a value between packs is not a use.
    if tx.relocating() {
        return Ok(());
    }
    let (lru, lru_at) = index_trees(tx, data_trees);
    let mut stamp = None;
    for index in 0..data_trees {
        let name = tx.tree_name(index);
        let source = if *name == *schema::OBJECTS.as_bytes() {
            SOURCE_OBJECT
        } else if *name == *schema::CACHE_REF_TIME.as_bytes() {
            SOURCE_CACHE
        } else {
            continue;
        };
        let changed: Vec<(IVec, bool)> = tx
            .changes(index)
            .iter()
            .map(|(key, change)| (key.clone(), change.after.is_some()))
            .collect();
        for (key, present) in changed {
            let stamp = *stamp.get_or_insert_with(now_stamp);
            let mut source_key = Vec::with_capacity(key.len() + 1);
            source_key.push(source);
            source_key.extend_from_slice(&key);
            relink(&lru, &lru_at, &source_key, present, stamp)?;
        }
    }
    Ok(())
}
