//! The log on its own: group commit, replay into an empty database, torn
//! tails, and undo after a failed `fdatasync`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::logged::TreeChanges;
use super::*;

struct Opened {
    db: sled::Db,
    data: sled::Tree,
    wal: Wal,
    packs: Arc<Packs>,
    /// How often the log asked for sled to be made durable (after undos).
    durable_flushes: Arc<std::sync::atomic::AtomicU64>,
}

/// Opens sled in `dir`. A database dropped just before may still be held
/// for a moment by sled's I/O threads finishing its last writes: the open
/// is tried again for a few seconds.
fn open_sled(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::Config::new().path(dir.join("db")).open() {
            Ok(db) => return db,
            Err(err)
                if err.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(err) => panic!("open sled: {err}"),
        }
    }
}

fn open(dir: &Path, faults: Option<Arc<Faults>>) -> Opened {
    let db = open_sled(dir);
    let data = db.open_tree("data").expect("tree");
    let log_tree = db.open_tree(LOG_TREE).expect("log tree");
    let packs = Arc::new(
        Packs::open(&dir.join("packs"), crate::engine::sled::packs::PACK_BYTES).expect("packs"),
    );
    let recovered =
        recover(&db, &log_tree, &dir.join("log"), Some(&packs), || Ok(())).expect("recover");
    let flushed = db.clone();
    let durable_flushes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Arc::clone(&durable_flushes);
    let make_durable: MakeDurable = Box::new(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        flushed.flush().map(|_| ()).map_err(|e| e.to_string())
    });
    let wal = Wal::start(
        log_tree,
        dir.join("log"),
        &recovered,
        faults,
        make_durable,
        Some(Arc::clone(&packs)),
    )
    .expect("start");
    Opened {
        db,
        data,
        wal,
        packs,
        durable_flushes,
    }
}

fn put(opened: &Opened, key: &str, value: &str) -> Result<(), Error> {
    opened.wal.write(&[&opened.data], |tx| {
        tx.tree(0).insert(key.as_bytes(), value.as_bytes())?;
        Ok(())
    })
}

/// A copy of the log folder replayed into a database that lost everything:
/// what the lost database would have recovered.
fn replay_copy(log: &Path) -> (tempfile::TempDir, sled::Db) {
    let copy = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(copy.path().join("log")).expect("log dir");
    for entry in std::fs::read_dir(log).expect("log") {
        let entry = entry.expect("entry");
        std::fs::copy(
            entry.path(),
            copy.path().join("log").join(entry.file_name()),
        )
        .expect("copy");
    }
    let db = sled::Config::new()
        .path(copy.path().join("db"))
        .open()
        .expect("open copy");
    let log_tree = db.open_tree(LOG_TREE).expect("log tree");
    let packs = Packs::open(
        &copy.path().join("packs"),
        crate::engine::sled::packs::PACK_BYTES,
    )
    .expect("packs");
    recover(
        &db,
        &log_tree,
        &copy.path().join("log"),
        Some(&packs),
        || Ok(()),
    )
    .expect("replay");
    (copy, db)
}

fn value(db: &sled::Db, key: &str) -> Option<String> {
    db.open_tree("data")
        .expect("tree")
        .get(key)
        .expect("get")
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Concurrent writers share `fdatasync`s: far fewer groups than writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_one_fdatasync() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = Arc::new(open(dir.path(), None));
    let before = opened.wal.groups();
    let writes: Vec<_> = (0..200)
        .map(|i| {
            let opened = Arc::clone(&opened);
            tokio::spawn(async move {
                let ticket = opened.wal.ticket();
                let o = Arc::clone(&opened);
                tokio::task::spawn_blocking(move || put(&o, &format!("k{i}"), "v"))
                    .await
                    .expect("join")?;
                opened.wal.barrier(ticket).await
            })
        })
        .collect();
    for write in writes {
        write.await.expect("join").expect("durable");
    }
    let groups = opened.wal.groups() - before;
    assert!(groups < 200, "{groups} fdatasyncs for 200 writes");
}

