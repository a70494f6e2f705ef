//! Which namespaces an eviction pass looks at, and what each holds.

use trove_proto::Error;

use super::super::SledStore;
use crate::engine::quota::{NamespaceQuota, OnFull};

impl SledStore {
    /// The namespaces a pass looks at: those with an evicting quota of
    /// their own, and, under an evicting quota for every namespace, every
    /// other namespace holding something.
    pub(super) fn evicting_namespaces(&self) -> Result<Vec<(String, NamespaceQuota)>, Error> {
        let quotas = &self.inner.options.quotas;
        let mut out: Vec<(String, NamespaceQuota)> = quotas
            .evicting()
            .map(|(name, quota)| (name.clone(), *quota))
            .collect();
        if let Some(every) = quotas
            .every_namespace
            .filter(|quota| quota.on_full == OnFull::Evict)
        {
            let held: std::collections::BTreeSet<String> = self
                .inner
                .usage
                .rows(None)?
                .into_iter()
                .map(|row| row.namespace)
                .filter(|name| !quotas.namespaces.contains_key(name))
                .collect();
            out.extend(held.into_iter().map(|name| (name, every)));
        }
        Ok(out)
    }

    pub(super) fn namespace_bytes(&self, ns_key: &[u8]) -> Result<u64, Error> {
        let total = super::super::accounting::namespace_logical(&self.inner.usage.usage, ns_key)?;
        Ok(total)
    }
}
