//! What a write does for the values it packs or drops: moving inline
//! bytes to a pack ([`pack_body`]), and keeping blob references while
//! noting the packed bytes a write leaves dead ([`swap`]).
//!
//! Packed values have no reference of their own: sled's cost per key
//! (its pages are rewritten whole and kept until half dead) would eat much
//! of what packs save. Compaction finds a pack's live values by scanning
//! the records instead (see `compact`).

use sled::transaction::UnabortableTransactionError;

use super::{PackLoc, PACK_MIN_BYTES};
use crate::engine::record::{Body, ValueRecord};
use crate::engine::sled::wal::{LoggedTree, LoggedTx};

type TxResult<T> = Result<T, UnabortableTransactionError>;

/// Where a record's packed bytes are, with their length.
pub fn packed(record: &ValueRecord) -> Option<(PackLoc, u64)> {
    match record.body {
        Body::Packed { pack, offset, .. } => Some((PackLoc { pack, offset }, record.body_len)),
        _ => None,
    }
}

/// Moves a record's inline bytes to a pack when they are long enough:
/// the write carries them to their place (see [`LoggedTx::pack`]).
pub fn pack_body(tx: &LoggedTx<'_>, record: &mut ValueRecord) {
    let Body::Inline(bytes) = &record.body else {
        return;
    };
    if bytes.len() < PACK_MIN_BYTES {
        return;
    }
    let crc = crc32fast::hash(bytes);
    if let Some(loc) = tx.pack(bytes) {
        record.body = Body::Packed {
            pack: loc.pack,
            offset: loc.offset,
            crc,
        };
    }
}

/// Updates the blob references (id → key) of the record under `key` as it
/// goes from `old` to `new`. Returns the bytes of a packed value it no
/// longer points at.
pub fn swap(
    refs: &LoggedTree<'_>,
    key: &[u8],
    old: Option<&ValueRecord>,
    new: Option<&ValueRecord>,
) -> TxResult<u64> {
    let new_blob = new.and_then(ValueRecord::blob_id);
    if let Some(id) = old.and_then(ValueRecord::blob_id) {
        if Some(id) != new_blob {
            refs.remove(id.to_be_bytes())?;
        }
    }
    if let Some(id) = new_blob {
        refs.insert(id.to_be_bytes(), key)?;
    }
    let new_pack = new.and_then(packed).map(|(loc, _)| loc);
    Ok(match old.and_then(packed) {
        Some((loc, len)) if Some(loc) != new_pack => len,
        _ => 0,
    })
}
