//! Applying a logged write to sled between its undo image and the applied
//! marker, and encoding its redo record and its undo.

use sled::IVec;
use trove_proto::Error;

use super::codec::{self, RedoRef, PACK_TREE};
use super::logged::TreeChanges;
use super::writer::undo_one;
use super::{sled_error, Undo, APPLIED, IMAGES, IMAGE_RING, UNDO_IMAGE};
use crate::engine::sled::io_error;
use crate::engine::sled::packs::{PackLoc, Packs};

/// The largest piece of an undo image stored as one sled value: small
/// enough that a leaf of pieces stays far under a quarter of sled's segment
/// (sled writes a larger item to a file of its own that it never syncs;
/// see `durable::SLED_SEGMENT_BYTES`).
const IMAGE_PIECE_BYTES: usize = 8 * 1024;

/// The key of piece `index` of the undo image of write `lsn`, for an image
/// that does not go to the ring (see [`IMAGE_RING_SLOTS`]): kept until a
/// checkpoint covers the write. A start that finds sled ahead of the
/// durable log takes every write beyond it out again from its image.
pub(super) fn image_key(lsn: u64, index: u32) -> Vec<u8> {
    let mut key = IMAGES.to_vec();
    key.extend_from_slice(&lsn.to_be_bytes());
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// Slots in the ring of undo images. A write whose image fits one piece
/// stores it in slot `lsn % IMAGE_RING_SLOTS`, over the image of a write at
/// least that many LSNs older, provided that write is settled (durable or
/// undone): no start can need its image any more. Overwriting a fixed set of
/// keys costs sled far less space than a key per write removed at the next
/// checkpoint: 10^5 puts of 1 KiB left sled about 12 MB smaller. A write
/// whose slot is still needed, or whose image takes several pieces, keeps
/// image keys of its own.
pub(super) const IMAGE_RING_SLOTS: u64 = 1024;

/// The key of the ring slot for write `lsn`.
pub(super) fn ring_key(lsn: u64) -> Vec<u8> {
    let mut key = IMAGE_RING.to_vec();
    let slot = u32::try_from(lsn % IMAGE_RING_SLOTS).unwrap_or_default();
    key.extend_from_slice(&slot.to_be_bytes());
    key
}

/// The LSN of the write whose image starts with `first_piece` (a ring
/// slot's value, or piece 0).
pub(super) fn image_lsn(first_piece: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(first_piece.get(4..12)?.try_into().ok()?))
}

/// The write and piece an image key names.
pub(super) fn parse_image_key(key: &[u8]) -> Option<(u64, u32)> {
    let rest = key.strip_prefix(IMAGES)?;
    let lsn = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let index = u32::from_be_bytes(rest.get(8..12)?.try_into().ok()?);
    Some((lsn, index))
}

/// Assembles an image from its pieces (piece 0 first; it starts with the
/// number of pieces and the write's LSN). `None` when piece 0 is missing:
/// the write was cut before it began changing sled.
pub(super) fn assemble_image(
    mut piece: impl FnMut(u32) -> Result<Option<IVec>, Error>,
) -> Result<Option<Vec<u8>>, Error> {
    let Some(first) = piece(0)? else {
        return Ok(None);
    };
    let damaged = || Error::DataLoss {
        message: "the database's image of a write is incomplete; restore the data folder from a \
                  backup"
            .into(),
    };
    let (count, rest) = first.split_first_chunk::<4>().ok_or_else(damaged)?;
    let (_lsn, head) = rest.split_first_chunk::<8>().ok_or_else(damaged)?;
    let mut image = head.to_vec();
    for index in 1..u32::from_be_bytes(*count) {
        image.extend_from_slice(&piece(index)?.ok_or_else(damaged)?);
    }
    Ok(Some(image))
}

