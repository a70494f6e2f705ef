//! Quota checks before an upload is written: refuse as soon as the
//! declared size or the bytes received cannot fit.

use trove_proto::types::Namespace;
use trove_proto::Error;

use super::{committed_total, record_weight, schema, sled_error, Delta};

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

/// How much more a namespace may store before a quota refuses it.
#[derive(Debug, Clone)]
pub(in crate::engine::sled) struct Room {
    namespace: String,
    /// The namespace's quota and usage, when it has a quota.
    quota: Option<(u64, i128)>,
    /// The server's limit and stored bytes, when it has a limit.
    server: Option<(u64, i128)>,
    /// The data folder's free-space floor.
    free: std::sync::Arc<crate::engine::quota::FreeSpace>,
}

impl Room {
    /// The refusal for a body of `bytes` that does not fit, if it does not.
    /// Best effort: the exact check runs with the write itself.
    pub(in crate::engine::sled) fn refuse(&self, bytes: u64) -> Option<Error> {
        if let Err(full) = self.free.check(bytes) {
            return Some(full);
        }
        let adding = i128::from(bytes);
        if let Some((max, usage)) = self.quota {
            if usage + adding > i128::from(max) {
                return Some(over_quota(&self.namespace, max, usage, adding));
            }
        }
        if let Some((max, stored)) = self.server {
            if stored + adding > i128::from(max) {
                return Some(Error::exhausted(
                    "max_disk_bytes",
                    format!(
                        "the server stores {stored} bytes of its max_disk_bytes of {max}; a \
                         {bytes}-byte value does not fit. Nothing was stored"
                    ),
                ));
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
        let quota = match quotas.namespace(namespace.as_str()) {
            Some(quota) => {
                let usage = read(&schema::namespace_key(namespace))?.logical;
                Some((quota.max_bytes, usage))
            }
            None => None,
        };
        let server = match quotas.max_disk_bytes {
            Some(max) => Some((max, read(&[])?.stored)),
            None => None,
        };
        Ok(Room {
            namespace: namespace.as_str().to_owned(),
            quota,
            server,
            free: std::sync::Arc::clone(&self.inner.usage.free),
        })
    }
}
