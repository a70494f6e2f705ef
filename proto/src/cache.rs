//! The cache operation group: a remote test cache with a main tier, one tier
//! per pull-request branch, tree pointers, branch ref maps and retention.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::error::{Error, Result};
pub use crate::pb::{CachedRef, Tier};
use crate::types::{ByteStream, Name, Namespace, Page, MAX_NAME_BYTES};

/// Where cache operations apply: a prefix within a namespace, and the branch
/// that decides the tier (PR iff `branch != default_branch`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheScope {
    /// Tenant.
    pub namespace: Namespace,
    /// Caller's key prefix (may be empty).
    pub prefix: String,
    /// Branch being built.
    pub branch: Name,
    /// The repository's default branch.
    pub default_branch: Name,
    /// Suite identifier; empty when the caller has one suite.
    pub test_suite_id: String,
}

/// Validates an optional free-form scope field: at most 1024 bytes, no NUL.
pub fn check_optional(field: &str, value: &str) -> Result<()> {
    if value.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes long; the limit is {MAX_NAME_BYTES} bytes",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(Error::invalid(field, "must not contain a NUL byte"));
    }
    Ok(())
}

impl CacheScope {
    /// Validates the wire scope; `field` prefixes the field names in errors.
    pub fn from_wire(field: &str, scope: Option<&crate::pb::CacheScope>) -> Result<Self> {
        let scope = scope.ok_or_else(|| Error::invalid(field, "is required"))?;
        check_optional(&format!("{field}.prefix"), &scope.prefix)?;
        check_optional(&format!("{field}.test_suite_id"), &scope.test_suite_id)?;
        Ok(CacheScope {
            namespace: Namespace::new(&scope.namespace)?,
            prefix: scope.prefix.clone(),
            branch: Name::new(&format!("{field}.branch"), scope.branch.clone())?,
            default_branch: Name::new(
                &format!("{field}.default_branch"),
                scope.default_branch.clone(),
            )?,
            test_suite_id: scope.test_suite_id.clone(),
        })
    }

    /// The wire form of this scope.
    pub fn to_wire(&self) -> crate::pb::CacheScope {
        crate::pb::CacheScope {
            namespace: self.namespace.as_str().to_owned(),
            prefix: self.prefix.clone(),
            branch: self.branch.as_str().to_owned(),
            default_branch: self.default_branch.as_str().to_owned(),
            test_suite_id: self.test_suite_id.clone(),
        }
    }

    /// The PR branch of the scope's own tier; `None` for the main tier.
    pub fn own_branch(&self) -> Option<&str> {
        self.is_pr().then(|| self.branch.as_str())
    }

    /// The tiers a download tries, in order, as PR branches (`None` is
    /// main): the scope's own tier, then main for a PR scope.
    pub fn download_tiers(&self) -> Vec<Option<&str>> {
        match self.own_branch() {
            Some(branch) => vec![Some(branch), None],
            None => vec![None],
        }
    }

    /// True when this scope writes to and reads first from a PR tier.
    pub fn is_pr(&self) -> bool {
        self.branch != self.default_branch
    }
}

/// Most entries accepted in one branch ref map.
pub const MAX_BRANCH_REFS: usize = 100_000;

/// Where a branch's ref map is read from, validated at the edge. A blank
/// branch names no map: reading it gives an empty map without looking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchRefsKey {
    /// Tenant.
    pub namespace: Namespace,
    /// Caller's key prefix (may be empty).
    pub prefix: String,
    /// The branch; `None` when the caller sent a blank one.
    pub branch: Option<String>,
}

impl BranchRefsKey {
    /// Validates a lookup: `prefix` and `branch` at most 1 KiB, no NUL.
    pub fn new(namespace: Namespace, prefix: &str, branch: &str) -> Result<Self> {
        check_optional("prefix", prefix)?;
        check_optional("branch", branch)?;
        Ok(BranchRefsKey {
            namespace,
            prefix: prefix.to_owned(),
            branch: (!branch.trim().is_empty()).then(|| branch.to_owned()),
        })
    }
}

/// A validated branch ref map write. The contract makes some writes no-ops
/// (a blank branch, the default branch, an empty map); those are decided
/// here, before the map itself is judged, so every implementation answers
/// them alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchRefsWrite {
    /// Tenant.
    pub namespace: Namespace,
    /// Caller's key prefix (may be empty).
    pub prefix: String,
    /// The branch and its new map; `None` for a no-op.
    pub target: Option<(String, BTreeMap<String, i64>)>,
}

