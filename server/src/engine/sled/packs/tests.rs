//! Packs on their own: places, reads checked against their CRC, sealing,
//! and the tail found again after a restart.

use super::*;

#[test]
fn values_are_placed_back_to_back_and_read_back_checked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let packs = Packs::open(dir.path(), PACK_BYTES).expect("open");
    let first = packs.reserve(5);
    let second = packs.reserve(3);
    assert_eq!(first, PackLoc { pack: 1, offset: 0 });
    assert_eq!(second, PackLoc { pack: 1, offset: 5 });
    packs.write_at(first, b"hello").expect("write");
    packs.write_at(second, b"abc").expect("write");
    let crc = crc32fast::hash(b"abc");
    assert_eq!(
        packs.read(second, 3, crc).expect("read"),
        Some(b"abc".to_vec())
    );
    match packs.read(first, 5, crc) {
        Err(ReadError::Damaged { reason }) => assert!(reason.contains("checksum"), "{reason}"),
        other => panic!("a wrong checksum was not reported: {other:?}"),
    }
    match packs.read(PackLoc { pack: 1, offset: 6 }, 5, crc) {
        Err(ReadError::Damaged { reason }) => assert!(reason.contains("ends at byte"), "{reason}"),
        other => panic!("a read past the end was not reported: {other:?}"),
    }
    assert_eq!(
        packs
            .read(PackLoc { pack: 9, offset: 0 }, 1, 0)
            .expect("read"),
        None,
        "a pack that is gone reads as gone"
    );
    packs.sync().expect("sync");
}

#[test]
fn a_full_pack_is_sealed_and_the_tail_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let packs = Packs::open(dir.path(), PACK_BYTES).expect("open");
        let big = packs.reserve(PACK_BYTES - 10);
        packs.write_at(big, &[1]).expect("write");
        let next = packs.reserve(20);
        assert_eq!(
            next,
            PackLoc { pack: 2, offset: 0 },
            "20 bytes do not fit in the rest"
        );
        packs.write_at(next, &[7u8; 20]).expect("write");
        assert_eq!(packs.sealed().expect("sealed").len(), 1);
        packs.sync().expect("sync");
    }
    let packs = Packs::open(dir.path(), PACK_BYTES).expect("reopen");
    assert_eq!(
        packs.reserve(4),
        PackLoc {
            pack: 2,
            offset: 20
        }
    );
    packs.remove(1).expect("remove");
    assert!(packs.sealed().expect("sealed").is_empty());
    assert!(!dir.path().join(file_name(1)).exists());
}

#[test]
fn only_so_many_packs_stay_open_and_the_others_are_opened_to_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let packs = Packs::open(dir.path(), 10).expect("open");
    let count = OPEN_PACKS as u64 + 72;
    let places: Vec<PackLoc> = (0..count)
        .map(|i| {
            let loc = packs.reserve(10);
            packs
                .write_at(loc, &[i.to_le_bytes()[0]; 10])
                .expect("write");
            // As checkpoints do: a pack with unsynced writes stays open.
            if i % 16 == 15 {
                packs.sync().expect("sync");
            }
            loc
        })
        .collect();
    assert_eq!(
        places.last().map(|loc| loc.pack),
        Some(count),
        "one pack per value"
    );
    assert!(packs.lock_files().len() <= OPEN_PACKS + 16);
    packs.sync().expect("sync");
    for (i, loc) in places.iter().enumerate() {
        let bytes = [i.to_le_bytes()[0]; 10];
        let read = packs.read(*loc, 10, crc32fast::hash(&bytes)).expect("read");
        assert_eq!(read, Some(bytes.to_vec()), "pack {}", loc.pack);
    }
    assert!(packs.lock_files().len() <= OPEN_PACKS);
    packs.sync().expect("sync");
    assert_eq!(packs.sealed().expect("sealed").len() as u64, count - 1);
}