/// A database that lost everything since the log started gets every
/// acknowledged change back from the log, in order, removals included.
#[tokio::test]
async fn the_log_alone_rebuilds_the_database() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = open(dir.path(), None);
    for i in 0..100 {
        put(&opened, &format!("k{i}"), &format!("v{i}")).expect("put");
    }
    put(&opened, "k7", "overwritten").expect("put");
    opened
        .wal
        .write(&[&opened.data], |tx| {
            tx.tree(0).remove("k8")?;
            Ok(())
        })
        .expect("remove");
    opened.wal.barrier(1).await.expect("durable");
    let (_copy, db) = replay_copy(&dir.path().join("log"));
    assert_eq!(value(&db, "k0").as_deref(), Some("v0"));
    assert_eq!(value(&db, "k99").as_deref(), Some("v99"));
    assert_eq!(value(&db, "k7").as_deref(), Some("overwritten"));
    assert_eq!(value(&db, "k8"), None);
    assert_eq!(
        applied(&db.open_tree(LOG_TREE).expect("log tree")).expect("applied"),
        opened.wal.durable_lsn()
    );
    drop(opened.db);
}

/// Writes past a segment's end go on in the next segment, and a replay of
/// the folder reads them all, skipping a spare that is named but was never
/// begun (as a power cut after naming it leaves it).
#[tokio::test]
async fn writes_roll_into_the_next_segment_and_replay_skips_an_unbegun_spare() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = open(dir.path(), None);
    let value_bytes = 512 * 1024;
    let count = 2 * usize::try_from(segments::SEGMENT_BYTES).expect("fits") / value_bytes + 1;
    for i in 0..count {
        let ticket = opened.wal.ticket();
        put(
            &opened,
            &format!("k{i}"),
            &format!("{i:08}").repeat(value_bytes / 8),
        )
        .expect("put");
        opened.wal.barrier(ticket).await.expect("durable");
    }
    let log = dir.path().join("log");
    let begun = segments::list(&log)
        .expect("list")
        .into_iter()
        .filter(|(_, path)| {
            codec::read_segment_header(&std::fs::read(path).expect("read")).is_some()
        })
        .count();
    assert!(
        begun >= 3,
        "{count} writes of {value_bytes} B began {begun} segments"
    );
    // Closed first: its own spare is prepared under the same temporary name.
    let Opened {
        db: closed, wal, ..
    } = opened;
    drop(wal);
    drop(closed);
    segments::prepare_named(&log, 64 * 1024, 1_000_000).expect("unbegun spare");
    let (_copy, db) = replay_copy(&log);
    for i in 0..count {
        let got = value(&db, &format!("k{i}")).expect("replayed");
        assert_eq!(got, format!("{i:08}").repeat(value_bytes / 8), "k{i}");
    }
}

/// Bytes after the last whole record (a write cut short) are reported and
/// never applied; everything before them is.
#[tokio::test]
async fn a_torn_tail_is_cut() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = open(dir.path(), None);
    put(&opened, "kept", "yes").expect("put");
    opened.wal.barrier(1).await.expect("durable");
    let mut torn = Vec::new();
    codec::encode(
        &mut torn,
        opened.wal.durable_lsn() + 1,
        [codec::RedoRef {
            tree: b"data",
            key: b"torn",
            value: Some(b"never"),
        }]
        .into_iter(),
    )
    .expect("fits");
    torn.truncate(torn.len() - 3);
    // The newest segment with a header: the one after it may be a spare
    // named ahead.
    let (_, path) = segments::list(&dir.path().join("log"))
        .expect("list")
        .into_iter()
        .rev()
        .find(|(_, path)| codec::read_segment_header(&std::fs::read(path).expect("read")).is_some())
        .expect("a segment");
    let bytes = std::fs::read(&path).expect("read");
    let mut end = codec::SEGMENT_HEADER;
    while let codec::Read::Record(_, next) = codec::read(&bytes, end) {
        end = next;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&file, &torn, end as u64).expect("tear");
    let copy = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(copy.path().join("log")).expect("dir");
    std::fs::copy(
        &path,
        copy.path()
            .join("log")
            .join(path.file_name().expect("name")),
    )
    .expect("copy");
    let db = sled::Config::new()
        .path(copy.path().join("db"))
        .open()
        .expect("open");
    let log_tree = db.open_tree(LOG_TREE).expect("log tree");
    let recovered =
        recover(&db, &log_tree, &copy.path().join("log"), None, || Ok(())).expect("replay");
    assert!(recovered.torn.is_some(), "the torn record was not reported");
    assert_eq!(value(&db, "kept").as_deref(), Some("yes"));
    assert_eq!(value(&db, "torn"), None);
}

