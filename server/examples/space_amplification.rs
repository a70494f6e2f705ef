//! Measures how much disk sled 0.34 uses for large values, the question that
//! decided to keep large values in blob files beside sled.
//!
//! `cargo run --release -p trove-server --example space_amplification [MIB]`
//! writes a value of MIB mebibytes (default 64) as 1 MiB chunks into sled,
//! overwrites it twice, deletes it, and prints the on-disk size after each
//! step next to the bytes of live data; then does the same through a blob
//! file for comparison.

use std::path::Path;

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        dir_size(&path)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total_mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    let chunk = vec![0x5Au8; 1024 * 1024];
    let temp = tempfile::tempdir()?;
    let db_dir = temp.path().join("sled");
    let db = sled::Config::new()
        .path(&db_dir)
        .mode(sled::Mode::HighThroughput)
        .open()?;
    let tree = db.open_tree("values")?;
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "step", "live MiB", "disk MiB", "ratio"
    );
    let report = |step: &str, live: u64| {
        let disk = dir_size(&db_dir);
        let ratio = if live == 0 {
            f64::NAN
        } else {
            disk as f64 / live as f64
        };
        println!(
            "{step:<34} {:>12.1} {:>12.1} {ratio:>8.2}",
            mib(live),
            mib(disk)
        );
    };
    let live = total_mib * 1024 * 1024;
    for round in 0..3u8 {
        for i in 0..total_mib {
            let mut value = chunk.clone();
            value[0] = round;
            tree.insert(i.to_be_bytes(), value)?;
        }
        db.flush()?;
        report(&format!("sled: write #{} of the value", round + 1), live);
    }
    for i in 0..total_mib {
        tree.remove(i.to_be_bytes())?;
    }
    db.flush()?;
    report("sled: after delete", 0);
    drop(tree);
    drop(db);

    let blob_dir = temp.path().join("blob");
    std::fs::create_dir_all(&blob_dir)?;
    let path = blob_dir.join("value");
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..total_mib {
        std::io::Write::write_all(&mut file, &chunk)?;
    }
    file.sync_all()?;
    report_blob(&blob_dir, live);
    Ok(())
}

fn report_blob(dir: &Path, live: u64) {
    let disk = dir_size(dir);
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>8.2}",
        "blob file: the same value",
        mib(live),
        mib(disk),
        disk as f64 / live as f64
    );
}
