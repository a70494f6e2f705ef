//! Long JSON values that are not records (cassette entries, branch maps)
//! spill into packs too, leaving sled a pointer of [`POINTER_LEN`] bytes.
//!
//! Why: sled writes a log item larger than a quarter of its segment to a
//! file of its own, which its recovery after a power cut may find removed.
//! With every long value out of sled, no page it writes comes near that
//! size, so its segments can be small (which is what keeps its space on
//! disk down; see `durable::SLED_SEGMENT_BYTES`).
//!
//! The stored value tells the two apart by its first byte: JSON text never
//! starts with a NUL byte, a pointer always does. Values stored before
//! spilling existed are JSON and read as they are.

use sled::IVec;

use super::{PackLoc, Packs, ReadError};
use crate::engine::sled::wal::LoggedTx;

/// JSON values at least this long spill into a pack. Shorter ones stay in
/// sled, where sled's pages (at most about 17 values each) stay far under
/// its item size limit; cassette reads then need no extra read per entry
/// for the common small interaction.
pub const SPILL_MIN_BYTES: usize = 8 * 1024;

/// The first byte of a pointer: never the first byte of JSON text.
const TAG: u8 = 0;
/// Tag, pack, offset, length and CRC-32.
pub const POINTER_LEN: usize = 1 + 8 + 8 + 8 + 4;

/// Where a spilled value's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spilled {
    /// The place in its pack.
    pub loc: PackLoc,
    /// Its length in bytes.
    pub len: u64,
    /// CRC-32 of the bytes.
    pub crc: u32,
}

impl Spilled {
    /// The pointer a stored value holds, if it holds one.
    pub fn decode(value: &[u8]) -> Option<Self> {
        if value.len() != POINTER_LEN || value[0] != TAG {
            return None;
        }
        let loc = PackLoc::from_bytes(&value[1..17])?;
        let len = u64::from_be_bytes(value[17..25].try_into().ok()?);
        let crc = u32::from_be_bytes(value[25..29].try_into().ok()?);
        Some(Spilled { loc, len, crc })
    }

    /// The stored form of this pointer.
    pub fn encode(&self) -> [u8; POINTER_LEN] {
        let mut out = [0u8; POINTER_LEN];
        out[0] = TAG;
        out[1..17].copy_from_slice(&self.loc.to_bytes());
        out[17..25].copy_from_slice(&self.len.to_be_bytes());
        out[25..29].copy_from_slice(&self.crc.to_be_bytes());
        out
    }
}

/// What to store for `json` in a logged write: a pointer to a pack place
/// the write carries the bytes to, or the bytes themselves when short (or
/// when this store keeps no packs).
pub fn store(tx: &LoggedTx<'_>, json: &[u8]) -> IVec {
    if json.len() < SPILL_MIN_BYTES {
        return IVec::from(json);
    }
    let crc = crc32fast::hash(json);
    match tx.pack(json) {
        Some(loc) => IVec::from(
            &Spilled {
                loc,
                len: json.len() as u64,
                crc,
            }
            .encode()[..],
        ),
        None => IVec::from(json),
    }
}

/// Whether two stored values stand for the same bytes: equal, or pointers
/// to bytes of the same length and checksum (a value compaction moved).
pub fn same_value(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    match (Spilled::decode(a), Spilled::decode(b)) {
        (Some(a), Some(b)) => a.len == b.len && a.crc == b.crc,
        _ => false,
    }
}

/// The length of the value a stored value stands for.
pub fn logical_len(value: &[u8]) -> u64 {
    Spilled::decode(value).map_or(value.len() as u64, |s| s.len)
}

/// The pack bytes a value that was replaced or removed leaves dead.
pub fn spill_len(old: Option<IVec>) -> u64 {
    old.as_deref()
        .and_then(Spilled::decode)
        .map_or(0, |spilled| spilled.len)
}

/// The bytes a stored value stands for. `Ok(None)` when its pack is gone
/// (compacted since the value was read: read it again).
pub fn load(packs: &Packs, value: IVec) -> Result<Option<IVec>, ReadError> {
    match Spilled::decode(&value) {
        None => Ok(Some(value)),
        Some(spilled) => Ok(packs
            .read(spilled.loc, spilled.len, spilled.crc)?
            .map(IVec::from)),
    }
}

/// The status of a spilled value that cannot be read: `kind` and
/// `display_key` name it.
pub fn load_error(kind: &str, display_key: &str, err: ReadError) -> trove_proto::Error {
    crate::engine::sled::read::pack_error(kind, display_key, err)
}

/// Reads `key` of `tree` and the bytes its value stands for, reading the
/// key again when compaction moved them meanwhile. `Ok(None)` when the key
/// is absent. Blocking.
pub fn get(
    packs: &Packs,
    tree: &sled::Tree,
    key: &[u8],
    kind: &str,
    display_key: &str,
) -> Result<Option<IVec>, trove_proto::Error> {
    let mut missing: Option<PackLoc> = None;
    loop {
        let Some(value) = tree.get(key).map_err(crate::engine::sled::sled_error)? else {
            return Ok(None);
        };
        let Some(spilled) = Spilled::decode(&value) else {
            return Ok(Some(value));
        };
        match packs.read(spilled.loc, spilled.len, spilled.crc) {
            Ok(Some(bytes)) => return Ok(Some(IVec::from(bytes))),
            // Gone for good if the key still points there.
            Ok(None) if missing == Some(spilled.loc) => {
                return Err(crate::engine::sled::read::pack_gone(
                    kind,
                    display_key,
                    spilled.loc,
                ))
            }
            Ok(None) => missing = Some(spilled.loc),
            Err(err) => return Err(load_error(kind, display_key, err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pointer_reads_back_and_json_is_never_one() {
        let spilled = Spilled {
            loc: PackLoc {
                pack: 7,
                offset: 1 << 33,
            },
            len: 123_456,
            crc: 0xdead_beef,
        };
        let stored = spilled.encode();
        assert_eq!(Spilled::decode(&stored), Some(spilled));
        assert_eq!(logical_len(&stored), 123_456);
        // Any JSON text, even one exactly as long as a pointer.
        let json = br#"{"a":"012345678901234567890"}"#;
        assert_eq!(json.len(), POINTER_LEN);
        assert_eq!(Spilled::decode(json), None);
        assert_eq!(logical_len(json), POINTER_LEN as u64);
        assert_eq!(Spilled::decode(b""), None);
    }
}