/// A failed `fdatasync` undoes the writes that waited on it, fails them, and
/// the log goes on in a fresh segment; a replay of the whole log skips the
/// undone records.
#[tokio::test]
async fn a_failed_fdatasync_undoes_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let faults = Arc::new(Faults::default());
    let opened = open(dir.path(), Some(Arc::clone(&faults)));
    put(&opened, "k", "durable").expect("put");
    opened.wal.barrier(1).await.expect("durable");
    faults.fail_flush.store(true, Ordering::SeqCst);
    let ticket = opened.wal.ticket();
    put(&opened, "k", "lost").expect("applied");
    // The writer may already have failed the first write's group and be
    // refusing: either way this write must not survive.
    let _ = put(&opened, "new", "lost");
    let err = opened.wal.barrier(ticket).await.expect_err("not durable");
    assert!(err.to_string().contains("undone"), "{err}");
    assert_eq!(
        opened.data.get("k").expect("get").as_deref(),
        Some(&b"durable"[..])
    );
    assert_eq!(opened.data.get("new").expect("get"), None);
    assert!(opened.wal.refusal().is_some());
    // An image left in its slot would be put back by the next start over
    // whatever later writes leave.
    let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
    let durable = opened.wal.durable_lsn();
    assert!(
        log_tree
            .scan_prefix(IMAGE_RING)
            .values()
            .all(|slot| apply::image_lsn(&slot.expect("slot")).is_some_and(|lsn| lsn <= durable)),
        "an undone write's image stayed in its ring slot"
    );
    assert!(
        opened.durable_flushes.load(Ordering::SeqCst) >= 1,
        "the undo was not made durable before writes resume"
    );
    faults.fail_flush.store(false, Ordering::SeqCst);
    let mut resumed = false;
    for _ in 0..200 {
        if put(&opened, "k", "after").is_ok() {
            resumed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(resumed, "writes never resumed");
    opened
        .wal
        .barrier(opened.wal.ticket())
        .await
        .expect("durable");
    let (_copy, db) = replay_copy(&dir.path().join("log"));
    assert_eq!(value(&db, "k").as_deref(), Some("after"));
    assert_eq!(value(&db, "new"), None, "an undone record was replayed");
}

/// Applies `changes` (key, before, after) to the data tree as the log would,
/// then puts the applied marker back: what sled holds when the process died
/// between a write's changes and its marker, its record never durable.
fn apply_without_marker(
    opened: &Opened,
    changes: &[(&str, Option<&str>, Option<&str>)],
    ring: bool,
) {
    let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
    let marker = applied(&log_tree).expect("marker");
    let changes: TreeChanges = changes
        .iter()
        .map(|(key, before, after)| {
            let change = logged::Change {
                before: before.map(IVec::from),
                after: after.map(IVec::from),
            };
            (IVec::from(*key), change)
        })
        .collect();
    apply(
        std::slice::from_ref(&opened.data),
        &[changes],
        &[],
        Some(&opened.packs),
        &log_tree,
        marker + 1,
        ring,
    )
    .expect("apply");
    log_tree
        .insert(APPLIED, &marker.to_be_bytes()[..])
        .expect("put the marker back");
}

/// Writes `kept = 1` through the log, then changes `kept` to 2 and adds
/// `new` in sled only (the write [`apply_without_marker`] leaves), its
/// image in its ring slot when `ring`, else under keys of its own.
fn put_then_change_unlogged(opened: &Opened, ring: bool) {
    put(opened, "kept", "1").expect("put");
    apply_without_marker(
        opened,
        &[("kept", Some("1"), Some("2")), ("new", None, Some("x"))],
        ring,
    );
    let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
    let lsn = applied(&log_tree).expect("marker") + 1;
    let in_ring = log_tree.get(apply::ring_key(lsn)).expect("get").is_some();
    let own = log_tree.get(image_key(lsn, 0)).expect("get").is_some();
    assert_eq!((in_ring, own), (ring, !ring), "where the image went");
}

/// What a start leaves of the write [`put_then_change_unlogged`] made:
/// nothing.
fn assert_taken_out(opened: &Opened, ring: bool) {
    assert_eq!(
        value(&opened.db, "kept").as_deref(),
        Some("1"),
        "ring {ring}"
    );
    assert_eq!(value(&opened.db, "new"), None, "ring {ring}");
}

/// A write that reached sled without its applied marker (the process died
/// between them) and whose record never became durable is taken out at the
/// next start, from its image of the values before.
#[test]
fn a_write_cut_before_its_marker_is_taken_out_at_start() {
    for ring in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let opened = open(dir.path(), None);
            put_then_change_unlogged(&opened, ring);
            assert_eq!(value(&opened.db, "kept").as_deref(), Some("2"));
            opened.db.flush().expect("flush");
        }
        let opened = open(dir.path(), None);
        assert_taken_out(&opened, ring);
        put(&opened, "after", "y").expect("writes go on");
        assert_eq!(value(&opened.db, "after").as_deref(), Some("y"));
    }
}

