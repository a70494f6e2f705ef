//! Counting a store written before the counters existed, once, at open.

use std::collections::BTreeMap;

use trove_proto::Error;

use super::spill;
use super::{
    counter_key, encode, generation_of, generation_value, keys, record_weight, sled_error, Delta,
    UsageTrees, CASSETTES, ENTRIES, FORMAT, MARKER,
};

/// The trees the counters are computed from, for [`UsageTrees::prepare`].
pub(in crate::engine::sled) struct Sources<'a> {
    pub(in crate::engine::sled) objects: &'a sled::Tree,
    pub(in crate::engine::sled) artifacts: &'a sled::Tree,
    pub(in crate::engine::sled) cache_refs: &'a sled::Tree,
    pub(in crate::engine::sled) cassettes: &'a sled::Tree,
    pub(in crate::engine::sled) entries: &'a sled::Tree,
}

impl UsageTrees {
    /// Makes the counters cover the whole store: a store written before
    /// they existed is counted once by a scan; afterwards every write keeps
    /// them exact.
    /// Blocking.
    pub(in crate::engine::sled) fn prepare(&self, from: &Sources<'_>) -> Result<(), Error> {
        if self.ready()? {
            return Ok(());
        }
        // Whatever an earlier format left is counted again from scratch.
        self.usage.clear().map_err(sled_error)?;
        self.entry_usage.clear().map_err(sled_error)?;
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
                let len = i128::from(spill::logical_len(&value));
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
