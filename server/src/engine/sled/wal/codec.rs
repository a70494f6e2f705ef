//! The byte format of the log.
//!
//! A segment starts with a 16-byte header: the magic `TROVEWAL` and the
//! *base*, the last sequence number that was durable when the segment was
//! started. Records of earlier segments numbered above a later segment's
//! base were never acknowledged (their flush failed) and are void.
//!
//! A record is `len: u32 LE`, `crc: u32 LE` (CRC-32 of the body), then a
//! body of `len` bytes: `lsn: u64 LE`, `count: u32 LE` and `count` changes,
//! each `tree: u16 LE + bytes`, `key: u32 LE + bytes`, `present: u8` and,
//! when present, `value: u32 LE + bytes` (a value bound for a pack is a
//! change to the tree named [`PACK_TREE`]). Segments are zero-filled before
//! use, so a zero length marks the end of the written part; a length that
//! runs past the segment or a body that fails its CRC is a torn record.

use sled::IVec;

/// The tree name under which a record carries a value for a pack: the key
/// is its place (`PackLoc::to_bytes`), the value its bytes. No sled tree of
/// the store has this name (they are ASCII words).
pub const PACK_TREE: &[u8] = b"\0pack";

/// Bytes of the segment header.
pub const SEGMENT_HEADER: usize = 16;
const MAGIC: &[u8; 8] = b"TROVEWAL";
/// Bytes before a record's body.
pub const RECORD_HEADER: usize = 8;

/// One change as the log keeps it: a tree, a key and the value left there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redo {
    /// Name of the sled tree.
    pub tree: IVec,
    /// The key.
    pub key: IVec,
    /// The value after the change; `None` when the key was removed.
    pub value: Option<IVec>,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number.
    pub lsn: u64,
    /// What it changed, in order.
    pub changes: Vec<Redo>,
}

/// The header of a segment whose records follow `base`.
pub fn segment_header(base: u64) -> [u8; SEGMENT_HEADER] {
    let mut header = [0u8; SEGMENT_HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..].copy_from_slice(&base.to_le_bytes());
    header
}

/// The base of a segment, or `None` when its header is not a log header.
pub fn read_segment_header(bytes: &[u8]) -> Option<u64> {
    if bytes.len() < SEGMENT_HEADER || &bytes[..8] != MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(bytes[8..16].try_into().ok()?))
}

/// The largest record body: lengths are 32-bit.
pub const MAX_BODY: usize = u32::MAX as usize;

/// A change set too large for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