/// The image of a write whose values before are larger than one piece is
/// stored in pieces and put back whole.
#[test]
fn a_large_image_is_put_back_from_its_pieces() {
    let dir = tempfile::tempdir().expect("temp dir");
    let big: String = "abcdefghijklmnopqrstuvwxyz".repeat(300_000 / 26);
    {
        let opened = open(dir.path(), None);
        put(&opened, "big", &big).expect("put");
        // Offered the ring, an image of several pieces still takes keys of
        // its own.
        apply_without_marker(&opened, &[("big", Some(big.as_str()), None)], true);
        let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
        assert!(
            log_tree
                .get(image_key(applied(&log_tree).expect("marker") + 1, 4))
                .expect("get")
                .is_some(),
            "a 300 KB image takes five pieces"
        );
        assert_eq!(value(&opened.db, "big"), None);
        opened.db.flush().expect("flush");
    }
    let opened = open(dir.path(), None);
    assert_eq!(value(&opened.db, "big").as_deref(), Some(big.as_str()));
}

/// A write that changes nothing (its body failed, or it had nothing to do)
/// still moves the applied marker: a checkpoint may release the segment
/// holding its empty record, and the next start must not find the log
/// beginning after the marker.
#[test]
fn empty_writes_move_the_marker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = open(dir.path(), None);
    put(&opened, "k", "v").expect("put");
    let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
    let before = applied(&log_tree).expect("marker");
    let refused = opened.wal.write(&[&opened.data], |tx| {
        tx.tree(0).insert("other", "x")?;
        Err::<(), _>(sled::transaction::ConflictableTransactionError::Abort(
            Error::invalid("test", "refused on purpose"),
        ))
    });
    assert!(refused.is_err());
    assert_eq!(
        value(&opened.db, "other"),
        None,
        "a refused write changed sled"
    );
    opened
        .wal
        .write(&[&opened.data], |_| Ok(()))
        .expect("a write with nothing to do");
    assert_eq!(applied(&log_tree).expect("marker"), before + 2);
}

/// A write sled holds whole, marker included, whose record never became
/// durable (sled writes its buffers out on its own, so a power cut can
/// leave such a write in sled) is taken out at the next start: it may
/// point at pack bytes that were never synced.
#[test]
fn a_write_sled_holds_beyond_the_durable_log_is_taken_out_at_start() {
    for ring in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let opened = open(dir.path(), None);
            put_then_change_unlogged(&opened, ring);
            let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
            let marker = applied(&log_tree).expect("marker");
            log_tree
                .insert(APPLIED, &(marker + 1).to_be_bytes()[..])
                .expect("the write's marker");
            assert_eq!(value(&opened.db, "kept").as_deref(), Some("2"));
            opened.db.flush().expect("flush");
        }
        let opened = open(dir.path(), None);
        assert_taken_out(&opened, ring);
        let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
        assert_eq!(
            applied(&log_tree).expect("marker"),
            1,
            "the marker went back"
        );
        assert!(
            log_tree.scan_prefix(IMAGES).next().is_none()
                && log_tree.scan_prefix(IMAGE_RING).next().is_none(),
            "images outlived recovery"
        );
        put(&opened, "after", "y").expect("writes go on");
        assert_eq!(value(&opened.db, "after").as_deref(), Some("y"));
    }
}

