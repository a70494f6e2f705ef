//! [`CacheStore`] on sled: the branch-tiered remote test cache.
//!
//! A tier is `(namespace, prefix, main)` or `(namespace, prefix, pr, branch)`;
//! every key below starts with the tier's encoding, so tiers (and branches
//! named `main`, `a/b` or anything else) never overlap.
//! - `cache_refs`: `tier, ref, suite` -> value record (archive inline or in a blob file).
//! - `cache_ref_time`: `tier, ref` -> `[uploaded_at i64][seq u64]` of the ref's last upload.
//! - `cache_recency`: `tier, uploaded_at, seq, ref` -> empty: refs by recency, for
//!   retention and listing without scanning archives.
//! - `cache_trees`: `tier, tree_sha` -> ref.
//! - `cache_branch_refs`: `namespace, prefix, branch` -> JSON map sha -> epoch seconds
//!   (from 8 KiB on, a pointer to it in a value pack; see `packs::spill`).
//!
//! Uploads commit all of this in one transaction. Retention removes one ref
//! per transaction (never one lock over thousands), and skips a ref that was
//! re-uploaded after it was chosen, so a prune never deletes a fresh archive.
//!
//! Never imports tonic; never awaits inside a logged write.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use trove_proto::cache::{
    check_optional, BranchRefsKey, BranchRefsWrite, CacheScope, CachedRef, PruneOptions, Tier,
    UploadOptions,
};
use trove_proto::types::{now_micros, ByteStream, Name, Namespace, Page};
use trove_proto::{CacheStore, Error};

use super::packs::spill::{self, spill_len};
use super::schema::{self, *};
use super::{blocking, keys, sled_error, Committed, SledStore};
use crate::engine::record::{self, ValueRecord};
use crate::engine::retention::{self, PrunePlan};
use crate::engine::values::{
    branch_refs_to_json, check_download_ref, describe_archive, parse_branch_refs,
};

/// The sled trees of the cache group.
pub struct CacheTrees {
    pub(super) refs: sled::Tree,
    pub(super) ref_time: sled::Tree,
    pub(super) recency: sled::Tree,
    trees: sled::Tree,
    pub(super) branch_refs: sled::Tree,
}

impl CacheTrees {
    /// Opens the trees.
    pub fn open(db: &sled::Db) -> Result<Arc<Self>, Error> {
        let tree = |name: &str| db.open_tree(name).map_err(sled_error);
        Ok(Arc::new(CacheTrees {
            refs: tree(schema::CACHE_REFS)?,
            ref_time: tree(schema::CACHE_REF_TIME)?,
            recency: tree(schema::CACHE_RECENCY)?,
            trees: tree(schema::CACHE_TREES)?,
            branch_refs: tree(schema::CACHE_BRANCH_REFS)?,
        }))
    }
}

fn cached_ref(tier: &TierKey, reference: &str, suite: &str, record: &ValueRecord) -> CachedRef {
    describe_archive(tier.tier, &tier.branch, reference, suite, record)
}

