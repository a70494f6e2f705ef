//! Indexing the evictable values of a store written before the eviction
//! index existed: in the background, in batches, each a logged write.

use sled::transaction::UnabortableTransactionError;
use trove_proto::Error;

use super::super::{record, schema, sled_error, SledStore};
use super::{classify, index_trees, relink, BATCH, FORMAT, MARKER, SOURCE_CACHE, SOURCE_OBJECT};

impl SledStore {
    /// Indexes the evictable values of a store written before the index
    /// existed (each at its last write), then sets the marker. Values
    /// written meanwhile index themselves. Blocking.
    pub(super) fn backfill_index(&self) -> Result<(), Error> {
        if self.inner.eviction.indexed()? {
            return Ok(());
        }
        let sources = [
            (SOURCE_OBJECT, self.inner.objects.clone()),
            (SOURCE_CACHE, self.inner.cache.ref_time.clone()),
        ];
        let mut indexed = 0u64;
        for (source, tree) in sources {
            let mut batch: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut items = tree.iter();
            loop {
                let next = items.next().transpose().map_err(sled_error)?;
                if let Some((key, value)) = &next {
                    if classify(source, key).is_some() {
                        let stamp = match source {
                            SOURCE_OBJECT => record::decode(value).map_or(0, |r| r.updated_at),
                            _ => schema::decode_time(value).map_or(0, |(at, _)| at),
                        };
                        let mut source_key = vec![source];
                        source_key.extend_from_slice(key);
                        batch.push((source_key, u64::try_from(stamp).unwrap_or(0)));
                    }
                }
                if batch.len() >= BATCH || (next.is_none() && !batch.is_empty()) {
                    indexed += self.index_missing(&tree, &batch)?;
                    batch.clear();
                }
                if next.is_none() {
                    break;
                }
            }
        }
        self.write_quiet(&[], |tx| {
            index_trees(tx, 0).1.insert(MARKER, FORMAT)?;
            Ok(())
        })?;
        if indexed > 0 {
            tracing::info!(indexed, "indexed the evictable values of an older store");
        }
        Ok(())
    }

    /// Adds index entries for the values of `batch` that still exist and
    /// are not indexed yet; returns how many it added.
    fn index_missing(&self, tree: &sled::Tree, batch: &[(Vec<u8>, u64)]) -> Result<u64, Error> {
        self.write_quiet(&[], |tx| {
            let (lru, lru_at) = index_trees(tx, 0);
            let mut added = 0u64;
            for (source_key, stamp) in batch {
                // Writes are serialised by the log: what sled holds now is
                // what every earlier write left.
                let exists = tree
                    .contains_key(&source_key[1..])
                    .map_err(UnabortableTransactionError::Storage)?;
                if exists && lru_at.get(source_key)?.is_none() {
                    relink(&lru, &lru_at, source_key, true, *stamp)?;
                    added += 1;
                }
            }
            Ok(added)
        })
    }
}