/// Ring slots are reused: writes far more than the ring holds leave at most
/// one image per slot, none of them under a key of its own once settled,
/// and a start puts none of them back (their writes are durable).
#[tokio::test]
async fn ring_slots_are_reused_and_settled_images_stay_put() {
    let dir = tempfile::tempdir().expect("temp dir");
    let writes = IMAGE_RING_SLOTS * 2 + 10;
    {
        let opened = open(dir.path(), None);
        for i in 0..writes {
            put(&opened, &format!("k{}", i % 7), &i.to_string()).expect("put");
            // Settled before the next write: every image can take its slot.
            opened.wal.barrier(1).await.expect("durable");
        }
        let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
        let slots = log_tree.scan_prefix(IMAGE_RING).count() as u64;
        assert_eq!(slots, IMAGE_RING_SLOTS, "one image per slot");
        assert_eq!(
            log_tree.scan_prefix(IMAGES).count(),
            0,
            "no image key of its own"
        );
        opened.db.flush().expect("flush");
    }
    let opened = open(dir.path(), None);
    for k in 0..7 {
        let last = (0..writes).rev().find(|i| i % 7 == k).expect("a write");
        assert_eq!(
            value(&opened.db, &format!("k{k}")).as_deref(),
            Some(last.to_string().as_str())
        );
    }
}

/// Packed values are synced only by checkpoints: a start puts every value
/// logged since the last one back at its place, so a power cut that lost
/// the pack's unsynced pages loses nothing acknowledged.
#[tokio::test]
async fn replay_puts_packed_values_back_at_their_places() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = vec![42u8; 3000];
    let crc = crc32fast::hash(&bytes);
    let loc = {
        let opened = open(dir.path(), None);
        let loc = opened
            .wal
            .write(&[&opened.data], |tx| {
                let loc = tx.pack(&bytes).expect("the log keeps packs");
                tx.tree(0).insert("p", &loc.to_bytes()[..])?;
                Ok(loc)
            })
            .expect("write");
        opened.wal.barrier(1).await.expect("durable");
        assert_eq!(
            opened.packs.read(loc, 3000, crc).expect("read"),
            Some(bytes.clone())
        );
        loc
    };
    // What a power cut leaves of a pack never synced.
    let pack = std::fs::read_dir(dir.path().join("packs"))
        .expect("packs")
        .next()
        .expect("one pack")
        .expect("entry");
    std::fs::OpenOptions::new()
        .write(true)
        .open(pack.path())
        .expect("open pack")
        .set_len(0)
        .expect("truncate");
    let opened = open(dir.path(), None);
    assert_eq!(
        opened
            .packs
            .read(loc, 3000, crc)
            .expect("read after replay"),
        Some(bytes)
    );
    assert_eq!(
        opened.data.get("p").expect("get").as_deref(),
        Some(&loc.to_bytes()[..])
    );
}

/// Undoing the empty placeholder of a write sled holds part of (its undo
/// failed, writes are refused until a restart) keeps that write's image:
/// the restart needs it. A real undo removes the image.
#[test]
fn an_empty_undo_keeps_the_image_a_real_undo_removes_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = open(dir.path(), None);
    put(&opened, "kept", "1").expect("put");
    let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
    let marker = applied(&log_tree).expect("marker");
    for ring in [true, false] {
        let lsn = marker + 1;
        let head = if ring {
            apply::ring_key(lsn)
        } else {
            image_key(lsn, 0)
        };
        apply_without_marker(&opened, &[("kept", Some("1"), Some("2"))], ring);
        let placeholder = undo_of(lsn, &[], Vec::new());
        writer::undo_one(&log_tree, Some(marker), &placeholder).expect("undo");
        assert!(log_tree.get(&head).expect("get").is_some(), "ring {ring}");
        let changes: TreeChanges = [(
            IVec::from("kept"),
            logged::Change {
                before: Some(IVec::from("1")),
                after: Some(IVec::from("2")),
            },
        )]
        .into_iter()
        .collect();
        let real = undo_of(lsn, std::slice::from_ref(&opened.data), vec![changes]);
        writer::undo_one(&log_tree, Some(marker), &real).expect("undo");
        assert!(log_tree.get(&head).expect("get").is_none(), "ring {ring}");
        assert_eq!(value(&opened.db, "kept").as_deref(), Some("1"));
    }
}

