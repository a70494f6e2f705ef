fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}
fn main() {
    let seg: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let extra: bool = std::env::args().nth(2).unwrap() == "1";
    let cache: u64 = std::env::args()
        .nth(3)
        .map(|s| s.parse().unwrap())
        .unwrap_or(256 << 20);
    let flush_every: u64 = std::env::args()
        .nth(4)
        .map(|s| s.parse().unwrap())
        .unwrap_or(0);
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .segment_size(seg)
        .cache_capacity(cache)
        .mode(sled::Mode::HighThroughput)
        .open()
        .unwrap();
    let t = db.open_tree("artifacts").unwrap();
    let log = db.open_tree("trove_log").unwrap();
    let usage = db.open_tree("usage").unwrap();
    use sled::Transactional;
    let mut lsn = 0u64;
    for batch in 0..1000u64 {
        for i in 0..100u64 {
            let n = batch * 100 + i;
            lsn += 1;
            let key = format!("\0ns\0key-{n:016}\0\0\0");
            let val = [7u8; 67];
            if extra {
                (&t, &log, &usage)
                    .transaction(|(t, log, usage)| {
                        t.insert(key.as_bytes(), &val[..])?;
                        let mut ik = b"img:".to_vec();
                        ik.extend_from_slice(&lsn.to_be_bytes());
                        ik.extend_from_slice(&0u32.to_be_bytes());
                        log.insert(ik, &[1u8; 20][..])?;
                        log.insert(&b"applied"[..], &lsn.to_be_bytes()[..])?;
                        usage.insert(&b"\0ns\0artifacts"[..], &[3u8; 25][..])?;
                        Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                    })
                    .unwrap();
            } else {
                t.insert(key.as_bytes(), &val[..]).unwrap();
            }
        }
        if flush_every > 0 && batch % flush_every == 0 {
            db.flush().unwrap();
        }
        if extra && batch % 100 == 99 {
            db.flush().unwrap();
            // checkpoint: forget images
            let keys: Vec<_> = log
                .scan_prefix(b"img:")
                .keys()
                .map(|k| k.unwrap())
                .collect();
            for k in keys {
                log.remove(k).unwrap();
            }
        }
    }
    db.flush().unwrap();
    let live = db.size_on_disk().unwrap();
    drop(t);
    drop(log);
    drop(usage);
    drop(db);
    std::thread::sleep(std::time::Duration::from_millis(500));
    println!(
        "seg {seg} extra {extra} cache {cache} flush_every {flush_every}: file {} MB, dir {} MB",
        live / 1_000_000,
        dir_size(dir.path()) / 1_000_000
    );
}
