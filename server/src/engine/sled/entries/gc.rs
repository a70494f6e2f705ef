//! Collecting garbage generations: the entries of replaced, deleted or
//! unfinished cassette versions, with what they spilled into packs.

use trove_proto::Error;

use super::{decode_header, EntryTrees, DELETE_BATCH};
use crate::engine::sled::packs::{spill, Packs};
use crate::engine::sled::wal::Wal;
use crate::engine::sled::{keys, sled_error};

impl EntryTrees {
    /// Removes every collectable generation a crash left. Blocking.
    pub fn collect_leftovers(&self, wal: &Wal, packs: &Packs) -> Result<(), Error> {
        let mut collected = 0u64;
        for marker in self.gc.iter() {
            let (gen, _) = marker.map_err(sled_error)?;
            if let Some((gen, _)) = keys::take_u64(&gen) {
                collected += self.collect(wal, packs, gen)?;
            }
        }
        if collected > 0 {
            tracing::info!(
                entries = collected,
                "removed entries of replaced, deleted or unfinished cassette versions"
            );
        }
        Ok(())
    }

    /// Deletes generation `gen` if it is garbage: no header points to it and
    /// no reader holds it. Returns the number of entries removed. Blocking.
    pub(super) fn collect(&self, wal: &Wal, packs: &Packs, gen: u64) -> Result<u64, Error> {
        let Some(cassette_key) = self.gc.get(gen.to_be_bytes()).map_err(sled_error)? else {
            return Ok(0);
        };
        if self.leased(gen) {
            return Ok(0);
        }
        if let Some(header) = self.cassettes.get(&cassette_key).map_err(sled_error)? {
            if decode_header(&header).map(|h| h.0) == Some(gen) {
                // Committed after all (the marker's removal was lost in a crash).
                remove_key(wal, &self.gc, &gen.to_be_bytes())?;
                return Ok(0);
            }
        }
        let removed = remove_prefix(wal, &self.entries, &gen.to_be_bytes(), Some(packs))?;
        // The idempotency keys applied to this generation go with it.
        remove_prefix(wal, &self.append_keys, &gen.to_be_bytes(), None)?;
        // A staged generation that never became current still has a counter.
        remove_key(wal, &self.usage, &gen.to_be_bytes())?;
        remove_key(wal, &self.gc, &gen.to_be_bytes())?;
        Ok(removed)
    }
}

/// Removes every key of `tree` under `prefix`, a batch at a time; returns
/// how many. With `spills`, the values are JSON that may have spilled into
/// those packs, and the bytes they free are noted for compaction. Blocking.
fn remove_prefix(
    wal: &Wal,
    tree: &sled::Tree,
    prefix: &[u8],
    spills: Option<&Packs>,
) -> Result<u64, Error> {
    let mut removed = 0u64;
    loop {
        let doomed: Vec<sled::IVec> = tree
            .scan_prefix(prefix)
            .keys()
            .take(DELETE_BATCH)
            .collect::<Result<_, _>>()
            .map_err(sled_error)?;
        if doomed.is_empty() {
            return Ok(removed);
        }
        let freed = wal.write(&[tree], |tx| {
            let mut freed = 0u64;
            for key in &doomed {
                freed += spill::spill_len(tx.tree(0).remove(key)?);
            }
            Ok(freed)
        })?;
        if let Some(packs) = spills {
            packs.note_freed(freed);
        }
        removed += doomed.len() as u64;
    }
}

/// Removes one key of `tree` as a logged write. Blocking.
fn remove_key(wal: &Wal, tree: &sled::Tree, key: &[u8]) -> Result<(), Error> {
    wal.write(&[tree], |tx| {
        tx.tree(0).remove(key)?;
        Ok(())
    })
}
