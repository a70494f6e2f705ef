//! Recovery: bring sled up to the end of the durable log.
//!
//! sled holds every change up to its applied marker (it may hold more than
//! the log if it was flushed after a change whose record never became
//! durable; such a change was never acknowledged and may stay). Records
//! after the marker are applied in order, each followed by the marker, so a
//! crash during recovery only repeats work. First, a write that sled holds
//! only part of (its image of the values before is newer than the marker)
//! is taken out. A record of an
//! older segment numbered above a newer segment's base was undone before
//! the crash and is skipped. The first record that is not whole ends the
//! log: it is reported and cut, never applied. Finally sled is made durable
//! and every segment is deleted; the log restarts on a fresh one.

use std::collections::HashMap;
use std::path::Path;

use sled::IVec;
use trove_proto::Error;

use super::codec::{self, Read, Record};
use super::{segments, APPLIED};
use crate::engine::sled::{io_error, sled_error};

/// Where the log starts again after recovery.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// The last LSN in sled after replay.
    pub last_lsn: u64,
    /// The number the next segment takes.
    pub next_segment: u64,
    /// Records applied.
    pub replayed: u64,
    /// Bytes of a torn tail that were cut, if any.
    pub torn: Option<String>,
}

/// One segment as read back.
struct SegmentRead {
    number: u64,
    base: u64,
    records: Vec<Record>,
    torn: Option<(usize, &'static str)>,
}

/// Replays the log in `dir` into `db`. `make_durable` flushes and syncs
/// sled; it runs before the replayed segments are deleted.
pub fn recover(
    db: &sled::Db,
    log_tree: &sled::Tree,
    dir: &Path,
    make_durable: impl FnOnce() -> Result<(), String>,
) -> Result<Recovered, Error> {
    std::fs::create_dir_all(dir).map_err(|e| io_error("create the log folder", &e))?;
    if let Some(parent) = dir.parent() {
        segments::sync_dir(parent).map_err(|e| io_error("sync the data folder", &e))?;
    }
    let applied = super::applied(log_tree)?;
    let mut trees: HashMap<IVec, sled::Tree> = HashMap::new();
    put_back_cut_write(db, log_tree, &mut trees, applied)?;
    let found = segments::list(dir).map_err(|e| io_error("list the log", &e))?;
    let mut reads = Vec::with_capacity(found.len());
    for (number, path) in &found {
        let bytes = std::fs::read(path).map_err(|e| io_error("read the log", &e))?;
        // A segment whose header never became durable holds nothing that
        // was acknowledged.
        reads.extend(read_segment(*number, &bytes));
    }
    let mut recovered = Recovered {
        last_lsn: applied,
        next_segment: found.last().map_or(1, |(n, _)| n + 1),
        ..Recovered::default()
    };
    if let Some(first) = reads.first() {
        if first.base > applied {
            return Err(Error::DataLoss {
                message: format!(
                    "the log starts after record {} but the database holds records only up to {}: \
                     records in between are lost; restore the data folder from a backup",
                    first.base, applied
                ),
            });
        }
    }
    let mut last = applied;
    for (index, segment) in reads.iter().enumerate() {
        // Records above the next segment's base were undone before it began.
        let limit = reads.get(index + 1).map_or(u64::MAX, |next| next.base);
        if last < segment.base {
            return Err(Error::DataLoss {
                message: format!(
                    "log segment {} follows record {} but the records before it end at {last}: \
                     records in between are lost; restore the data folder from a backup",
                    segment.number, segment.base
                ),
            });
        }
        // The LSNs between a segment's base and its first record were taken
        // by writes that were undone: the first record may jump over them.
        let mut first = true;
        for record in &segment.records {
            if record.lsn <= last || record.lsn > limit {
                continue;
            }
            let jump_allowed = std::mem::take(&mut first);
            if record.lsn != last + 1 && !jump_allowed {
                return Err(Error::DataLoss {
                    message: format!(
                        "the log jumps from record {last} to {} (segment {}): records in between \
                         are lost; restore the data folder from a backup",
                        record.lsn, segment.number
                    ),
                });
            }
            apply(db, log_tree, &mut trees, record)?;
            last = record.lsn;
            recovered.replayed += 1;
        }
        if let Some((offset, reason)) = segment.torn {
            let what = format!(
                "segment {} at byte {offset}: {reason} (a write that was never acknowledged)",
                segment.number
            );
            tracing::warn!(cut = %what, "cut the log's torn tail");
            recovered.torn = Some(what);
        }
    }
    recovered.last_lsn = last;
    if recovered.replayed > 0 {
        tracing::info!(
            records = recovered.replayed,
            through = last,
            "replayed the log into the database"
        );
    }
    make_durable().map_err(|reason| Error::Unavailable {
        message: format!("could not make the recovered database durable: {reason}"),
    })?;
    for (_, path) in &found {
        std::fs::remove_file(path).map_err(|e| io_error("delete a replayed log segment", &e))?;
    }
    if !found.is_empty() {
        segments::sync_dir(dir).map_err(|e| io_error("sync the log folder", &e))?;
    }
    Ok(recovered)
}

fn read_segment(number: u64, bytes: &[u8]) -> Option<SegmentRead> {
    let mut segment = SegmentRead {
        number,
        base: codec::read_segment_header(bytes)?,
        records: Vec::new(),
        torn: None,
    };
    let mut offset = codec::SEGMENT_HEADER;
    loop {
        match codec::read(bytes, offset) {
            Read::Record(record, next) => {
                segment.records.push(record);
                offset = next;
            }
            Read::End => return Some(segment),
            Read::Torn(reason) => {
                segment.torn = Some((offset, reason));
                return Some(segment);
            }
        }
    }
}

/// Takes out the write that sled holds only part of, if any: its image of
/// the values before is newer than the applied marker. Its record, if it
/// became durable, is replayed whole afterwards.
fn put_back_cut_write(
    db: &sled::Db,
    log_tree: &sled::Tree,
    trees: &mut HashMap<IVec, sled::Tree>,
    applied: u64,
) -> Result<(), Error> {
    // The single-key image of an earlier version is never newer than the
    // marker it was written with: forget it.
    log_tree.remove(b"undo").map_err(sled_error)?;
    let Some(image) = super::read_image(log_tree, applied)? else {
        return Ok(());
    };
    let image = match codec::read(&image, 0) {
        Read::Record(image, _) => image,
        Read::End | Read::Torn(_) => {
            return Err(Error::DataLoss {
                message: "the database's image of its last write does not parse; restore the \
                          data folder from a backup"
                    .into(),
            })
        }
    };
    tracing::info!(
        lsn = image.lsn,
        "took out a write the database held only part of"
    );
    put_values(db, trees, &image)?;
    log_tree.remove(super::image_head()).map_err(sled_error)?;
    Ok(())
}

fn apply(
    db: &sled::Db,
    log_tree: &sled::Tree,
    trees: &mut HashMap<IVec, sled::Tree>,
    record: &Record,
) -> Result<(), Error> {
    put_values(db, trees, record)?;
    // The marker goes last, as on the write path: a crash part way through
    // leaves it behind, and the record is applied again.
    log_tree
        .insert(APPLIED, &record.lsn.to_be_bytes()[..])
        .map_err(sled_error)?;
    Ok(())
}

/// Sets every key of `record` to the value it carries.
fn put_values(
    db: &sled::Db,
    trees: &mut HashMap<IVec, sled::Tree>,
    record: &Record,
) -> Result<(), Error> {
    for change in &record.changes {
        let tree = match trees.get(&change.tree) {
            Some(tree) => tree,
            None => {
                let tree = db.open_tree(&change.tree).map_err(sled_error)?;
                trees.entry(change.tree.clone()).or_insert(tree)
            }
        };
        match &change.value {
            Some(value) => tree.insert(&change.key, value.clone()),
            None => tree.remove(&change.key),
        }
        .map_err(sled_error)?;
    }
    Ok(())
}
