//! Segment files: created zero-filled and synced before use, so that
//! appending to one changes no file size and an `fdatasync` after a write
//! has no metadata to persist; named by a number that grows with each
//! segment, so their order is their name's order.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::codec;

/// Bytes of a segment, unless one record group needs more. The folder
/// holds the segment being written and a spare named ahead, both
/// zero-filled: 2 MiB keeps that floor at 4 MiB of disk, while a rotation
/// (prepared off the write path) every 2 MiB stays rare.
pub const SEGMENT_BYTES: u64 = 2 * 1024 * 1024;
const SUFFIX: &str = ".wal";
const SPARE: &str = "spare.tmp";

/// The path of segment `number` in `dir`.
pub fn path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}{SUFFIX}"))
}

/// The segments in `dir`, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((number, entry.path()));
    }
    found.sort();
    Ok(found)
}

/// Makes the names in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A zero-filled, synced file of `bytes` bytes, not yet a segment.
#[derive(Debug)]
pub struct Spare {
    path: PathBuf,
    file: File,
    bytes: u64,
    /// The segment number it already carries the name of, if any.
    named: Option<u64>,
}

/// Creates a spare in `dir` (replacing any left over).
pub fn prepare(dir: &Path, bytes: u64) -> std::io::Result<Spare> {
    let path = dir.join(SPARE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    const STEP: usize = 1024 * 1024;
    let zeros = vec![0u8; STEP];
    let mut at = 0u64;
    while at < bytes {
        let n = usize::try_from(bytes - at).map_or(STEP, |left| left.min(STEP));
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()?;
    Ok(Spare {
        path,
        file,
        bytes,
        named: None,
    })
}

/// A spare already named as segment `number`, its name durable. Renaming
/// and syncing the folder here, off the write path, keeps both out of a
/// rotation: a folder `fsync` commits the filesystem's journal, which
/// waits for whatever else the disk is writing (an 18 ms rotation was
/// measured under load). Until its header is written and synced a named
/// spare is a segment without a header, which recovery skips as holding
/// nothing acknowledged.
pub fn prepare_named(dir: &Path, bytes: u64, number: u64) -> std::io::Result<Spare> {
    let mut spare = prepare(dir, bytes)?;
    let named = path(dir, number);
    std::fs::rename(&spare.path, &named)?;
    sync_dir(dir)?;
    spare.path = named;
    spare.named = Some(number);
    Ok(spare)
}

/// A segment being appended to.
#[derive(Debug)]
pub struct Segment {
    /// Its number.
    pub number: u64,
    file: File,
    bytes: u64,
    /// Where the next record goes.
    offset: u64,
}

impl Segment {
    /// Turns `spare` into segment `number`, following `base`. The header
    /// is made durable by the first group's `fdatasync`; the name by a sync
    /// of the folder, here or (for a spare named ahead) when it was named,
    /// before any record in it can be acknowledged.
    pub fn install(dir: &Path, spare: Spare, number: u64, base: u64) -> std::io::Result<Self> {
        spare.file.write_all_at(&codec::segment_header(base), 0)?;
        if spare.named != Some(number) {
            // Replaces a named spare of the same number, if one was left.
            std::fs::rename(&spare.path, path(dir, number))?;
            sync_dir(dir)?;
        }
        Ok(Segment {
            number,
            file: spare.file,
            bytes: spare.bytes,
            offset: codec::SEGMENT_HEADER as u64,
        })
    }

    /// Makes the header durable now, not with the first group: the header
    /// of a segment started after a failure voids records of the older
    /// one, which must not come back if no group follows before a crash.
    pub fn sync_header(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Whether `len` more bytes fit.
    pub fn fits(&self, len: usize) -> bool {
        self.offset + len as u64 <= self.bytes
    }

    /// Writes `bytes` after the last record and waits for `fdatasync`.
    pub fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, self.offset)?;
        self.offset += bytes.len() as u64;
        self.file.sync_data()
    }
}

/// The size of a segment that holds a group of `len` bytes.
pub fn size_for(len: usize) -> u64 {
    SEGMENT_BYTES.max((codec::SEGMENT_HEADER + len) as u64)
}
