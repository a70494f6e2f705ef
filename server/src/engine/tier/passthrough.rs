//! The groups a tier passes through to its upstream whole: cassettes and
//! the test cache. Their readers want the newest state (an append, a new
//! ref, a pruned branch), which only the upstream knows, so nothing of them
//! is kept locally.

use std::collections::BTreeMap;

use async_trait::async_trait;
use trove_proto::cache::{
    BranchRefsKey, BranchRefsWrite, CacheScope, CachedRef, PruneOptions, UploadOptions,
};
use trove_proto::entries::{AppendOptions, EntryStream, NewEntry, NewEntryStream, ReadOptions};
use trove_proto::types::{ByteStream, ListPage, Name, Namespace, Page};
use trove_proto::{CacheStore, EntryStore, Result};

use super::Tier;

#[async_trait]
impl EntryStore for Tier {
    async fn append_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: Vec<NewEntry>,
        options: AppendOptions,
    ) -> Result<u64> {
        self.calling("append_entries")?
            .append_entries(ns, cassette, entries, options)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn read_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        options: ReadOptions,
    ) -> Result<EntryStream> {
        self.calling("read_entries")?
            .read_entries(ns, cassette, options)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn replace_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: NewEntryStream,
    ) -> Result<u64> {
        self.calling("replace_entries")?
            .replace_entries(ns, cassette, entries)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn delete_cassette(&self, ns: &Namespace, cassette: &Name) -> Result<bool> {
        self.calling("delete_cassette")?
            .delete_cassette(ns, cassette)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn cassette_exists(&self, ns: &Namespace, cassette: &Name) -> Result<bool> {
        self.calling("cassette_exists")?
            .cassette_exists(ns, cassette)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn ensure_cassette(&self, ns: &Namespace, cassette: &Name) -> Result<()> {
        // Validation only: the local tier's answer is the upstream's.
        self.local.ensure_cassette(ns, cassette).await
    }

    async fn list_cassettes(&self, ns: &Namespace, page: &ListPage) -> Result<Page<String>> {
        self.calling("list_cassettes")?
            .list_cassettes(ns, page)
            .await
            .map_err(|e| self.upstream_error(e))
    }
}

#[async_trait]
impl CacheStore for Tier {
    async fn upload(
        &self,
        scope: &CacheScope,
        reference: &Name,
        options: UploadOptions,
        data: ByteStream,
    ) -> Result<CachedRef> {
        self.calling("upload")?
            .upload(scope, reference, options, data)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn download(
        &self,
        scope: &CacheScope,
        reference: &str,
        tree_sha: Option<&Name>,
    ) -> Result<Option<(CachedRef, ByteStream)>> {
        self.calling("download")?
            .download(scope, reference, tree_sha)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn branch_refs(&self, key: &BranchRefsKey) -> Result<BTreeMap<String, i64>> {
        self.calling("branch_refs")?
            .branch_refs(key)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn write_branch_refs(&self, write: &BranchRefsWrite) -> Result<bool> {
        self.calling("write_branch_refs")?
            .write_branch_refs(write)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn prune(&self, scope: &CacheScope, options: PruneOptions) -> Result<u64> {
        self.calling("prune")?
            .prune(scope, options)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn prune_all(
        &self,
        ns: &Namespace,
        prefix: &str,
        pr_branch_ttl_seconds: i64,
    ) -> Result<u64> {
        self.calling("prune_all")?
            .prune_all(ns, prefix, pr_branch_ttl_seconds)
            .await
            .map_err(|e| self.upstream_error(e))
    }

    async fn list_refs(
        &self,
        scope: &CacheScope,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page<CachedRef>> {
        self.calling("list_refs")?
            .list_refs(scope, page_size, page_token)
            .await
            .map_err(|e| self.upstream_error(e))
    }
}
