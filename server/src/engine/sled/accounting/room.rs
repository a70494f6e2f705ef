//! Quota checks before an upload is written: refuse as soon as the
//! declared size or the bytes received cannot fit.

use trove_proto::types::Namespace;
use trove_proto::Error;

use super::{committed_split, committed_total, record_weight, schema, sled_error, Delta};
use crate::engine::quota::OnFull;

/// The refusal of a write that would take `namespace` past its quota.
pub(in crate::engine::sled) fn over_quota(
    namespace: &str,
    max: u64,
    usage: i128,
    adding: i128,
) -> Error {
    Error::exhausted(
        format!("quota of namespace {namespace:?}"),
        format!(
            "namespace {namespace:?} holds {usage} bytes of its {max}-byte quota; storing {adding} \
             more would pass it. Nothing was stored: delete something in the namespace, or raise \
             its max_bytes"
        ),
    )
}

/// The refusal of a write to an `evict` namespace whose records
/// (artifacts, cassettes, entries, streams: never evicted) leave no room.
pub(in crate::engine::sled) fn records_fill_quota(
    namespace: &str,
    max: u64,
    records: i128,
    adding: i128,
) -> Error {
    Error::exhausted(
        format!("quota of namespace {namespace:?}"),
        format!(
            "namespace {namespace:?} evicts objects and cache archives at its {max}-byte quota, \
             but its records (artifacts, cassettes, streams) alone hold {records} bytes and are \
             never evicted, so eviction cannot free room for {adding} more. Nothing was stored: \
             delete records in the namespace, or raise its max_bytes"
        ),
    )
}

/// The refusal of a write to an `evict` namespace that would pass its
/// ceiling (the quota plus the bounded overshoot) before eviction caught up.
pub(in crate::engine::sled) fn eviction_behind(
    namespace: &str,
    quota: &crate::engine::quota::NamespaceQuota,
    usage: i128,
    adding: i128,
) -> Error {
    Error::exhausted(
        format!("quota of namespace {namespace:?}"),
        format!(
            "namespace {namespace:?} holds {usage} bytes; storing {adding} more would pass \
             {ceiling} bytes (its {max}-byte quota plus 10% while eviction catches up). Nothing \
             was stored: eviction is running, retry shortly",
            ceiling = quota.ceiling(),
            max = quota.max_bytes
        ),
    )
}

/// How much more a namespace may store before a quota refuses it.
#[derive(Debug, Clone)]
pub(in crate::engine::sled) struct Room {
    namespace: String,
    /// The namespace's quota and usage, when it has a quota.
    quota: Option<(crate::engine::quota::NamespaceQuota, i128)>,
    /// The namespace's records (what eviction never removes), in bytes.
    records: i128,
    /// The server's limit and stored bytes, when it has a limit.
    server: Option<(u64, i128)>,
    /// The data folder's free-space floor.
    free: std::sync::Arc<crate::engine::quota::FreeSpace>,
}

impl Room {
    /// The refusal for a body of `bytes` that does not fit, if it does not.
    /// Best effort: the exact check runs with the write itself.
    pub(in crate::engine::sled) fn refuse(&self, bytes: u64) -> Option<Error> {
        self.verdict(bytes).map(|(refusal, _)| refusal)
    }

    /// True when the only thing refusing `bytes` is eviction running behind:
    /// the namespace evicts and its evictable values can make the room.
    pub(in crate::engine::sled) fn waits_for_eviction(&self, bytes: u64) -> bool {
        matches!(self.verdict(bytes), Some((_, true)))
    }

    /// The refusal, and whether eviction catching up would lift it.
    fn verdict(&self, bytes: u64) -> Option<(Error, bool)> {
        if let Err(full) = self.free.check(bytes) {
            return Some((full, false));
        }
        let adding = i128::from(bytes);
        if let Some((quota, usage)) = self.quota {
            let max = quota.max_bytes;
            match quota.on_full {
                OnFull::Reject if usage + adding > i128::from(max) => {
                    return Some((over_quota(&self.namespace, max, usage, adding), false));
                }
                OnFull::Evict if self.records + adding > i128::from(max) => {
                    let refusal = records_fill_quota(&self.namespace, max, self.records, adding);
                    return Some((refusal, false));
                }
                OnFull::Evict
                    if usage > i128::from(max) && usage + adding > i128::from(quota.ceiling()) =>
                {
                    return Some((
                        eviction_behind(&self.namespace, &quota, usage, adding),
                        true,
                    ));
                }
                _ => {}
            }
        }
        if let Some((max, stored)) = self.server {
            if stored + adding > i128::from(max) {
                let refusal = Error::exhausted(
                    "max_disk_bytes",
                    format!(
                        "the server stores {stored} bytes of its max_disk_bytes of {max}; a \
                         {bytes}-byte value does not fit. Nothing was stored"
                    ),
                );
                return Some((refusal, false));
            }
        }
        None
    }

    /// True when no limit applies.
    pub(in crate::engine::sled) fn unlimited(&self) -> bool {
        self.quota.is_none() && self.server.is_none() && self.free.is_off()
    }
}

impl crate::engine::sled::SledStore {
    /// The limits an upload to `namespace` runs against, read before it
    /// starts so that a body that cannot fit is refused as its declared size
    /// or its received bytes pass them, not after it was all written.
    /// What the value now under `key` of `data_tree` takes is credited: an
    /// overwrite only needs room for the difference.
    pub(in crate::engine::sled) fn room(
        &self,
        namespace: &Namespace,
        data_tree: &sled::Tree,
        key: &[u8],
    ) -> Result<Room, Error> {
        let quotas = &self.inner.options.quotas;
        if quotas.is_empty() {
            return Ok(Room {
                namespace: namespace.as_str().to_owned(),
                quota: None,
                records: 0,
                server: None,
                free: std::sync::Arc::clone(&self.inner.usage.free),
            });
        }
        let replaced = record_weight(data_tree.get(key).map_err(sled_error)?.as_ref());
        let tree = &self.inner.usage.usage;
        let read = |prefix: &[u8]| -> Result<Delta, Error> {
            Ok(committed_total(tree, prefix)
                .map_err(sled_error)?
                .minus(replaced))
        };
        let (quota, records) = match quotas.namespace(namespace.as_str()) {
            Some(quota) => {
                let ns_key = schema::namespace_key(namespace);
                let usage = read(&ns_key)?.logical;
                let (_, mut records) = committed_split(tree, &ns_key).map_err(sled_error)?;
                let name = data_tree.name();
                let evictable = (*name == *schema::OBJECTS.as_bytes()
                    && key.last() == Some(&schema::KIND_OBJECT))
                    || *name == *schema::CACHE_REFS.as_bytes();
                if !evictable {
                    records -= replaced.logical;
                }
                (Some((*quota, usage)), records)
            }
            None => (None, 0),
        };
        let server = match quotas.max_disk_bytes {
            Some(max) => Some((max, read(&[])?.stored)),
            None => None,
        };
        Ok(Room {
            namespace: namespace.as_str().to_owned(),
            quota,
            records,
            server,
            free: std::sync::Arc::clone(&self.inner.usage.free),
        })
    }
}
