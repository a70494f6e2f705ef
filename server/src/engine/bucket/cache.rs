//! [`CacheStore`] on the bucket engine.
//!
//! Under `n/{ns}/k/{prefix}!p/`:
//! - `m/` is the main tier and `b/{branch}!b/` a PR branch's tier; in a tier,
//!   `r/{ref}!c` is a ref record (every suite's archive of the ref, and the
//!   ref's last upload time) and `t/{tree}!t` a tree pointer holding a ref.
//! - `br/{branch}!m` is a branch's ref map (JSON).
//!
//! A ref record is replaced with conditional writes, so concurrent uploads
//! of one ref leave the last one whole. Retention first swaps a record for
//! an empty one (a tombstone) on the version it judged, so a ref uploaded
//! again meanwhile is skipped, and then deletes the tombstone.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::UpdateVersion;
use trove_proto::cache::{
    check_optional, BranchRefsKey, BranchRefsWrite, CacheScope, CachedRef, PruneOptions, Tier,
    UploadOptions,
};
use trove_proto::types::{now_micros, ByteStream, Name, Namespace, Page};
use trove_proto::{CacheStore, Error};

use super::formats::*;
use super::layout::{self, *};
use super::names::NameQuery;
use super::{Backoff, BucketStore, Expect, Written};
use crate::engine::record::ValueRecord;
use crate::engine::retention::{self, PrunePlan};
use crate::engine::values::{
    branch_refs_to_json, check_download_ref, describe_archive, parse_branch_refs,
};

/// Ref records read at once.
const PARALLEL_READS: usize = 32;

fn cached_ref(tier: &TierDir, reference: &str, suite: &str, record: &ValueRecord) -> CachedRef {
    describe_archive(tier.tier, &tier.branch, reference, suite, record)
}

/// A ref as found in a tier.
struct FoundRef {
    reference: String,
    record: RefRecord,
    version: UpdateVersion,
}

impl BucketStore {
    async fn read_ref(&self, path: &Path) -> Result<Option<(RefRecord, UpdateVersion)>, Error> {
        Ok(match self.read(path).await? {
            Some((bytes, version)) => Some((decode_ref(&bytes)?, version)),
            None => None,
        })
    }

    /// Every live ref of a tier, oldest first.
    async fn refs_by_age(&self, tier: &TierDir) -> Result<Vec<FoundRef>, Error> {
        let query = NameQuery {
            dir: format!("{}r/", tier.dir),
            prefix: String::new(),
            after: None,
        };
        let paths: Vec<(String, Path)> = self
            .list_names(query)
            .try_filter_map(|(reference, kind, meta)| {
                futures::future::ready(Ok((kind == KIND_REF).then_some((reference, meta.location))))
            })
            .try_collect()
            .await?;
        let reads: Vec<_> = paths
            .into_iter()
            .map(|(reference, path)| {
                let store = self.clone();
                async move {
                    Ok::<_, Error>(store.read_ref(&path).await?.and_then(|(record, version)| {
                        (!record.suites.is_empty()).then_some(FoundRef {
                            reference,
                            record,
                            version,
                        })
                    }))
                }
            })
            .collect();
        let mut found: Vec<FoundRef> = futures::stream::iter(reads)
            .buffered(PARALLEL_READS)
            .try_filter_map(|found| futures::future::ready(Ok(found)))
            .try_collect()
            .await?;
        found.sort_by(|a, b| {
            (a.record.uploaded_at, a.record.seq, &a.reference).cmp(&(
                b.record.uploaded_at,
                b.record.seq,
                &b.reference,
            ))
        });
        Ok(found)
    }

    /// Removes one ref if it is still the version judged; returns whether
    /// it was removed.
    async fn remove_ref(&self, tier: &TierDir, found: &FoundRef) -> Result<bool, Error> {
        let path = self.ref_path(tier, &found.reference);
        let blobs: Vec<u64> = found
            .record
            .suites
            .values()
            .filter_map(ValueRecord::blob_id)
            .collect();
        let mut markers = Vec::new();
        for blob in &blobs {
            markers.push(self.mark_retiring(&path, *blob).await?);
        }
        let tombstone = encode_ref(&RefRecord::default())?;
        match self
            .write(&path, tombstone, &Expect::Version(found.version.clone()))
            .await?
        {
            Written::Done(_) => {
                // The tombstone stays: deleting it could race an upload of
                // the same ref (the store offers no conditional delete), and
                // every reader already treats it as absent. The next upload
                // of the ref replaces it.
                self.retire(blobs, markers).await;
                Ok(true)
            }
            Written::Conflict => {
                self.retire(Vec::new(), markers).await;
                Ok(false)
            }
        }
    }