/// Recovery forgets images newest write first (ring and keys of their own
/// together, piece 0 before the other pieces), so that a crash part way
/// leaves only the oldest ones, which put back the same state again.
#[test]
fn images_are_forgotten_newest_write_first() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = open(dir.path(), None);
    let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
    let slot = |lsn: u64| {
        let mut value = 1u32.to_be_bytes().to_vec();
        value.extend_from_slice(&lsn.to_be_bytes());
        value
    };
    // Slot 3 holds write 1,027, slot 5 write 5; write 1,030 in two
    // pieces, write 4 in one.
    log_tree
        .insert(apply::ring_key(1027), slot(1027))
        .expect("slot");
    log_tree.insert(apply::ring_key(5), slot(5)).expect("slot");
    log_tree
        .insert(image_key(1030, 1), &b"p"[..])
        .expect("piece");
    log_tree
        .insert(image_key(1030, 0), &b"h"[..])
        .expect("piece");
    log_tree.insert(image_key(4, 0), &b"h"[..]).expect("piece");
    let order = image_keys_newest_first(&log_tree).expect("keys");
    let expected: Vec<IVec> = [
        image_key(1030, 0),
        image_key(1030, 1),
        apply::ring_key(1027),
        apply::ring_key(5),
        image_key(4, 0),
    ]
    .into_iter()
    .map(IVec::from)
    .collect();
    assert_eq!(order, expected);
    forget_all_images(&log_tree).expect("forget");
    assert!(image_keys_newest_first(&log_tree).expect("keys").is_empty());
}

/// Copies the folder `from` into `to`, recursively.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy file");
        }
    }
}

/// While the log stalls, writes beyond the ring's reach (their slot still
/// holds an unsettled write's image) keep images of their own. If the
/// log then loses them all, a start puts every one back, ring and own
/// images together, newest first.
#[test]
fn writes_beyond_the_ring_keep_images_of_their_own_and_all_are_put_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let faults = Arc::new(Faults::default());
    let opened = open(dir.path(), Some(Arc::clone(&faults)));
    put(&opened, "k0", "durable").expect("put");
    while opened.wal.durable_lsn() < 1 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    faults.stall_log.store(true, Ordering::SeqCst);
    let beyond = 76;
    let writes = IMAGE_RING_SLOTS + beyond;
    for i in 0..writes {
        put(&opened, &format!("k{}", i % 300), &format!("v{i}")).expect("put");
    }
    let log_tree = opened.db.open_tree(LOG_TREE).expect("log tree");
    assert_eq!(
        log_tree.scan_prefix(IMAGE_RING).count() as u64,
        IMAGE_RING_SLOTS
    );
    // Write 1 is durable: the write 1,024 later may take its slot, the
    // next `beyond` may not.
    assert_eq!(log_tree.scan_prefix(IMAGES).count() as u64, beyond);
    // What a power cut leaves when sled wrote its buffers out and the log
    // never got the stalled records.
    opened.db.flush().expect("flush");
    let copy = tempfile::tempdir().expect("temp dir");
    copy_tree(dir.path(), copy.path());
    faults.stall_log.store(false, Ordering::SeqCst);
    let restored = open(copy.path(), None);
    assert_eq!(value(&restored.db, "k0").as_deref(), Some("durable"));
    for i in 1..300 {
        assert_eq!(value(&restored.db, &format!("k{i}")), None, "k{i}");
    }
}
