//! Recovery: bring sled to exactly the end of the durable log.
//!
//! sled holds every change up to its applied marker, and may hold more
//! than the log: it writes its buffers out on its own, so a change whose
//! record never became durable can survive a power cut in sled. Such a
//! change was never acknowledged, and it may point at pack bytes that were
//! never synced, so it is taken out: every write newer than both the
//! marker and the durable log's end (or newer than the marker and cut part
//! way) is put back from its image, newest first. Then records after the
//! marker are applied in order, each followed by the marker, so a crash
//! during recovery only repeats work, and every record after the last
//! checkpoint puts its packed values back at their places (packs are
//! synced only by checkpoints). A record of an older segment numbered
//! above a newer segment's base was undone before the crash and is
//! skipped. The first record that is not whole ends the log: it is
//! reported and cut, never applied. Finally the packs and sled are made
//! durable and every segment is deleted; the log restarts on a fresh one.

use std::collections::HashMap;
use std::path::Path;

use sled::IVec;
use trove_proto::Error;

use super::apply::{assemble_image, image_key, image_lsn, legacy_image_keys, parse_image_key};
use super::codec::{self, Read, Record, PACK_TREE};
use super::{segments, APPLIED, IMAGES, IMAGE_RING};
use crate::engine::sled::packs::{PackLoc, Packs};
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

/// Records replayed between two writes of sled's buffers.
const REPLAY_WRITE_OUT_EVERY: u64 = 1024;