impl BranchRefsWrite {
    /// Validates a write: the scope fields like [`BranchRefsKey::new`], then,
    /// unless the write is a no-op, at most [`MAX_BRANCH_REFS`] entries whose
    /// shas are valid names.
    pub fn new(
        namespace: Namespace,
        prefix: &str,
        branch: &str,
        default_branch: &str,
        refs: BTreeMap<String, i64>,
    ) -> Result<Self> {
        check_optional("prefix", prefix)?;
        check_optional("branch", branch)?;
        check_optional("default_branch", default_branch)?;
        let no_op = branch.trim().is_empty() || branch == default_branch || refs.is_empty();
        if !no_op {
            if refs.len() > MAX_BRANCH_REFS {
                return Err(Error::invalid(
                    "refs",
                    format!(
                        "{} entries; at most {MAX_BRANCH_REFS} per branch",
                        refs.len()
                    ),
                ));
            }
            for sha in refs.keys() {
                Name::new("refs key", sha.clone())?;
            }
        }
        Ok(BranchRefsWrite {
            namespace,
            prefix: prefix.to_owned(),
            target: (!no_op).then(|| (branch.to_owned(), refs)),
        })
    }
}

/// Options of an upload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadOptions {
    /// Records a pointer from this tree sha to the uploaded ref.
    pub tree_sha: Option<Name>,
    /// Upload time in microseconds; `None` means the server's clock.
    pub uploaded_at: Option<i64>,
    /// When set, an archive of any other length is rejected.
    pub expected_size: Option<u64>,
}

/// Retention knobs; each applies only when positive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneOptions {
    /// Keep only the newest N refs.
    pub count: i64,
    /// Remove refs uploaded more than this many seconds ago.
    pub duration_seconds: i64,
    /// Remove a PR branch whole when its newest ref is older than this.
    pub pr_branch_ttl_seconds: i64,
}

/// A remote test cache.
///
/// # Contract
/// - `upload` writes to the scope's own tier; re-uploading a ref (and suite)
///   replaces it atomically, last writer wins, never a torn archive.
/// - `download` tries the tree pointer (when given), then the own tier, then
///   main for PR scopes. A miss (including an empty ref) is `Ok(None)`.
/// - `branch_refs` of a blank or unknown branch is an empty map.
///   `write_branch_refs` is a no-op (returning false) for a blank branch, the
///   default branch or an empty map, and otherwise replaces the map.
/// - `prune` touches only the scope's own tier and returns the refs removed
///   (a ref counts once, whatever its suites). `prune_all` applies the branch
///   TTL to every PR branch and never touches main. Non-positive knobs do nothing.
/// - Refs are ordered by upload time in microseconds, ties broken by arrival.
#[async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// Stores an archive under `reference` in the scope's own tier.
    async fn upload(
        &self,
        scope: &CacheScope,
        reference: &Name,
        options: UploadOptions,
        data: ByteStream,
    ) -> Result<CachedRef>;

    /// Finds and opens an archive; `None` on a miss.
    async fn download(
        &self,
        scope: &CacheScope,
        reference: &str,
        tree_sha: Option<&Name>,
    ) -> Result<Option<(CachedRef, ByteStream)>>;

    /// A branch's sha -> epoch-seconds map (empty for no branch).
    async fn branch_refs(&self, key: &BranchRefsKey) -> Result<BTreeMap<String, i64>>;

    /// Replaces a branch's map; returns false when the write is a no-op.
    async fn write_branch_refs(&self, write: &BranchRefsWrite) -> Result<bool>;

    /// Applies retention to the scope's own tier; returns the refs removed.
    async fn prune(&self, scope: &CacheScope, options: PruneOptions) -> Result<u64>;

    /// Removes every PR branch under `prefix` whose newest ref is older than the TTL.
    async fn prune_all(
        &self,
        ns: &Namespace,
        prefix: &str,
        pr_branch_ttl_seconds: i64,
    ) -> Result<u64>;

    /// The scope's own tier's refs, newest first.
    async fn list_refs(
        &self,
        scope: &CacheScope,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page<CachedRef>>;
}
