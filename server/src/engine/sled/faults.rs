//! Failures injected at the storage boundary, for tests.

/// Switches that make the storage boundary fail on purpose, so tests can
/// check that a failing disk gives a clear status, leaves nothing partial
/// behind, and that the store serves again once the fault clears.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every `fdatasync` of the log (the durability point) fails.
    pub fail_flush: std::sync::atomic::AtomicBool,
    /// Every write to the log fails with an I/O error.
    pub fail_log_write: std::sync::atomic::AtomicBool,
    /// Every write to a blob file fails with an I/O error.
    pub fail_blob_write: std::sync::atomic::AtomicBool,
    /// Every write to a blob file fails as if the disk were full.
    pub disk_full: std::sync::atomic::AtomicBool,
    /// The log's writer waits before writing each group while this is on,
    /// so that applied writes pile up unsettled.
    pub stall_log: std::sync::atomic::AtomicBool,
}

impl Faults {
    /// True when the switch `flag` is on.
    pub(in crate::engine::sled) fn on(flag: &std::sync::atomic::AtomicBool) -> bool {
        flag.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The error an injected log-write fault produces, if one is set.
    pub fn log_write_error(&self) -> Option<std::io::Error> {
        if Self::on(&self.disk_full) {
            return Some(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        Self::on(&self.fail_log_write).then(|| std::io::Error::other("injected log write failure"))
    }

    /// The error an injected blob-write fault produces, if one is set.
    pub fn blob_write_error(&self) -> Option<std::io::Error> {
        if Self::on(&self.disk_full) {
            return Some(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        Self::on(&self.fail_blob_write)
            .then(|| std::io::Error::other("injected blob write failure"))
    }
}