    /// Removes the given refs and the tree pointers to them.
    async fn remove_refs(&self, tier: &TierDir, doomed: &[&FoundRef]) -> Result<u64, Error> {
        // Each removal is a few requests; many run side by side.
        let removals: Vec<_> = doomed
            .iter()
            .map(|found| {
                let (store, tier) = (self.clone(), tier.clone());
                let found = FoundRef {
                    reference: found.reference.clone(),
                    record: found.record.clone(),
                    version: found.version.clone(),
                };
                async move {
                    let removed = store.remove_ref(&tier, &found).await?;
                    Ok::<_, Error>(removed.then_some(found.reference))
                }
            })
            .collect();
        let gone: HashSet<String> = futures::stream::iter(removals)
            .buffer_unordered(PARALLEL_READS)
            .try_filter_map(|gone| futures::future::ready(Ok(gone)))
            .try_collect()
            .await?;
        if !gone.is_empty() {
            self.remove_tree_pointers(tier, |target| gone.contains(target))
                .await?;
        }
        Ok(gone.len() as u64)
    }

    async fn remove_tree_pointers(
        &self,
        tier: &TierDir,
        doomed: impl Fn(&str) -> bool,
    ) -> Result<(), Error> {
        let pointers: Vec<Path> = self
            .list(&format!("{}t/", tier.dir), "", None)
            .map_ok(|(_, meta)| meta.location)
            .try_collect()
            .await?;
        for path in pointers {
            if let Some((target, _)) = self.read(&path).await? {
                let target = String::from_utf8_lossy(&target).into_owned();
                // A ref uploaded again meanwhile keeps its pointers.
                let alive = match self.read_ref(&self.ref_path(tier, &target)).await? {
                    Some((record, _)) => !record.suites.is_empty(),
                    None => false,
                };
                if doomed(&target) && !alive {
                    self.remove(&path).await?;
                }
            }
        }
        Ok(())
    }

    /// Removes a whole PR branch: its refs, pointers and ref map.
    async fn remove_branch(
        &self,
        ns: &Namespace,
        prefix: &str,
        tier: &TierDir,
    ) -> Result<u64, Error> {
        let refs = self.refs_by_age(tier).await?;
        let all: Vec<&FoundRef> = refs.iter().collect();
        let removed = self.remove_refs(tier, &all).await?;
        self.remove_tree_pointers(tier, |_| true).await?;
        // An upload during the prune keeps the branch (and its ref map).
        if self.refs_by_age(tier).await?.is_empty() {
            self.remove(&self.branch_map_path(ns, prefix, &tier.component))
                .await?;
        }
        Ok(removed)
    }
}

