//! Capacity settings: a byte quota per namespace and a cap on what the
//! whole server stores. Engine-neutral; the sled engine enforces them in
//! the same logged write that changes its usage counters.

use std::collections::BTreeMap;

use trove_proto::Error;

/// What a namespace at its quota does with a write that would pass it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Refuse the write with RESOURCE_EXHAUSTED; nothing is stored.
    #[default]
    Reject,
    /// Accept the write and evict content-addressed objects and cache
    /// archives, least recently used first (pull-request tiers before
    /// everything else), in the background; see [`NamespaceQuota::ceiling`].
    Evict,
}

/// The quota of one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceQuota {
    /// Logical bytes (what callers stored) the namespace may hold.
    pub max_bytes: u64,
    /// What a write that would pass it gets.
    pub on_full: OnFull,
}

impl NamespaceQuota {
    /// Eviction starts when the namespace holds more than `max_bytes` (the
    /// high watermark) and stops at this many bytes (the low watermark,
    /// 90% of `max_bytes`), so that it runs in batches, not once per write.
    pub fn low_watermark(&self) -> u64 {
        self.max_bytes - self.max_bytes / 10
    }

    /// The most an `evict` namespace may hold while eviction catches up:
    /// once past `max_bytes`, writes are accepted up to 10% over it; a write
    /// beyond that is refused until eviction made room. A write that starts
    /// at or under `max_bytes` is always accepted (records permitting), so
    /// the overshoot is at most 10% or one value, whichever is larger.
    pub fn ceiling(&self) -> u64 {
        self.max_bytes.saturating_add(self.max_bytes / 10)
    }
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
    /// The quota of every namespace without one of its own (the config
    /// file's `[namespaces."*"]`), each namespace held to it separately.
    pub every_namespace: Option<NamespaceQuota>,
    /// Free bytes the data folder's filesystem keeps: a write that would
    /// leave less is refused (0: no floor).
    pub min_free_disk_bytes: u64,
}

impl Quotas {
    /// The namespaces whose quota evicts, with their quotas.
    pub fn evicting(&self) -> impl Iterator<Item = (&String, &NamespaceQuota)> {
        self.namespaces
            .iter()
            .filter(|(_, quota)| quota.on_full == OnFull::Evict)
    }

    /// True when some namespace, named or not, has an evicting quota.
    pub fn evicts_anywhere(&self) -> bool {
        self.evicting().next().is_some()
            || self
                .every_namespace
                .is_some_and(|quota| quota.on_full == OnFull::Evict)
    }