/// Replays the log in `dir` into `db`, and packed values into `packs`.
/// `make_durable` flushes and syncs sled; it runs before the replayed
/// segments are deleted.
pub fn recover(
    db: &sled::Db,
    log_tree: &sled::Tree,
    dir: &Path,
    packs: Option<&Packs>,
    make_durable: impl FnOnce() -> Result<(), String>,
) -> Result<Recovered, Error> {
    std::fs::create_dir_all(dir).map_err(|e| io_error("create the log folder", &e))?;
    if let Some(parent) = dir.parent() {
        segments::sync_dir(parent).map_err(|e| io_error("sync the data folder", &e))?;
    }
    let mut trees: HashMap<IVec, sled::Tree> = HashMap::new();
    put_back_legacy_image(db, log_tree, &mut trees)?;
    let checkpointed = super::checkpointed(log_tree)?;
    let found = segments::list(dir).map_err(|e| io_error("list the log", &e))?;
    // A process killed after writing records but before their sync left
    // them in the page cache only: sync them before trusting them (images
    // of the writes they carry are dropped below).
    for (_, path) in &found {
        std::fs::File::open(path)
            .and_then(|file| file.sync_data())
            .map_err(|e| io_error("sync the log before replaying it", &e))?;
    }
    let mut reads = Vec::with_capacity(found.len());
    for (number, path) in &found {
        let bytes = std::fs::read(path).map_err(|e| io_error("read the log", &e))?;
        // A segment whose header never became durable holds nothing that
        // was acknowledged.
        reads.extend(read_segment(*number, &bytes));
    }
    let durable_end = reads
        .iter()
        .enumerate()
        .flat_map(|(index, segment)| {
            let limit = reads.get(index + 1).map_or(u64::MAX, |next| next.base);
            segment
                .records
                .iter()
                .map(|r| r.lsn)
                .filter(move |&lsn| lsn <= limit)
        })
        .max()
        .unwrap_or(0)
        .max(checkpointed);
    let applied = put_back_undurable(db, log_tree, &mut trees, durable_end)?;
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
            apply(db, log_tree, &mut trees, packs, record)?;
            last = record.lsn;
            recovered.replayed += 1;
            // Writes sled's buffers out now and then, as the checkpoint
            // thread does while serving (see `durable::CHECKPOINT_POLL`):
            // sled 0.34 can stall when many sealed buffers queue up.
            if recovered.replayed % REPLAY_WRITE_OUT_EVERY == 0 {
                db.flush().map_err(sled_error)?;
            }
        }
        // Records sled already holds still put their packed values back:
        // only a checkpoint syncs packs.
        for record in &segment.records {
            if record.lsn > checkpointed && record.lsn <= applied && record.lsn <= limit {
                put_packed(packs, record)?;
            }
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
    super::forget_all_images(log_tree)?;
    if let Some(packs) = packs {
        packs
            .find_tail()
            .and_then(|()| packs.sync())
            .map_err(|e| io_error("sync the value packs after replay", &e))?;
    }
    // Only after the packs are synced: the segments are deleted below.
    log_tree
        .insert(super::CHECKPOINTED, &last.to_be_bytes()[..])
        .map_err(sled_error)?;
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

/// Takes out the write an older version's store holds only part of, if
/// any (its single image is newer than the applied marker), and forgets
/// that image. Its record, if it became durable, is replayed whole
/// afterwards.
fn put_back_legacy_image(
    db: &sled::Db,
    log_tree: &sled::Tree,
    trees: &mut HashMap<IVec, sled::Tree>,
) -> Result<(), Error> {
    let applied = super::applied(log_tree)?;
    if let Some(image) = super::read_legacy_image(log_tree, applied)? {
        let image = parse_image(&image)?;
        tracing::info!(
            lsn = image.lsn,
            "took out a write the database held only part of"
        );
        put_values(db, trees, None, &image)?;
    }
    for key in legacy_image_keys(log_tree) {
        log_tree.remove(key).map_err(sled_error)?;
    }
    Ok(())
}

fn parse_image(image: &[u8]) -> Result<Record, Error> {
    match codec::read(image, 0) {
        Read::Record(image, _) => Ok(image),
        Read::End | Read::Torn(_) => Err(Error::DataLoss {
            message: "the database's image of a write does not parse; restore the data folder \
                      from a backup"
                .into(),
        }),
    }
}

/// Puts back, newest first, every write that sled holds (all of it, or the
/// part a crash left) beyond its applied marker or beyond `durable_end`,
/// and returns the applied marker after that. Writes that changed nothing
/// have no image; they need no putting back.
fn put_back_undurable(
    db: &sled::Db,
    log_tree: &sled::Tree,
    trees: &mut HashMap<IVec, sled::Tree>,
    durable_end: u64,
) -> Result<u64, Error> {
    let applied = super::applied(log_tree)?;
    let keep = applied.min(durable_end);
    let start = image_key(keep.saturating_add(1), 0);
    let mut end = IMAGES.to_vec();
    end.push(0xFF);
    // Each write beyond `keep` with its image: from a ring slot (whole), or
    // `None` for one kept in pieces of its own.
    let mut writes: Vec<(u64, Option<IVec>)> = Vec::new();
    for key in log_tree.range(start..end).keys() {
        let key = key.map_err(sled_error)?;
        if let Some((lsn, 0)) = parse_image_key(&key) {
            writes.push((lsn, None));
        }
    }
    for slot in log_tree.scan_prefix(IMAGE_RING).values() {
        let slot = slot.map_err(sled_error)?;
        match image_lsn(&slot) {
            Some(lsn) if lsn > keep => writes.push((lsn, Some(slot))),
            _ => {}
        }
    }
    writes.sort_by_key(|(lsn, _)| *lsn);
    for (lsn, slot) in writes.iter().rev() {
        let image = match slot {
            Some(slot) => assemble_image(|index| Ok((index == 0).then(|| slot.clone())))?,
            None => {
                assemble_image(|index| log_tree.get(image_key(*lsn, index)).map_err(sled_error))?
            }
        };
        // Without piece 0 the write never began changing sled.
        let Some(image) = image else { continue };
        put_values(db, trees, None, &parse_image(&image)?)?;
    }
    if writes.is_empty() {
        return Ok(applied);
    }
    tracing::info!(
        writes = writes.len(),
        through = keep,
        "took out writes the database held beyond the durable log"
    );
    if applied != keep {
        log_tree
            .insert(APPLIED, &keep.to_be_bytes()[..])
            .map_err(sled_error)?;
    }
    Ok(keep)
}

/// Puts the packed values `record` carries at their places.
fn put_packed(packs: Option<&Packs>, record: &Record) -> Result<(), Error> {
    for change in record.changes.iter().filter(|c| c.tree == PACK_TREE) {
        write_packed(packs, &change.key, change.value.as_deref())?;
    }
    Ok(())
}

fn write_packed(packs: Option<&Packs>, place: &[u8], bytes: Option<&[u8]>) -> Result<(), Error> {
    let (Some(loc), Some(bytes)) = (PackLoc::from_bytes(place), bytes) else {
        return Err(Error::DataLoss {
            message: "a log record carries a packed value without its place or bytes; restore \
                      the data folder from a backup"
                .into(),
        });
    };
    let Some(packs) = packs else {
        return Err(Error::internal(
            "the log carries packed values but the store opened no packs",
        ));
    };
    packs
        .write_at(loc, bytes)
        .map_err(|e| io_error("put a logged value back in its pack", &e))
}

fn apply(
    db: &sled::Db,
    log_tree: &sled::Tree,
    trees: &mut HashMap<IVec, sled::Tree>,
    packs: Option<&Packs>,
    record: &Record,
) -> Result<(), Error> {
    put_values(db, trees, packs, record)?;
    // The marker goes last, as on the write path: a crash part way through
    // leaves it behind, and the record is applied again.
    log_tree
        .insert(APPLIED, &record.lsn.to_be_bytes()[..])
        .map_err(sled_error)?;
    Ok(())
}

/// Sets every key of `record` to the value it carries, packed values
/// first (as on the write path).
fn put_values(
    db: &sled::Db,
    trees: &mut HashMap<IVec, sled::Tree>,
    packs: Option<&Packs>,
    record: &Record,
) -> Result<(), Error> {
    put_packed(packs, record)?;
    for change in record.changes.iter().filter(|c| c.tree != PACK_TREE) {
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