#[async_trait]
impl CacheStore for BucketStore {
    async fn upload(
        &self,
        scope: &CacheScope,
        reference: &Name,
        options: UploadOptions,
        data: ByteStream,
    ) -> Result<CachedRef, Error> {
        let tier = own_tier(scope);
        let path = self.ref_path(&tier, reference.as_str());
        let staged = self.stage(data, options.expected_size, &path).await?;
        self.write_note(&path, reference.as_str()).await?;
        let uploaded_at = options.uploaded_at.unwrap_or_else(now_micros);
        // Arrival across servers: their clocks, with random low bits so two
        // uploads in one microsecond still differ.
        let seq = (u64::try_from(now_micros()).unwrap_or(0) << 8) | u64::from(rand::random::<u8>());
        let suite = scope.test_suite_id.clone();
        let turn = self.turn(&path).await;
        let mut staged = staged;
        let mut backoff = Backoff::new();
        let stored = loop {
            let (mut record, expect) = match self.read_ref(&path).await? {
                Some((record, version)) => (record, Expect::Version(version)),
                None => (RefRecord::default(), Expect::Absent),
            };
            let old = record.suites.get(&suite).cloned();
            if let Some(mine) = old.as_ref().filter(|o| staged.is_blob(&o.body)) {
                // An earlier attempt landed although it looked lost.
                break mine.clone();
            }
            let value = ValueRecord {
                seq,
                ..ValueRecord::replacing(
                    old.as_ref(),
                    uploaded_at,
                    staged.len,
                    staged.len,
                    staged.sha256,
                    &staged.body,
                )
            };
            record.suites.insert(suite.clone(), value.clone());
            record.uploaded_at = uploaded_at;
            record.seq = seq;
            let retiring = old
                .as_ref()
                .and_then(ValueRecord::blob_id)
                .filter(|id| !staged.is_blob(&crate::engine::record::Body::Blob(*id)));
            let marker = match retiring {
                Some(blob) => Some(self.mark_retiring(&path, blob).await?),
                None => None,
            };
            staged.sending();
            match self.write(&path, encode_ref(&record)?, &expect).await? {
                Written::Done(_) => {
                    self.retire(retiring.into_iter().collect(), marker.into_iter().collect())
                        .await;
                    break value;
                }
                Written::Conflict => {
                    self.retire(Vec::new(), marker.into_iter().collect()).await;
                    backoff.wait("upload the cache archive").await?;
                }
            }
        };
        staged.published();
        drop(turn);
        if let Some(tree) = &options.tree_sha {
            self.overwrite(
                &self.tree_path(&tier, tree.as_str()),
                reference.as_str().as_bytes().to_vec(),
            )
            .await?;
        }
        Ok(cached_ref(&tier, reference.as_str(), &suite, &stored))
    }

    async fn download(
        &self,
        scope: &CacheScope,
        reference: &str,
        tree_sha: Option<&Name>,
    ) -> Result<Option<(CachedRef, ByteStream)>, Error> {
        check_download_ref(reference)?;
        let tiers: Vec<_> = scope
            .download_tiers()
            .into_iter()
            .map(|branch| tier_dir(&scope.namespace, &scope.prefix, branch))
            .collect();
        let mut candidates: Vec<(&TierDir, String)> = Vec::new();
        if let Some(tree) = tree_sha {
            for tier in &tiers {
                if let Some((target, _)) = self.read(&self.tree_path(tier, tree.as_str())).await? {
                    candidates.push((tier, String::from_utf8_lossy(&target).into_owned()));
                }
            }
        }
        if !reference.is_empty() {
            for tier in &tiers {
                candidates.push((tier, reference.to_owned()));
            }
        }
        let suite = &scope.test_suite_id;
        for (tier, target) in candidates {
            let path = self.ref_path(tier, &target);
            // A concurrent upload can retire the blob just read; read again.
            for _ in 0..8 {
                let Some((record, _)) = self.read_ref(&path).await? else {
                    break;
                };
                let Some(value) = record.suites.get(suite) else {
                    break;
                };
                if let Some(stream) = self.open_body(value).await? {
                    let found = cached_ref(tier, &target, suite, value);
                    return Ok(Some((found, stream)));
                }
            }
        }
        Ok(None)
    }

    async fn branch_refs(&self, key: &BranchRefsKey) -> Result<BTreeMap<String, i64>, Error> {
        let Some(branch) = &key.branch else {
            return Ok(BTreeMap::new());
        };
        let path =
            self.branch_map_path(&key.namespace, &key.prefix, &layout::dir_component(branch));
        match self.read(&path).await? {
            Some((bytes, _)) => parse_branch_refs(&bytes),
            None => Ok(BTreeMap::new()),
        }
    }

    async fn write_branch_refs(&self, write: &BranchRefsWrite) -> Result<bool, Error> {
        let Some((branch, refs)) = &write.target else {
            return Ok(false);
        };
        let path = self.branch_map_path(
            &write.namespace,
            &write.prefix,
            &layout::dir_component(branch),
        );
        self.overwrite(&path, branch_refs_to_json(refs)?).await?;
        Ok(true)
    }

