//! The data folder's format version, in the file `format`, so that a
//! server never opens a folder that a newer version wrote in a way it would
//! misread: spilled entries would parse as damaged JSON, images in ring
//! slots would not be put back after a crash, and so on.
//!
//! Opening a folder checks the file before anything else touches the
//! folder: a newer format is refused, naming both versions; an older one
//! (or none: folders from before the file existed) is read as it is, since
//! every version reads the layouts before it, and the file is then set to
//! this version. Raise [`FORMAT_VERSION`] with every change that an older
//! server would misread.

use std::path::Path;

use trove_proto::Error;

use super::io_error;

/// The newest format this build reads, and the one it writes.
/// 1: value packs, entries and branch maps spilled into packs, undo images
/// in ring slots.
pub(super) const FORMAT_VERSION: u32 = 1;

const FILE: &str = "format";
const PREFIX: &str = "trove data format ";

/// Refuses a folder of a newer format; records this format otherwise.
pub(super) fn check_and_record(root: &Path) -> Result<(), Error> {
    let path = root.join(FILE);
    let found = match std::fs::read_to_string(&path) {
        Ok(text) => Some(parse(&text).ok_or_else(|| Error::FailedPrecondition {
            message: format!(
                "{} does not say which format the data folder has (expected \
                 `{PREFIX}N`); restore it from a backup",
                path.display()
            ),
        })?),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(io_error("read the data folder's format", &err)),
    };
    match found {
        Some(version) if version > FORMAT_VERSION => Err(Error::FailedPrecondition {
            message: format!(
                "the data folder {} was written by a newer Trove (format {version}); this server \
                 reads formats up to {FORMAT_VERSION}: run that version or newer, or restore a \
                 backup made before the upgrade",
                root.display()
            ),
        }),
        Some(version) if version == FORMAT_VERSION => Ok(()),
        _ => super::durable::replace_file(&path, format!("{PREFIX}{FORMAT_VERSION}\n").as_bytes())
            .map_err(|e| io_error("record the data folder's format", &e)),
    }
}

fn parse(text: &str) -> Option<u32> {
    text.trim().strip_prefix(PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new folder gets this format; a folder without the file (older
    /// versions) is accepted and gets it too.
    #[test]
    fn a_folder_without_a_format_gets_this_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        check_and_record(dir.path()).expect("check");
        let text = std::fs::read_to_string(dir.path().join(FILE)).expect("read");
        assert_eq!(parse(&text), Some(FORMAT_VERSION));
        check_and_record(dir.path()).expect("check again");
    }

    /// A newer format is refused, naming both versions, and the file is left
    /// as it was; an unreadable file is refused too.
    #[test]
    fn a_newer_or_unreadable_format_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let newer = format!("{PREFIX}{}\n", FORMAT_VERSION + 1);
        std::fs::write(dir.path().join(FILE), &newer).expect("write");
        let err = check_and_record(dir.path()).expect_err("newer");
        let message = err.to_string();
        assert!(matches!(err, Error::FailedPrecondition { .. }), "{message}");
        assert!(
            message.contains(&format!("format {}", FORMAT_VERSION + 1))
                && message.contains(&format!("up to {FORMAT_VERSION}")),
            "{message}"
        );
        let kept = std::fs::read_to_string(dir.path().join(FILE)).expect("read");
        assert_eq!(kept, newer);
        // The store refuses before sled touches the folder.
        let store = super::super::SledStore::open(dir.path(), Default::default());
        assert!(
            matches!(store, Err(Error::FailedPrecondition { .. })),
            "{:?}",
            store.err()
        );
        assert!(!dir.path().join("db").exists(), "sled opened the folder");
        std::fs::write(dir.path().join(FILE), "something else").expect("write");
        let err = check_and_record(dir.path()).expect_err("unreadable");
        assert!(matches!(err, Error::FailedPrecondition { .. }), "{err}");
    }
}