/// Appends the record `lsn` carrying `changes` to `out`; on [`TooLarge`]
/// `out` is left as it was.
pub fn encode<'a>(
    out: &mut Vec<u8>,
    lsn: u64,
    changes: impl Iterator<Item = RedoRef<'a>>,
) -> Result<(), TooLarge> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER]);
    out.extend_from_slice(&lsn.to_le_bytes());
    let count_at = out.len();
    out.extend_from_slice(&[0u8; 4]);
    let mut count = 0u32;
    for change in changes {
        count = count.checked_add(1).ok_or(TooLarge)?;
        let fits = put(out, change.tree, 2)
            && put(out, change.key, 4)
            && match change.value {
                Some(value) => {
                    out.push(1);
                    put(out, value, 4)
                }
                None => {
                    out.push(0);
                    true
                }
            };
        if !fits || out.len() - start > MAX_BODY {
            out.truncate(start);
            return Err(TooLarge);
        }
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    let Ok(body_len) = u32::try_from(out.len() - start - RECORD_HEADER) else {
        out.truncate(start);
        return Err(TooLarge);
    };
    let crc = crc32fast::hash(&out[start + RECORD_HEADER..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// A borrowed change to encode.
#[derive(Debug, Clone, Copy)]
pub struct RedoRef<'a> {
    /// Name of the sled tree.
    pub tree: &'a [u8],
    /// The key.
    pub key: &'a [u8],
    /// The value left; `None` when removed.
    pub value: Option<&'a [u8]>,
}

/// Appends `bytes` after its length in `width` bytes; false when the
/// length does not fit.
fn put(out: &mut Vec<u8>, bytes: &[u8], width: usize) -> bool {
    let len = bytes.len() as u64;
    if width < 8 && len >> (width * 8) != 0 {
        return false;
    }
    out.extend_from_slice(&len.to_le_bytes()[..width]);
    out.extend_from_slice(bytes);
    true
}

/// What reading at an offset found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// A whole record, and the offset after it.
    Record(Record, usize),
    /// The written part ends here.
    End,
    /// The bytes here are not a whole record: a write cut short, or damage.
    Torn(&'static str),
}

/// Reads the record at `offset` of a segment's bytes.
pub fn read(segment: &[u8], offset: usize) -> Read {
    let Some(header) = segment.get(offset..offset + RECORD_HEADER) else {
        return Read::End;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 {
        return if crc == 0 {
            Read::End
        } else {
            Read::Torn("a record header with no body")
        };
    }
    let start = offset + RECORD_HEADER;
    let Some(body) = segment.get(start..start + len) else {
        return Read::Torn("a record longer than what remains of its segment");
    };
    if crc32fast::hash(body) != crc {
        return Read::Torn("a record that fails its checksum");
    }
    match decode_body(body) {
        Some(record) => Read::Record(record, start + len),
        None => Read::Torn("a record whose body does not parse"),
    }
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let mut cursor = Cursor { bytes: body, at: 0 };
    let lsn = u64::from_le_bytes(cursor.take(8)?.try_into().ok()?);
    let count = cursor.len(4)?;
    let mut changes = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let tree = IVec::from(cursor.field(2)?);
        let key = IVec::from(cursor.field(4)?);
        let value = match cursor.take(1)?[0] {
            0 => None,
            1 => Some(IVec::from(cursor.field(4)?)),
            _ => return None,
        };
        changes.push(Redo { tree, key, value });
    }
    (cursor.at == body.len()).then_some(Record { lsn, changes })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }

    fn len(&mut self, width: usize) -> Option<usize> {
        let mut raw = [0u8; 8];
        raw[..width].copy_from_slice(self.take(width)?);
        usize::try_from(u64::from_le_bytes(raw)).ok()
    }

    fn field(&mut self, width: usize) -> Option<&'a [u8]> {
        let n = self.len(width)?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(out: &mut Vec<u8>, lsn: u64) {
        let changes = [
            RedoRef {
                tree: b"artifacts",
                key: b"k1",
                value: Some(b"v1"),
            },
            RedoRef {
                tree: b"blob_refs",
                key: b"\0\0\0\0\0\0\0\x07",
                value: None,
            },
        ];
        encode(out, lsn, changes.into_iter()).expect("fits");
    }

    #[test]
    fn records_round_trip_and_the_zeroed_tail_ends_them() {
        let mut segment = Vec::new();
        sample(&mut segment, 7);
        sample(&mut segment, 8);
        segment.resize(segment.len() + 64, 0);
        let Read::Record(first, next) = read(&segment, 0) else {
            panic!("first record")
        };
        assert_eq!(first.lsn, 7);
        assert_eq!(first.changes.len(), 2);
        assert_eq!(first.changes[0].value.as_deref(), Some(&b"v1"[..]));
        assert_eq!(first.changes[1].value, None);
        let Read::Record(second, end) = read(&segment, next) else {
            panic!("second record")
        };
        assert_eq!(second.lsn, 8);
        assert_eq!(read(&segment, end), Read::End);
    }

    /// Every cut of a record and every flipped byte is found torn, never
    /// read as a record. (The bytes after a cut are not zero here: a cut
    /// followed by zeros that equal the missing bytes is the whole record.)
    #[test]
    fn torn_and_damaged_records_are_never_read() {
        let mut whole = Vec::new();
        sample(&mut whole, 1);
        for cut in 1..whole.len() {
            let mut segment = whole[..cut].to_vec();
            segment.resize(whole.len() + 16, 0xA5);
            assert!(
                matches!(read(&segment, 0), Read::Torn(_)),
                "cut at {cut} read as {:?}",
                read(&segment, 0)
            );
        }
        for at in 0..whole.len() {
            let mut segment = whole.clone();
            segment[at] ^= 0x40;
            assert!(
                !matches!(read(&segment, 0), Read::Record(..)),
                "flip at {at} read as a record"
            );
        }
    }

    #[test]
    fn segment_headers_carry_their_base() {
        assert_eq!(read_segment_header(&segment_header(42)), Some(42));
        assert_eq!(read_segment_header(&[0u8; 16]), None);
    }
}