    async fn prune(&self, scope: &CacheScope, options: PruneOptions) -> Result<u64, Error> {
        let tier = own_tier(scope);
        let is_pr = tier.tier == Tier::Pr;
        if !retention::has_work(&options, is_pr) {
            return Ok(0);
        }
        let refs = self.refs_by_age(&tier).await?;
        let uploaded_at: Vec<i64> = refs.iter().map(|found| found.record.uploaded_at).collect();
        let doomed: Vec<&FoundRef> =
            match retention::plan(&uploaded_at, is_pr, &options, now_micros()) {
                PrunePlan::WholeBranch => {
                    return self
                        .remove_branch(&scope.namespace, &scope.prefix, &tier)
                        .await
                }
                PrunePlan::Refs(doomed) => doomed.into_iter().map(|i| &refs[i]).collect(),
            };
        self.remove_refs(&tier, &doomed).await
    }

    async fn prune_all(
        &self,
        ns: &Namespace,
        prefix: &str,
        pr_branch_ttl_seconds: i64,
    ) -> Result<u64, Error> {
        check_optional("prefix", prefix)?;
        if pr_branch_ttl_seconds <= 0 {
            return Ok(0);
        }
        let now = now_micros();
        let scope = scope_dir(ns, prefix);
        let branches_dir = format!("{scope}b/");
        // Branch directories are listed by component: a hashed one (a long
        // branch name) is pruned the same way, without its name.
        let mut components: Vec<String> = self
            .list(&branches_dir, "", None)
            .try_filter_map(|(rest, _)| {
                let component = rest
                    .split_once("!b/")
                    .map(|(component, _)| component.to_owned());
                futures::future::ready(Ok(component))
            })
            .try_collect()
            .await?;
        components.dedup();
        let mut removed = 0;
        for component in components {
            let branch = layout::decode(&component.replace("+/", "")).unwrap_or_default();
            let tier = layout::tier_of_component(&scope, component, branch);
            let refs = self.refs_by_age(&tier).await?;
            let newest = refs.last().map(|found| found.record.uploaded_at);
            if retention::branch_expired(newest, pr_branch_ttl_seconds, now) {
                removed += self.remove_branch(ns, prefix, &tier).await?;
            }
        }
        Ok(removed)
    }

    async fn list_refs(
        &self,
        scope: &CacheScope,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page<CachedRef>, Error> {
        let tier = own_tier(scope);
        let limit = trove_proto::types::clamp_page_size(page_size) as usize;
        let before = if page_token.is_empty() {
            None
        } else {
            Some(decode_refs_token(page_token)?)
        };
        let refs = self.refs_by_age(&tier).await?;
        let mut items = Vec::new();
        let mut listed = 0usize;
        let mut last: Option<(i64, u64, String)> = None;
        let mut more = false;
        for found in refs.iter().rev() {
            let position = (
                found.record.uploaded_at,
                found.record.seq,
                found.reference.clone(),
            );
            if before.as_ref().is_some_and(|b| position >= *b) {
                continue;
            }
            if listed == limit {
                more = true;
                break;
            }
            for (suite, value) in &found.record.suites {
                items.push(cached_ref(&tier, &found.reference, suite, value));
            }
            listed += 1;
            last = Some(position);
        }
        Ok(Page {
            items,
            next_page_token: if more {
                last.map(|l| encode_refs_token(&l))
            } else {
                None
            },
        })
    }
}

fn encode_refs_token((uploaded_at, seq, reference): &(i64, u64, String)) -> String {
    format!(
        "b1.{uploaded_at}.{seq}.{}",
        hex::encode(reference.as_bytes())
    )
}

fn decode_refs_token(token: &str) -> Result<(i64, u64, String), Error> {
    let bad = || {
        Error::invalid(
            "page_token",
            format!(
                "{} is not a token returned by ListRefs",
                trove_proto::error::shorten(token)
            ),
        )
    };
    let body = token.strip_prefix("b1.").ok_or_else(bad)?;
    let mut parts = body.splitn(3, '.');
    let uploaded_at = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let seq = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let reference = parts
        .next()
        .and_then(|p| hex::decode(p).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    Ok((uploaded_at, seq, reference))
}