/// The key of piece `index` of the single undo image older versions kept.
fn legacy_image_key(index: u32) -> Vec<u8> {
    let mut key = UNDO_IMAGE.to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// Reads back the undo image an older version left, if it belongs to a
/// write newer than `applied` (else it is stale: its other pieces may have
/// been overwritten since).
pub(in crate::engine::sled) fn read_legacy_image(
    log_tree: &sled::Tree,
    applied: u64,
) -> Result<Option<Vec<u8>>, Error> {
    let Some(first) = log_tree.get(legacy_image_key(0)).map_err(sled_error)? else {
        return Ok(None);
    };
    if first
        .get(4..12)
        .and_then(|lsn| lsn.try_into().ok())
        .map(u64::from_be_bytes)
        .is_some_and(|lsn| lsn <= applied)
    {
        return Ok(None);
    }
    assemble_image(|index| log_tree.get(legacy_image_key(index)).map_err(sled_error))
}

/// Every key of the image an older version left.
pub(in crate::engine::sled) fn legacy_image_keys(log_tree: &sled::Tree) -> Vec<IVec> {
    log_tree
        .scan_prefix(UNDO_IMAGE)
        .keys()
        .filter_map(Result::ok)
        .collect()
}

/// The key whose removal forgets the undo image of write `lsn` (piece 0
/// names the others).
pub(in crate::engine::sled) fn image_head(lsn: u64) -> Vec<u8> {
    image_key(lsn, 0)
}

/// Why [`apply`] failed, and whether sled was put back.
#[derive(Debug)]
pub(super) struct ApplyFailed {
    pub(super) error: Error,
    pub(super) undone: bool,
}

/// Applies a write: first its packed values to their places, then its
/// `changes` to sled between two writes of the log's own tree: first the
/// values before (its image: in its ring slot when `ring_slot_free` and it
/// fits one piece, else in pieces, piece 0 last), last the applied marker.
/// sled recovers a prefix of its own log, so after a
/// crash either the marker says the whole write is in, or the image is
/// there to take a partial write out again ([`replay`]); a write whose
/// record is durable is then replayed whole. When sled fails part way,
/// what was applied is put back.
pub(super) fn apply(
    trees: &[sled::Tree],
    changes: &[TreeChanges],
    packed: &[(PackLoc, IVec)],
    packs: Option<&Packs>,
    log_tree: &sled::Tree,
    lsn: u64,
    ring_slot_free: bool,
) -> Result<(), ApplyFailed> {
    let failed = |error: Error| ApplyFailed {
        error,
        undone: true,
    };
    // Before any pointer to them is in sled: a reader that finds the
    // pointer finds the bytes.
    if let Some(packs) = packs {
        for (loc, bytes) in packed {
            packs
                .write_at(*loc, bytes)
                .map_err(|e| failed(io_error("write a value to its pack", &e)))?;
        }
    }
    let names: Vec<IVec> = trees.iter().map(sled::Tree::name).collect();
    let before = changes.iter().zip(&names).flat_map(|(tree, name)| {
        tree.iter().map(move |(key, change)| RedoRef {
            tree: name,
            key,
            value: change.before.as_deref(),
        })
    });
    let mut image = Vec::new();
    codec::encode(&mut image, lsn, before).map_err(|_| failed(too_large()))?;
    let pieces: Vec<&[u8]> = image.chunks(IMAGE_PIECE_BYTES).collect();
    let count = u32::try_from(pieces.len()).map_err(|_| failed(too_large()))?;
    for (index, piece) in (1..count).zip(&pieces[1..]) {
        log_tree
            .insert(image_key(lsn, index), *piece)
            .map_err(|e| failed(sled_error(e)))?;
    }
    let mut first = count.to_be_bytes().to_vec();
    first.extend_from_slice(&lsn.to_be_bytes());
    first.extend_from_slice(pieces.first().copied().unwrap_or_default());
    let head = if ring_slot_free && count <= 1 {
        ring_key(lsn)
    } else {
        image_key(lsn, 0)
    };
    log_tree
        .insert(head, first)
        .map_err(|e| failed(sled_error(e)))?;
    let applied = (|| -> Result<(), sled::Error> {
        for (tree, changes) in trees.iter().zip(changes) {
            for (key, change) in changes {
                match &change.after {
                    Some(value) => tree.insert(key, value.clone())?,
                    None => tree.remove(key)?,
                };
            }
        }
        log_tree.insert(APPLIED, &lsn.to_be_bytes()[..])?;
        Ok(())
    })();
    let Err(err) = applied else {
        return Ok(());
    };
    let undo = undo_of(lsn, trees, changes.to_vec());
    match undo_one(log_tree, None, &undo) {
        Ok(()) => Err(failed(sled_error(err))),
        Err(undo_error) => Err(ApplyFailed {
            error: Error::Unavailable {
                message: format!(
                    "the database failed part way through a write ({err}) and putting it back \
                     failed too ({undo_error}); restart the server"
                ),
            },
            undone: false,
        }),
    }
}

fn too_large() -> Error {
    Error::invalid(
        "request",
        "it changes more than 4 GiB at once; send it in smaller parts",
    )
}

/// Encodes the record `lsn` (the values after, then the packed values
/// with their places) into `out`.
pub(super) fn encode_redo(
    out: &mut Vec<u8>,
    lsn: u64,
    trees: &[sled::Tree],
    changes: &[TreeChanges],
    packed: &[(PackLoc, IVec)],
) -> Result<(), Error> {
    let names: Vec<IVec> = trees.iter().map(sled::Tree::name).collect();
    let places: Vec<[u8; 16]> = packed.iter().map(|(loc, _)| loc.to_bytes()).collect();
    let redo = changes
        .iter()
        .zip(&names)
        .flat_map(|(tree, name)| {
            tree.iter().map(move |(key, change)| RedoRef {
                tree: name,
                key,
                value: change.after.as_deref(),
            })
        })
        .chain(
            packed
                .iter()
                .zip(&places)
                .map(|((_, bytes), place)| RedoRef {
                    tree: PACK_TREE,
                    key: place,
                    value: Some(bytes),
                }),
        );
    codec::encode(out, lsn, redo).map_err(|_| too_large())
}

/// How to undo the write `lsn`: its values before, per tree that changed.
pub(super) fn undo_of(lsn: u64, trees: &[sled::Tree], changes: Vec<TreeChanges>) -> Undo {
    let mut undo = Undo {
        lsn,
        trees: Vec::new(),
        before: Vec::new(),
    };
    for (tree, changes) in trees.iter().zip(changes) {
        if changes.is_empty() {
            continue;
        }
        undo.trees.push(tree.clone());
        undo.before.push(
            changes
                .into_iter()
                .map(|(key, change)| (key, change.before))
                .collect(),
        );
    }
    undo
}