impl SledStore {
    /// Removes one ref (all its suites) from `tier` if its last upload is
    /// still `expected`; returns the blob ids it referenced, or `None` when it
    /// changed meanwhile (or was already gone). For eviction, `chosen` is
    /// the eviction index entry it was chosen by: a use or an upload since
    /// then moved it, and the ref stays. Blocking.
    pub(super) fn remove_ref(
        &self,
        tier: &[u8],
        reference: &str,
        expected: (i64, u64),
        chosen: Option<&[u8]>,
    ) -> Result<Option<Vec<u64>>, Error> {
        use sled::transaction::ConflictableTransactionError;
        let cache = &self.inner.cache;
        let ref_key = with_parts(tier, &[reference.as_bytes()]);
        let suites: Vec<sled::IVec> = cache
            .refs
            .scan_prefix(&ref_key)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(sled_error)?;
        let trees = [
            &cache.refs,
            &self.inner.blob_refs,
            &cache.ref_time,
            &cache.recency,
        ];
        let body = |tx: &super::wal::LoggedTx<'_>| {
            let (refs, blob_refs, ref_time, recency) =
                (tx.tree(0), tx.tree(1), tx.tree(2), tx.tree(3));
            if let Some(index_key) = chosen {
                let (lru, _) = super::eviction::index_trees(tx, trees.len());
                if lru.get(index_key)?.is_none() {
                    return Ok(None);
                }
            }
            let current = ref_time.get(&ref_key)?.and_then(|t| decode_time(&t));
            if current != Some(expected) {
                return Ok(None);
            }
            ref_time.remove(ref_key.as_slice())?;
            recency.remove(recency_key(
                tier,
                expected.0,
                expected.1,
                reference.as_bytes(),
            ))?;
            let mut blobs = Vec::new();
            for suite_key in &suites {
                if let Some(bytes) = refs.remove(suite_key)? {
                    let old =
                        record::decode(&bytes).map_err(ConflictableTransactionError::Abort)?;
                    let freed = super::packs::refs::swap(&blob_refs, suite_key, Some(&old), None)?;
                    self.inner.packs.note_freed(freed);
                    blobs.extend(old.blob_id());
                }
            }
            Ok(Some(blobs))
        };
        match chosen {
            Some(_) => self.write_quiet(&trees, body),
            None => self.write(&trees, body),
        }
    }

    /// Refs of `tier`, oldest first: `(uploaded_at, seq, ref)`. Blocking.
    fn refs_by_age(&self, tier: &[u8]) -> Result<Vec<(i64, u64, String)>, Error> {
        let mut out = Vec::new();
        for item in self.inner.cache.recency.scan_prefix(tier).keys() {
            let key = item.map_err(sled_error)?;
            if let Some(parsed) = parse_recency(&key[tier.len()..]) {
                out.push(parsed);
            }
        }
        Ok(out)
    }

    /// Removes the given refs of `tier` and the tree pointers to them;
    /// returns how many refs were removed and the blobs to retire. Blocking.
    fn remove_refs(
        &self,
        tier: &[u8],
        doomed: &[(i64, u64, String)],
    ) -> Result<(u64, Vec<u64>), Error> {
        let mut removed = 0u64;
        let mut blobs = Vec::new();
        let mut gone = HashSet::new();
        for (ts, seq, reference) in doomed {
            if let Some(ids) = self.remove_ref(tier, reference, (*ts, *seq), None)? {
                removed += 1;
                blobs.extend(ids);
                gone.insert(reference.clone());
            }
        }
        if !gone.is_empty() {
            self.remove_dangling_pointers(tier, |target| gone.contains(target))?;
        }
        Ok((removed, blobs))
    }

    /// Removes the tree pointers of `tier` whose target `is_candidate` and no
    /// longer exists, each in a transaction that re-checks both, so a pointer
    /// rewritten by a concurrent upload is never removed. Blocking.
    pub(super) fn remove_dangling_pointers(
        &self,
        tier: &[u8],
        is_candidate: impl Fn(&str) -> bool,
    ) -> Result<(), Error> {
        let cache = &self.inner.cache;
        for item in cache.trees.scan_prefix(tier) {
            let (key, target) = item.map_err(sled_error)?;
            let target_name = String::from_utf8_lossy(&target).into_owned();
            if !is_candidate(&target_name) {
                continue;
            }
            let ref_key = with_parts(tier, &[target.as_ref()]);
            self.write(&[&cache.trees, &cache.ref_time], |tx| {
                let (pointers, ref_time) = (tx.tree(0), tx.tree(1));
                if pointers.get(&key)?.as_deref() == Some(target.as_ref())
                    && ref_time.get(&ref_key)?.is_none()
                {
                    pointers.remove(&key)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Removes a whole PR branch: its refs, tree pointers and ref map. Blocking.
    fn remove_branch(
        &self,
        ns: &Namespace,
        prefix: &str,
        tier: &TierKey,
    ) -> Result<(u64, Vec<u64>), Error> {
        let cache = &self.inner.cache;
        let map_key = with_parts(&scope_prefix(ns, prefix), &[tier.branch.as_bytes()]);
        // Read before the refs go: a map written after this point is a
        // concurrent WriteBranchRefs, which must survive.
        let seen_map = cache.branch_refs.get(&map_key).map_err(sled_error)?;
        let refs = self.refs_by_age(&tier.key)?;
        let (removed, blobs) = self.remove_refs(&tier.key, &refs)?;
        if cache.recency.scan_prefix(&tier.key).next().is_none() {
            // A pointer goes only if its ref is still gone: an upload that
            // lands meanwhile writes both in one transaction.
            self.remove_dangling_pointers(&tier.key, |_| true)?;
            self.remove_map_if_unchanged(&map_key, seen_map)?;
        }
        Ok((removed, blobs))
    }

    /// Removes the branch map at `map_key` only if it still holds `seen`
    /// (one atomic compare-and-swap), so a map written concurrently stays.
    /// Blocking.
    pub(super) fn remove_map_if_unchanged(
        &self,
        map_key: &[u8],
        seen: Option<sled::IVec>,
    ) -> Result<(), Error> {
        let Some(seen) = seen else {
            return Ok(());
        };
        let swapped = self.write(&[&self.inner.cache.branch_refs], |tx| {
            let (maps, current) = (tx.tree(0), tx.tree(0).get(map_key)?);
            // A map compaction moved meanwhile is still the one seen.
            if !current.is_some_and(|m| spill::same_value(&m, &seen)) {
                return Ok(None);
            }
            Ok(Some(spill_len(maps.remove(map_key)?)))
        })?;
        if let Some(freed) = swapped {
            self.inner.packs.note_freed(freed);
        } else {
            tracing::debug!("a branch map changed while its branch was pruned; kept");
        }
        Ok(())
    }
}

#[async_trait]
impl CacheStore for SledStore {
    async fn upload(
        &self,
        scope: &CacheScope,
        reference: &Name,
        options: UploadOptions,
        data: ByteStream,
    ) -> Result<CachedRef, Error> {
        let tier = own_tier(scope);
        let ref_key = with_parts(&tier.key, &[reference.as_bytes()]);
        let archive_key = with_parts(&ref_key, &[scope.test_suite_id.as_bytes()]);
        let at = (
            &scope.namespace,
            &self.inner.cache.refs,
            archive_key.as_slice(),
        );
        let staged = self.stage(at, data, options.expected_size).await?;
        let seq = self.next_id()?;
        let uploaded_at = options.uploaded_at.unwrap_or_else(now_micros);
        let tree_key = options
            .tree_sha
            .as_ref()
            .map(|tree| with_parts(&tier.key, &[tree.as_bytes()]));
        let (size, sha256) = (staged.len, staged.sha256);
        let reference = reference.as_str().to_owned();
        let suite = scope.test_suite_id.clone();
        let store = self.clone();
        self.publish_with(staged, move |body| {
            use sled::transaction::ConflictableTransactionError;
            let cache = &store.inner.cache;
            let trees = [
                &cache.refs,
                &store.inner.blob_refs,
                &cache.ref_time,
                &cache.recency,
                &cache.trees,
            ];
            let result = store.write(&trees, |tx| {
                let (refs, blob_refs, ref_time, recency, pointers) =
                    (tx.tree(0), tx.tree(1), tx.tree(2), tx.tree(3), tx.tree(4));
                let old = match refs.get(&archive_key)? {
                    Some(bytes) => {
                        Some(record::decode(&bytes).map_err(ConflictableTransactionError::Abort)?)
                    }
                    None => None,
                };
                let mut new = ValueRecord {
                    seq,
                    ..ValueRecord::replacing(old.as_ref(), uploaded_at, size, size, sha256, body)
                };
                super::packs::refs::pack_body(tx, &mut new);
                refs.insert(
                    archive_key.as_slice(),
                    record::encode(&new).map_err(ConflictableTransactionError::Abort)?,
                )?;
                let old_blob = old.as_ref().and_then(ValueRecord::blob_id);
                let freed =
                    super::packs::refs::swap(&blob_refs, &archive_key, old.as_ref(), Some(&new))?;
                store.inner.packs.note_freed(freed);
                if let Some((ts, old_seq)) = ref_time.get(&ref_key)?.and_then(|t| decode_time(&t)) {
                    recency.remove(recency_key(&tier.key, ts, old_seq, reference.as_bytes()))?;
                }
                ref_time.insert(ref_key.as_slice(), &encode_time(uploaded_at, seq)[..])?;
                recency.insert(
                    recency_key(&tier.key, uploaded_at, seq, reference.as_bytes()),
                    &[][..],
                )?;
                if let Some(tree_key) = &tree_key {
                    pointers.insert(tree_key.as_slice(), reference.as_bytes())?;
                }
                Ok((old_blob, new))
            });
            let (old_blob, new) = result?;
            Ok(Committed {
                value: cached_ref(&tier, &reference, &suite, &new),
                keep_blob: true,
                retired: old_blob.into_iter().collect(),
            })
        })
        .await
    }

    async fn download(
        &self,
        scope: &CacheScope,
        reference: &str,
        tree_sha: Option<&Name>,
    ) -> Result<Option<(CachedRef, ByteStream)>, Error> {
        let ticket = self.ticket();
        check_download_ref(reference)?;
        let tiers: Vec<_> = scope
            .download_tiers()
            .into_iter()
            .map(|branch| tier_key(&scope.namespace, &scope.prefix, branch))
            .collect();
        let cache = &self.inner.cache;
        let mut candidates: Vec<(&TierKey, String)> = Vec::new();
        if let Some(tree) = tree_sha {
            for tier in &tiers {
                let pointer = cache
                    .trees
                    .get(with_parts(&tier.key, &[tree.as_bytes()]))
                    .map_err(sled_error)?;
                if let Some(target) = pointer {
                    candidates.push((tier, String::from_utf8_lossy(&target).into_owned()));
                }
            }
        }
        if !reference.is_empty() {
            for tier in &tiers {
                candidates.push((tier, reference.to_owned()));
            }
        }
        for (tier, target) in candidates {
            let key = with_parts(
                &tier.key,
                &[target.as_bytes(), scope.test_suite_id.as_bytes()],
            );
            match self
                .open_value(&cache.refs, &key, "cache archive", &target)
                .await
            {
                Ok((record, reader)) => {
                    let ref_key = with_parts(&tier.key, &[target.as_bytes()]);
                    self.note_cache_use(scope.namespace.as_str(), &ref_key);
                    let found = cached_ref(tier, &target, &scope.test_suite_id, &record);
                    let what = format!("cache archive {}", trove_proto::error::shorten(&target));
                    return Ok(Some((found, self.byte_stream(reader, what))));
                }
                Err(Error::NotFound { .. }) => continue,
                Err(err) => return Err(err),
            }
        }
        self.visible(ticket).await?;
        Ok(None)
    }

    async fn branch_refs(&self, key: &BranchRefsKey) -> Result<BTreeMap<String, i64>, Error> {
        let ticket = self.ticket();
        let Some(branch) = &key.branch else {
            return Ok(BTreeMap::new());
        };
        let tree_key = with_parts(
            &scope_prefix(&key.namespace, &key.prefix),
            &[branch.as_bytes()],
        );
        let (store, name) = (self.clone(), format!("{}/{branch}", key.namespace.as_str()));
        let found = blocking(move || {
            let (packs, maps) = (&store.inner.packs, &store.inner.cache.branch_refs);
            spill::get(packs, maps, &tree_key, "branch map", &name)
        })
        .await?;
        self.visible(ticket).await?;
        match found {
            Some(bytes) => parse_branch_refs(&bytes),
            None => Ok(BTreeMap::new()),
        }
    }

    async fn write_branch_refs(&self, write: &BranchRefsWrite) -> Result<bool, Error> {
        let ticket = self.ticket();
        let Some((branch, refs)) = &write.target else {
            return Ok(false);
        };
        let tree_key = with_parts(
            &scope_prefix(&write.namespace, &write.prefix),
            &[branch.as_bytes()],
        );
        let map = branch_refs_to_json(refs)?;
        let freed = self.write(&[&self.inner.cache.branch_refs], |tx| {
            let map = spill::store(tx, &map);
            Ok(spill_len(tx.tree(0).insert(tree_key.as_slice(), map)?))
        })?;
        self.inner.packs.note_freed(freed);
        self.durable(ticket).await?;
        Ok(true)
    }

    async fn prune(&self, scope: &CacheScope, options: PruneOptions) -> Result<u64, Error> {
        let ticket = self.ticket();
        let tier = own_tier(scope);
        let is_pr = tier.tier == Tier::Pr;
        if !retention::has_work(&options, is_pr) {
            return Ok(0);
        }
        let store = self.clone();
        let ns = scope.namespace.clone();
        let prefix = scope.prefix.clone();
        let (removed, blobs) = blocking(move || {
            let refs = store.refs_by_age(&tier.key)?;
            let uploaded_at: Vec<i64> = refs.iter().map(|entry| entry.0).collect();
            let doomed: Vec<_> = match retention::plan(&uploaded_at, is_pr, &options, now_micros())
            {
                PrunePlan::WholeBranch => return store.remove_branch(&ns, &prefix, &tier),
                PrunePlan::Refs(doomed) => doomed.into_iter().map(|i| refs[i].clone()).collect(),
            };
            store.remove_refs(&tier.key, &doomed)
        })
        .await?;
        self.durable(ticket).await?;
        self.retire_blobs(blobs, ticket);
        Ok(removed)
    }

    async fn prune_all(
        &self,
        ns: &Namespace,
        prefix: &str,
        pr_branch_ttl_seconds: i64,
    ) -> Result<u64, Error> {
        let ticket = self.ticket();
        check_optional("prefix", prefix)?;
        if pr_branch_ttl_seconds <= 0 {
            return Ok(0);
        }
        let store = self.clone();
        let ns = ns.clone();
        let prefix = prefix.to_owned();
        let (removed, blobs) = blocking(move || {
            let now = now_micros();
            let mut base = scope_prefix(&ns, &prefix);
            base.push(TIER_PR);
            let end = keys::prefix_end(&base);
            let recency = &store.inner.cache.recency;
            let mut cursor = base.clone();
            let (mut removed, mut blobs) = (0u64, Vec::new());
            loop {
                let next = match &end {
                    Some(end) => recency.range(cursor.clone()..end.clone()).keys().next(),
                    None => recency.range(cursor.clone()..).keys().next(),
                };
                let Some(key) = next.transpose().map_err(sled_error)? else {
                    break;
                };
                let Some((branch, _)) = keys::take_part(&key[base.len()..]) else {
                    break;
                };
                let branch = String::from_utf8_lossy(&branch).into_owned();
                let tier = tier_key(&ns, &prefix, Some(&branch));
                let newest = recency
                    .scan_prefix(&tier.key)
                    .keys()
                    .next_back()
                    .transpose()
                    .map_err(sled_error)?
                    .and_then(|k| parse_recency(&k[tier.key.len()..]));
                if retention::branch_expired(
                    newest.map(|(ts, _, _)| ts),
                    pr_branch_ttl_seconds,
                    now,
                ) {
                    let (n, ids) = store.remove_branch(&ns, &prefix, &tier)?;
                    removed += n;
                    blobs.extend(ids);
                }
                match keys::prefix_end(&tier.key) {
                    Some(after) => cursor = after,
                    None => break,
                }
            }
            Ok((removed, blobs))
        })
        .await?;
        self.durable(ticket).await?;
        self.retire_blobs(blobs, ticket);
        Ok(removed)
    }

    async fn list_refs(
        &self,
        scope: &CacheScope,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page<CachedRef>, Error> {
        let ticket = self.ticket();
        let tier = own_tier(scope);
        let limit = trove_proto::types::clamp_page_size(page_size) as usize;
        let bad_token = || {
            Error::invalid(
                "page_token",
                format!(
                    "{} is not a token returned by ListRefs",
                    trove_proto::error::shorten(page_token)
                ),
            )
        };
        let before = if page_token.is_empty() {
            None
        } else {
            let body = page_token.strip_prefix("r1.").ok_or_else(bad_token)?;
            let suffix = hex::decode(body).map_err(|_| bad_token())?;
            parse_recency(&suffix).ok_or_else(bad_token)?;
            let mut key = tier.key.clone();
            key.extend_from_slice(&suffix);
            Some(key)
        };
        let store = self.clone();
        let page = blocking(move || {
            let cache = &store.inner.cache;
            let range = match before {
                Some(before) => cache.recency.range(tier.key.clone()..before),
                None => cache.recency.scan_prefix(&tier.key),
            };
            let mut items = Vec::new();
            let mut refs_listed = 0usize;
            let mut last_suffix: Option<Vec<u8>> = None;
            let mut more = false;
            for key in range.keys().rev() {
                let key = key.map_err(sled_error)?;
                let suffix = &key[tier.key.len()..];
                let Some((_, _, reference)) = parse_recency(suffix) else {
                    continue;
                };
                if refs_listed == limit {
                    more = true;
                    break;
                }
                let ref_key = with_parts(&tier.key, &[reference.as_bytes()]);
                for item in cache.refs.scan_prefix(&ref_key) {
                    let (archive_key, value) = item.map_err(sled_error)?;
                    let Some((suite, _)) = keys::take_part(&archive_key[ref_key.len()..]) else {
                        continue;
                    };
                    let suite = String::from_utf8_lossy(&suite).into_owned();
                    items.push(cached_ref(
                        &tier,
                        &reference,
                        &suite,
                        &record::decode(&value)?,
                    ));
                }
                refs_listed += 1;
                last_suffix = Some(suffix.to_vec());
            }
            let next_page_token = if more {
                last_suffix.map(|s| format!("r1.{}", hex::encode(s)))
            } else {
                None
            };
            Ok(Page {
                items,
                next_page_token,
            })
        })
        .await?;
        self.visible(ticket).await?;
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            SledStore::open(dir.path(), super::super::StoreOptions::default()).expect("open");
        (dir, store)
    }

    /// Branch pruning removes a tree pointer only when its ref is gone: a
    /// pointer an upload wrote (with its ref, in one transaction) survives.
    #[tokio::test]
    async fn pruning_keeps_a_pointer_whose_ref_exists() {
        let (_dir, store) = store();
        let scope = CacheScope {
            namespace: Namespace::default(),
            prefix: String::new(),
            branch: Name::new("branch", "feature").expect("branch"),
            default_branch: Name::new("branch", "main").expect("branch"),
            test_suite_id: String::new(),
        };
        let tree = Name::new("tree_sha", "t1").expect("tree");
        let data = futures::stream::iter([Ok(bytes::Bytes::from_static(b"archive"))]).boxed();
        let options = UploadOptions {
            tree_sha: Some(tree.clone()),
            ..Default::default()
        };
        let reference = Name::new("reference", "r1").expect("ref");
        store
            .upload(&scope, &reference, options, data)
            .await
            .expect("upload");
        let tier = own_tier(&scope);
        store
            .remove_dangling_pointers(&tier.key, |_| true)
            .expect("sweep");
        let found = store
            .download(&scope, "unknown-ref", Some(&tree))
            .await
            .expect("download");
        assert!(found.is_some(), "the pointer to a live ref was removed");
    }

    /// The branch map is removed only if it is still the one read before the
    /// prune: a map written meanwhile (WriteBranchRefs) stays.
    #[test]
    fn pruning_keeps_a_map_written_meanwhile() {
        let (_dir, store) = store();
        let maps = &store.inner.cache.branch_refs;
        maps.insert(b"map", &b"old"[..]).expect("insert");
        let seen = maps.get(b"map").expect("get");
        maps.insert(b"map", &b"new"[..]).expect("concurrent write");
        store.remove_map_if_unchanged(b"map", seen).expect("remove");
        assert_eq!(maps.get(b"map").expect("get").as_deref(), Some(&b"new"[..]));
        let seen = maps.get(b"map").expect("get");
        store.remove_map_if_unchanged(b"map", seen).expect("remove");
        assert!(maps.get(b"map").expect("get").is_none());
    }
}
