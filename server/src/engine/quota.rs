//! Capacity settings: a byte quota per namespace and a cap on what the
//! whole server stores. Engine-neutral; the sled engine enforces them in
//! the same logged write that changes its usage counters.

use std::collections::BTreeMap;

/// What a namespace at its quota does with a write that would pass it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Refuse the write with RESOURCE_EXHAUSTED; nothing is stored.
    #[default]
    Reject,
}

/// The quota of one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceQuota {
    /// Logical bytes (what callers stored) the namespace may hold.
    pub max_bytes: u64,
    /// What a write that would pass it gets.
    pub on_full: OnFull,
}

/// Every capacity limit of a server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Stored bytes (bodies as kept on disk, every namespace together) the
    /// server may hold; `None` for no limit. The database's own overhead
    /// comes on top.
    pub max_disk_bytes: Option<u64>,
    /// Quotas by namespace name.
    pub namespaces: BTreeMap<String, NamespaceQuota>,
}

impl Quotas {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        self.max_disk_bytes.is_none() && self.namespaces.is_empty()
    }

    /// The quota of `namespace`, if it has one.
    pub fn namespace(&self, namespace: &str) -> Option<&NamespaceQuota> {
        self.namespaces.get(namespace)
    }

    /// Reads the `[namespaces."name"]` tables of a config file: each needs
    /// `max_bytes` (a positive integer) and may set `on_full = "reject"`.
    pub fn parse_namespaces(
        table: &toml::Table,
    ) -> Result<BTreeMap<String, NamespaceQuota>, String> {
        let mut out = BTreeMap::new();
        for (name, settings) in table {
            let settings = settings
                .as_table()
                .ok_or_else(|| format!("namespaces.{name:?} must be a table"))?;
            let mut max_bytes = None;
            let mut on_full = OnFull::Reject;
            for (key, value) in settings {
                match key.as_str() {
                    "max_bytes" => {
                        let bytes = value
                            .as_integer()
                            .and_then(|v| u64::try_from(v).ok())
                            .filter(|v| *v > 0)
                            .ok_or_else(|| {
                                format!("namespaces.{name:?}.max_bytes must be a positive integer")
                            })?;
                        max_bytes = Some(bytes);
                    }
                    "on_full" => match value.as_str() {
                        Some("reject") => on_full = OnFull::Reject,
                        Some("evict") => {
                            return Err(format!(
                                "namespaces.{name:?}.on_full = \"evict\" is not available in this \
                                 version; use \"reject\""
                            ))
                        }
                        _ => return Err(format!("namespaces.{name:?}.on_full must be \"reject\"")),
                    },
                    other => {
                        return Err(format!(
                            "unknown setting namespaces.{name:?}.{other}; the settings are \
                             max_bytes and on_full"
                        ))
                    }
                }
            }
            let max_bytes =
                max_bytes.ok_or_else(|| format!("namespaces.{name:?} needs max_bytes"))?;
            out.insert(name.clone(), NamespaceQuota { max_bytes, on_full });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_tables_parse_and_mistakes_are_named() {
        let table: toml::Table =
            "[ci]\nmax_bytes = 1000\non_full = \"reject\"\n[other]\nmax_bytes = 5\n"
                .parse()
                .expect("toml");
        let quotas = Quotas::parse_namespaces(&table).expect("valid");
        assert_eq!(quotas["ci"].max_bytes, 1000);
        assert_eq!(quotas["other"].on_full, OnFull::Reject);
        for (text, needle) in [
            ("[ci]\non_full = \"reject\"\n", "needs max_bytes"),
            ("[ci]\nmax_bytes = -1\n", "positive integer"),
            (
                "[ci]\nmax_bytes = 1\non_full = \"evict\"\n",
                "not available",
            ),
            ("[ci]\nmax_bytes = 1\nmax_items = 3\n", "unknown setting"),
        ] {
            let table: toml::Table = text.parse().expect("toml");
            let err = Quotas::parse_namespaces(&table).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
