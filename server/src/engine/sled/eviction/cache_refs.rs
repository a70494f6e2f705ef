//! Evicting cache refs: a ref goes with all its suites and the tree
//! pointers to it; a pull-request tier left empty loses its branch map.

use std::collections::HashSet;

use trove_proto::Error;

use super::super::schema::{decode_time, with_parts, TIER_PR};
use super::super::{keys, sled_error, SledStore};

impl SledStore {
    /// Evicts the given refs of `tier` (each with the eviction index entry
    /// it was chosen by, which must still be there), the tree
    /// pointers to them and, when a pull-request tier is left empty, its
    /// branch map; returns the refs removed and the blobs to retire.
    /// Blocking.
    pub(super) fn evict_refs(
        &self,
        tier: &[u8],
        refs: &[(String, Vec<u8>)],
    ) -> Result<(Vec<String>, Vec<u64>), Error> {
        let cache = &self.inner.cache;
        // Read before the refs go: a map written after this point is a
        // concurrent WriteBranchRefs, which must survive.
        let map_key = branch_map_key(tier);
        let seen_map = match &map_key {
            Some(key) => cache.branch_refs.get(key).map_err(sled_error)?,
            None => None,
        };
        let (mut removed, mut blobs) = (Vec::new(), Vec::new());
        for (reference, index_key) in refs {
            let ref_key = with_parts(tier, &[reference.as_bytes()]);
            let Some(expected) = cache
                .ref_time
                .get(&ref_key)
                .map_err(sled_error)?
                .and_then(|t| decode_time(&t))
            else {
                continue;
            };
            if let Some(ids) = self.remove_ref(tier, reference, expected, Some(index_key))? {
                removed.push(reference.clone());
                blobs.extend(ids);
            }
        }
        if !removed.is_empty() {
            let gone: HashSet<&str> = removed.iter().map(String::as_str).collect();
            self.remove_dangling_pointers(tier, |target| gone.contains(target))?;
            if let Some(map_key) = map_key {
                if cache.recency.scan_prefix(tier).next().is_none() {
                    self.remove_map_if_unchanged(&map_key, seen_map)?;
                }
            }
        }
        Ok((removed, blobs))
    }
}

/// The branch map key of a pull-request tier (`namespace, prefix, branch`);
/// `None` for a main tier.
fn branch_map_key(tier: &[u8]) -> Option<Vec<u8>> {
    let (_, rest) = keys::take_part(tier)?;
    let (_, rest) = keys::take_part(rest)?;
    let (&kind, after_kind) = rest.split_first()?;
    if kind != TIER_PR {
        return None;
    }
    let (branch, _) = keys::take_part(after_kind)?;
    Some(with_parts(&tier[..tier.len() - rest.len()], &[&branch]))
}