    /// True when `namespace` has an evicting quota.
    pub fn evicts(&self, namespace: &str) -> bool {
        self.namespace(namespace)
            .is_some_and(|quota| quota.on_full == OnFull::Evict)
    }

    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        self.max_disk_bytes.is_none()
            && self.namespaces.is_empty()
            && self.every_namespace.is_none()
            && self.min_free_disk_bytes == 0
    }

    /// The quota of `namespace`: its own, else the one of every namespace.
    pub fn namespace(&self, namespace: &str) -> Option<&NamespaceQuota> {
        self.namespaces
            .get(namespace)
            .or(self.every_namespace.as_ref())
    }

    /// Reads the `[namespaces."name"]` tables of a config file (`"*"` names
    /// every namespace without a table of its own): each needs `max_bytes`
    /// (a positive integer) and may set `on_full` to `"reject"` or
    /// `"evict"`; without it, `on_full` is `default_on_full`.
    pub fn parse_namespaces(
        table: &toml::Table,
        default_on_full: OnFull,
    ) -> Result<BTreeMap<String, NamespaceQuota>, String> {
        let mut out = BTreeMap::new();
        for (name, settings) in table {
            let settings = settings
                .as_table()
                .ok_or_else(|| format!("namespaces.{name:?} must be a table"))?;
            let mut max_bytes = None;
            let mut on_full = default_on_full;
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
                        Some("evict") => on_full = OnFull::Evict,
                        _ => {
                            return Err(format!(
                                "namespaces.{name:?}.on_full must be \"reject\" or \"evict\""
                            ))
                        }
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

/// The free-space floor of a data folder. The filesystem is asked at most
/// every [`FreeSpace::REFRESH`], so a burst of writes may pass the floor by
/// what they write in that time.
#[derive(Debug)]
pub struct FreeSpace {
    dir: std::path::PathBuf,
    floor: u64,
    last: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl FreeSpace {
    /// How long a reading of the free space is trusted.
    pub const REFRESH: std::time::Duration = std::time::Duration::from_millis(200);

    /// True when no floor is kept.
    pub fn is_off(&self) -> bool {
        self.floor == 0
    }

    /// A guard keeping `floor` bytes free on the filesystem of `dir`.
    pub fn new(dir: &std::path::Path, floor: u64) -> Self {
        FreeSpace {
            dir: dir.to_path_buf(),
            floor,
            last: std::sync::Mutex::new(None),
        }
    }

    /// Refuses, with RESOURCE_EXHAUSTED, `bytes` more that would leave less
    /// free than the floor.
    pub fn check(&self, bytes: u64) -> Result<(), Error> {
        if self.floor == 0 {
            return Ok(());
        }
        let mut last = self
            .last
            .lock()
            .map_err(|_| Error::internal("the free-space lock is poisoned"))?;
        let free = match *last {
            Some((at, free)) if at.elapsed() < Self::REFRESH => free,
            _ => {
                let stat = rustix::fs::statvfs(&self.dir).map_err(|e| Error::Unavailable {
                    message: format!("cannot read the free space of the data folder: {e}"),
                })?;
                stat.f_bavail.saturating_mul(stat.f_frsize)
            }
        };
        if last.is_none_or(|(at, _)| at.elapsed() >= Self::REFRESH) {
            *last = Some((std::time::Instant::now(), free));
        }
        if free.saturating_sub(bytes) < self.floor {
            return Err(Error::exhausted(
                "disk space",
                format!(
                    "the data folder's filesystem has {free} bytes free and keeps at least \
                     {floor} free (min_free_disk_bytes); {bytes} more would pass that. Nothing was \
                     stored: free some space or lower the floor",
                    floor = self.floor
                ),
            ));
        }
        Ok(())
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
        let quotas = Quotas::parse_namespaces(&table, OnFull::Reject).expect("valid");
        assert_eq!(quotas["ci"].max_bytes, 1000);
        assert_eq!(quotas["other"].on_full, OnFull::Reject);
        let table: toml::Table = "[cache]\nmax_bytes = 1000\non_full = \"evict\"\n"
            .parse()
            .expect("toml");
        let quotas = Quotas::parse_namespaces(&table, OnFull::Reject).expect("valid");
        assert_eq!(quotas["cache"].on_full, OnFull::Evict);
        assert_eq!(quotas["cache"].low_watermark(), 900);
        assert_eq!(quotas["cache"].ceiling(), 1100);
        for (text, needle) in [
            ("[ci]\non_full = \"reject\"\n", "needs max_bytes"),
            ("[ci]\nmax_bytes = -1\n", "positive integer"),
            (
                "[ci]\nmax_bytes = 1\non_full = \"drop\"\n",
                "\"reject\" or \"evict\"",
            ),
            ("[ci]\nmax_bytes = 1\nmax_items = 3\n", "unknown setting"),
        ] {
            let table: toml::Table = text.parse().expect("toml");
            let err = Quotas::parse_namespaces(&table, OnFull::Reject).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    /// A floor above the filesystem's free space refuses any write with a
    /// message naming the setting; no floor refuses nothing.
    #[test]
    fn the_free_space_floor_refuses_writes_below_it() {
        let dir = tempfile::tempdir().expect("dir");
        FreeSpace::new(dir.path(), 0)
            .check(u64::MAX)
            .expect("no floor");
        let err = FreeSpace::new(dir.path(), u64::MAX / 2)
            .check(1)
            .expect_err("floor above the free space");
        let Error::ResourceExhausted { limit, message } = &err else {
            panic!("expected RESOURCE_EXHAUSTED, got {err:?}");
        };
        assert_eq!(limit, "disk space");
        assert!(message.contains("min_free_disk_bytes"), "{message}");
        FreeSpace::new(dir.path(), 1)
            .check(1)
            .expect("a 1-byte floor fits");
    }
}
