//! Crash recovery under load: concurrent writers over every operation group,
//! `kill -9` of the real server at a random moment, restart on the same data
//! directory, and a check that every acknowledged write is there, intact, and
//! that nothing unacknowledged is half-visible. Repeated for many cycles.
//!
//! The run is driven by a seed, printed at the start: `TROVE_CRASH_SEED=<n>`
//! replays it (up to the timing of the kill), `TROVE_CRASH_CYCLES` sets the
//! number of cycles (default 20 for the main run).
//!
//! Two writers share the artifact keys and two share the appended cassette.
//! Every cycle waits for at least one acknowledged write before the kill.
//! Unacknowledged objects, streams and archives must be absent or whole.
//! The driver runs on sled in strict mode (nothing acknowledged is lost), in
//! relaxed mode (acknowledged writes of the last moments may be lost, nothing
//! is ever torn), and on the object-storage engine against the S3 cluster.
//!
//! With power cuts, the data folder is on a FUSE filesystem that keeps every
//! byte not yet covered by `fsync`/`fdatasync` in memory only
//! (`trove_tests::lazyfs`): each kill is followed by unmounting without a
//! sync, which throws those bytes away as a power cut would, and the server
//! restarts on what was synced. A `kill -9` alone cannot see a missing
//! fsync (the page cache survives it); this can. `TROVE_KEEP_POWER_DIR=1`
//! keeps the backing folder and the server's log for a post-mortem.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use trove_client::TroveClient;
use trove_proto::artifacts::PutOptions;
use trove_proto::cache::{BranchRefsKey, BranchRefsWrite, CacheScope, PruneOptions, UploadOptions};
use trove_proto::entries::{AppendOptions, NewEntry, ReadOptions};
use trove_proto::objects::StreamChunk;
use trove_proto::types::{Name, Namespace};
use trove_proto::{ArtifactStore, CacheStore, EntryStore, ObjectStore};
use trove_tests::harness::ServerProcess;
use trove_tests::{collect_bytes, digest_stream, generated_sha256, generated_stream};

fn name(s: &str) -> Name {
    Name::new("name", s).expect("name")
}

/// What two writers of one artifact key may have left there.
#[derive(Default, Clone)]
struct KeyLedger {
    /// A write to the key was acknowledged: it can never be absent again.
    acked: bool,
    /// The contents (SHA-256) the key may hold: what the last check found,
    /// and everything attempted since (acknowledged or not).
    possible: std::collections::BTreeSet<String>,
}

/// What the writers attempted and what the server acknowledged.
#[derive(Default)]
struct Ledger {
    /// Artifacts, written by two writers over the same four keys.
    artifacts: BTreeMap<String, KeyLedger>,
    /// Acknowledged verified objects: hash -> size.
    objects: BTreeMap<String, u64>,
    /// Objects attempted and not acknowledged: absent or whole, never torn.
    objects_attempted: BTreeMap<String, u64>,
    /// Acknowledged streams: hash -> chunk data.
    streams: BTreeMap<String, Vec<Vec<u8>>>,
    /// Streams attempted and not acknowledged.
    streams_attempted: BTreeMap<String, Vec<Vec<u8>>>,
    /// Append batches: id -> acknowledged.
    batches: BTreeMap<String, bool>,
    /// Replace versions of the swapped cassette: tag -> entry count, plus the
    /// last acknowledged tag.
    replace_versions: HashMap<String, usize>,
    replace_acked: Option<String>,
    replace_attempts_since: Vec<String>,
    /// Acknowledged cache archives: ref -> sha.
    archives: BTreeMap<String, String>,
    /// Archives attempted and not acknowledged.
    archives_attempted: BTreeMap<String, String>,
    /// A prune (keep 2) of the "prunable" branch was acknowledged, and the
    /// uploads to that branch attempted since the last acknowledged prune.
    prune_acked: bool,
    prunable_uploads_since: usize,
    /// Branch ref maps written to the "maps" branch (from 8 KiB they
    /// spill into the packs): tag -> map, the last acknowledged tag, and the
    /// tags attempted since.
    branch_maps: HashMap<String, BTreeMap<String, i64>>,
    branch_map_acked: Option<String>,
    branch_map_attempts_since: Vec<String>,
    acknowledged: u64,
}

/// A branch ref map of `entries` shas, each naming `tag`.
fn branch_map(tag: &str, entries: i64) -> BTreeMap<String, i64> {
    (0..entries)
        .map(|i| (format!("{tag}-sha-{i:05}"), i))
        .collect()
}

fn cache_scope(branch: &str) -> CacheScope {
    CacheScope {
        namespace: Namespace::new("crash").expect("ns"),
        prefix: "ci".into(),
        branch: name(branch),
        default_branch: name("main"),
        test_suite_id: String::new(),
    }
}

/// Runs one kind of writer until a call fails (the server was killed).
async fn writer(
    kind: usize,
    client: TroveClient,
    ledger: Arc<Mutex<Ledger>>,
    seed: u64,
    cycle: u64,
) {
    let ns = Namespace::new("crash").expect("ns");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (cycle << 8) ^ kind as u64);
    for n in 0u64.. {
        let tag = format!("c{cycle}-n{n}");
        let value_seed = seed ^ (cycle << 32) ^ (n << 4) ^ kind as u64;
        let ok = match kind {
            // Two writers share the same four keys.
            0 | 6 => {
                let key = format!("artifact-{}", (n + kind as u64) % 4);
                let size = if rng.random_bool(0.3) {
                    150_000
                } else {
                    rng.random_range(1..2_000)
                };
                let sha = generated_sha256(value_seed, size, 65_536).await;
                ledger
                    .lock()
                    .expect("ledger")
                    .artifacts
                    .entry(key.clone())
                    .or_default()
                    .possible
                    .insert(sha.clone());
                let put = client
                    .put_artifact(
                        &ns,
                        &name(&key),
                        PutOptions::default(),
                        generated_stream(value_seed, size, 65_536),
                    )
                    .await;
                if put.is_ok() {
                    let mut l = ledger.lock().expect("ledger");
                    l.artifacts.entry(key).or_default().acked = true;
                    l.acknowledged += 1;
                }
                put.is_ok()
            }
            1 => {
                let size = rng.random_range(1..200_000);
                let sha = generated_sha256(value_seed, size, 65_536).await;
                ledger
                    .lock()
                    .expect("ledger")
                    .objects_attempted
                    .insert(sha.clone(), size);
                let put = client
                    .put_object(
                        &ns,
                        &name(&sha),
                        Some(size),
                        generated_stream(value_seed, size, 65_536),
                    )
                    .await;
                if put.is_ok() {
                    let mut l = ledger.lock().expect("ledger");
                    l.objects_attempted.remove(&sha);
                    l.objects.insert(sha, size);
                    l.acknowledged += 1;
                }
                put.is_ok()
            }
            2 => {
                let chunks: Vec<Vec<u8>> = (0..rng.random_range(0..40))
                    .map(|i| format!("{tag}-{i}").into_bytes())
                    .collect();
                let body = futures::stream::iter(chunks.clone().into_iter().map(|data| {
                    Ok(StreamChunk {
                        data: data.into(),
                        timestamp: Some(1),
                    })
                }))
                .boxed();
                ledger
                    .lock()
                    .expect("ledger")
                    .streams_attempted
                    .insert(format!("stream-{tag}"), chunks.clone());
                let put = client
                    .put_stream(&ns, &name(&format!("stream-{tag}")), body)
                    .await;
                if put.is_ok() {
                    let mut l = ledger.lock().expect("ledger");
                    l.streams_attempted.remove(&format!("stream-{tag}"));
                    l.streams.insert(format!("stream-{tag}"), chunks);
                    l.acknowledged += 1;
                }
                put.is_ok()
            }
            // Two writers append to the same cassette.
            3 | 7 => {
                let tag = format!("{tag}-w{kind}");
                // About half the batches carry an entry long enough to be
                // kept in a value pack rather than in the database.
                let reps = rng.random_range(0..20_000 / tag.len());
                let entries: Vec<NewEntry> = (0..5)
                    .map(|i| {
                        let reps = if i == 0 { reps } else { 0 };
                        let json = serde_json::json!({
                            "batch": tag, "i": i, "reps": reps, "pad": tag.repeat(reps)
                        });
                        NewEntry::parse(
                            "entry",
                            Bytes::from(json.to_string()),
                            Some(rng.random_range(0..1_000)),
                        )
                        .expect("entry")
                    })
                    .collect();
                ledger
                    .lock()
                    .expect("ledger")
                    .batches
                    .insert(tag.clone(), false);
                let options = AppendOptions {
                    idempotency_key: Some(name(&tag)),
                };
                let appended = client
                    .append_entries(&ns, &name("log"), entries, options)
                    .await;
                if appended.is_ok() {
                    let mut l = ledger.lock().expect("ledger");
                    l.batches.insert(tag, true);
                    l.acknowledged += 1;
                }
                appended.is_ok()
            }
            4 => {
                let count = rng.random_range(1..400);
                {
                    let mut l = ledger.lock().expect("ledger");
                    l.replace_versions.insert(tag.clone(), count);
                    l.replace_attempts_since.push(tag.clone());
                }
                let version = tag.clone();
                let body = futures::stream::iter((0..count).map(move |i| {
                    // Every 64th entry is long enough for a value pack.
                    let reps = if i % 64 == 0 {
                        10_000 / version.len()
                    } else {
                        0
                    };
                    let json = serde_json::json!({
                        "version": version, "i": i, "reps": reps, "pad": version.repeat(reps)
                    });
                    NewEntry::parse(
                        "entry",
                        Bytes::from(json.to_string()),
                        Some(i64::try_from(i).unwrap_or(0)),
                    )
                }))
                .boxed();
                let replaced = client.replace_entries(&ns, &name("swap"), body).await;
                if replaced.is_ok() {
                    let mut l = ledger.lock().expect("ledger");
                    l.replace_acked = Some(tag);
                    l.replace_attempts_since.clear();
                    l.acknowledged += 1;
                }
                replaced.is_ok()
            }
            _ => {
                let reference = format!("ref-{tag}");
                let size = rng.random_range(1..120_000);
                let sha = generated_sha256(value_seed, size, 65_536).await;
                ledger
                    .lock()
                    .expect("ledger")
                    .archives_attempted
                    .insert(reference.clone(), sha.clone());
                let uploaded = client
                    .upload(
                        &cache_scope("keep"),
                        &name(&reference),
                        UploadOptions::default(),
                        generated_stream(value_seed, size, 65_536),
                    )
                    .await;
                let pruned = client
                    .prune(
                        &cache_scope("prunable"),
                        PruneOptions {
                            count: 2,
                            ..Default::default()
                        },
                    )
                    .await;
                if pruned.is_ok() {
                    let mut l = ledger.lock().expect("ledger");
                    l.prune_acked = true;
                    l.prunable_uploads_since = 0;
                }
                ledger.lock().expect("ledger").prunable_uploads_since += 1;
                // Up to about 40 KB of JSON: most maps spill into the packs.
                let map = branch_map(&tag, rng.random_range(1i64..1_500));
                {
                    let mut l = ledger.lock().expect("ledger");
                    l.branch_maps.insert(tag.clone(), map.clone());
                    l.branch_map_attempts_since.push(tag.clone());
                }
                let write = BranchRefsWrite::new(ns.clone(), "ci", "maps", "main", map)
                    .expect("a valid map");
                let mapped = client.write_branch_refs(&write).await;
                if mapped.is_ok() {
                    let mut l = ledger.lock().expect("ledger");
                    l.branch_map_acked = Some(tag.clone());
                    l.branch_map_attempts_since.clear();
                    l.acknowledged += 1;
                }
                let other = client
                    .upload(
                        &cache_scope("prunable"),
                        &name(&reference),
                        UploadOptions::default(),
                        generated_stream(value_seed, 10, 65_536),
                    )
                    .await;
                if uploaded.is_ok() {
                    let mut l = ledger.lock().expect("ledger");
                    l.archives_attempted.remove(&reference);
                    l.archives.insert(reference, sha);
                    l.acknowledged += 1;
                }
                uploaded.is_ok() && pruned.is_ok() && other.is_ok() && mapped.is_ok()
            }
        };
        if !ok {
            return;
        }
    }
}

/// Whether an entry's padding is its tag `reps` times, as written.
fn padded_whole(entry: &serde_json::Value, tag: &str) -> bool {
    let reps = entry["reps"].as_u64().unwrap_or(0);
    let pad = entry["pad"].as_str().unwrap_or_default();
    usize::try_from(reps).is_ok_and(|reps| pad == tag.repeat(reps))
}

/// Checks every acknowledged write against the restarted server, and every
/// unacknowledged one for being absent or whole; returns (verified, lost,
/// torn). What each artifact key holds now becomes its known state.
async fn verify(client: &TroveClient, ledger: &mut Ledger) -> (u64, Vec<String>, Vec<String>) {
    let ns = Namespace::new("crash").expect("ns");
    let (mut verified, mut lost, mut torn) = (0u64, Vec::new(), Vec::new());
    for (key, state) in &mut ledger.artifacts {
        let stored = match client.get_artifact(&ns, &name(key)).await {
            Ok((_, body)) => Some(digest_stream(body).await.map(|(_, sha)| sha)),
            Err(trove_proto::Error::NotFound { .. }) => None,
            Err(e) => Some(Err(e)),
        };
        match stored {
            Some(Ok(sha)) if state.possible.contains(&sha) => {
                verified += u64::from(state.acked);
                state.possible = [sha].into();
            }
            Some(Ok(sha)) => torn.push(format!(
                "artifact {key}: content {sha} was never written whole"
            )),
            Some(Err(e)) => torn.push(format!("artifact {key}: unreadable: {e}")),
            None if state.acked => lost.push(format!("artifact {key}")),
            None => state.possible.clear(),
        }
    }
    for (hash, size) in &ledger.objects_attempted {
        match client.get_object(&ns, &name(hash)).await {
            Ok((_, body)) => match digest_stream(body).await {
                Ok((len, sha)) if len == *size && &sha == hash => {}
                other => torn.push(format!("unacknowledged object {hash}: {other:?}")),
            },
            Err(trove_proto::Error::NotFound { .. }) => {}
            Err(e) => torn.push(format!("unacknowledged object {hash}: {e}")),
        }
    }
    for (hash, chunks) in &ledger.streams_attempted {
        match client.get_stream(&ns, &name(hash)).await {
            Ok((_, stream)) => {
                let got: Result<Vec<Vec<u8>>, _> = stream
                    .map(|c| c.map(|c| c.data.to_vec()))
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect();
                match got {
                    Ok(got) if &got == chunks => {}
                    other => torn.push(format!("unacknowledged stream {hash}: {other:?}")),
                }
            }
            Err(trove_proto::Error::NotFound { .. }) => {}
            Err(e) => torn.push(format!("unacknowledged stream {hash}: {e}")),
        }
    }
    for (reference, sha) in &ledger.archives_attempted {
        match client.download(&cache_scope("keep"), reference, None).await {
            Ok(Some((served, body))) => {
                let data = collect_bytes(body).await.unwrap_or_default();
                if &served.sha256 != sha || &trove_tests::sha256_hex(&data) != sha {
                    torn.push(format!("unacknowledged archive {reference}"));
                }
            }
            Ok(None) => {}
            Err(e) => torn.push(format!("unacknowledged archive {reference}: {e}")),
        }
    }
    for (hash, size) in &ledger.objects {
        match client.get_object(&ns, &name(hash)).await {
            Ok((_, body)) => match digest_stream(body).await {
                Ok((len, sha)) if len == *size && &sha == hash => verified += 1,
                other => torn.push(format!("object {hash}: {other:?}")),
            },
            Err(_) => lost.push(format!("object {hash}")),
        }
    }
    for (hash, chunks) in &ledger.streams {
        match client.get_stream(&ns, &name(hash)).await {
            Ok((_, stream)) => {
                let got: Result<Vec<Vec<u8>>, _> = stream
                    .map(|c| c.map(|c| c.data.to_vec()))
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect();
                match got {
                    Ok(got) if &got == chunks => verified += 1,
                    other => torn.push(format!("stream {hash}: {other:?}")),
                }
            }
            Err(_) => lost.push(format!("stream {hash}")),
        }
    }
    let log: Vec<serde_json::Value> = client
        .read_entries(&ns, &name("log"), ReadOptions::default())
        .await
        .expect("read log")
        .map(|e| serde_json::from_slice(&e.expect("entry").json).expect("json"))
        .collect()
        .await;
    let mut per_batch: HashMap<String, usize> = HashMap::new();
    for entry in &log {
        let batch = entry["batch"].as_str().unwrap_or_default();
        if !padded_whole(entry, batch) {
            torn.push(format!(
                "append batch {batch}: an entry's padding is damaged"
            ));
        }
        *per_batch.entry(batch.to_owned()).or_default() += 1;
    }
    for (batch, acked) in &ledger.batches {
        match (per_batch.get(batch).copied().unwrap_or(0), acked) {
            (5, _) => verified += u64::from(*acked),
            (0, false) => {}
            (0, true) => lost.push(format!("append batch {batch}")),
            (n, _) => torn.push(format!(
                "append batch {batch}: {n} of 5 entries (duplicated or partial)"
            )),
        }
    }
    let swap: Vec<serde_json::Value> = client
        .read_entries(&ns, &name("swap"), ReadOptions::default())
        .await
        .expect("read swap")
        .map(|e| serde_json::from_slice(&e.expect("entry").json).expect("json"))
        .collect()
        .await;
    let versions: std::collections::BTreeSet<String> = swap
        .iter()
        .map(|e| e["version"].as_str().unwrap_or_default().to_owned())
        .collect();
    if let Some(entry) = swap
        .iter()
        .find(|e| !padded_whole(e, e["version"].as_str().unwrap_or_default()))
    {
        torn.push(format!(
            "replaced cassette: damaged padding in entry {}",
            entry["i"]
        ));
    }
    match (
        versions.iter().next(),
        versions.len(),
        &ledger.replace_acked,
    ) {
        (None, 0, None) => {}
        (None, 0, Some(acked)) => lost.push(format!("replaced cassette (version {acked})")),
        (Some(version), 1, _) => {
            let allowed = ledger.replace_acked.as_ref() == Some(version)
                || ledger.replace_attempts_since.contains(version);
            let whole = ledger.replace_versions.get(version) == Some(&swap.len());
            match (whole, allowed) {
                (true, true) => verified += 1,
                // A whole older version: the newer acknowledged one was lost.
                (true, false) => lost.push(format!(
                    "replaced cassette (an older version, {version}, is back)"
                )),
                (false, _) => torn.push(format!(
                    "replaced cassette shows version {version} with {} entries",
                    swap.len()
                )),
            }
        }
        _ => torn.push(format!("replaced cassette mixes versions {versions:?}")),
    }
    for (reference, sha) in &ledger.archives {
        match client.download(&cache_scope("keep"), reference, None).await {
            Ok(Some((served, body))) => {
                let data = collect_bytes(body).await.unwrap_or_default();
                if &served.sha256 == sha && &trove_tests::sha256_hex(&data) == sha {
                    verified += 1;
                } else {
                    torn.push(format!("archive {reference}"));
                }
            }
            _ => lost.push(format!("archive {reference}")),
        }
    }
    let key = BranchRefsKey::new(Namespace::new("crash").expect("ns"), "ci", "maps").expect("key");
    match client.branch_refs(&key).await {
        Ok(map) if map.is_empty() => {
            if let Some(acked) = &ledger.branch_map_acked {
                lost.push(format!("branch map (version {acked})"));
            }
        }
        Ok(map) => {
            let tag = map
                .keys()
                .next()
                .and_then(|sha| sha.split_once("-sha-"))
                .map(|(tag, _)| tag.to_owned())
                .unwrap_or_default();
            let whole = ledger.branch_maps.get(&tag) == Some(&map);
            let allowed = ledger.branch_map_acked.as_ref() == Some(&tag)
                || ledger.branch_map_attempts_since.contains(&tag);
            match (whole, allowed) {
                (true, true) => verified += 1,
                (true, false) => {
                    lost.push(format!("branch map (an older version, {tag}, is back)"))
                }
                (false, _) => torn.push(format!(
                    "branch map: {} entries that match no version written whole",
                    map.len()
                )),
            }
        }
        Err(e) => lost.push(format!("branch map unreadable: {e}")),
    }
    // An acknowledged prune (keep the newest 2) stays done: at most 2 refs
    // plus the uploads attempted since can be on the pruned branch.
    if ledger.prune_acked {
        match client.list_refs(&cache_scope("prunable"), 10_000, "").await {
            Ok(page) if page.items.len() <= 2 + ledger.prunable_uploads_since => verified += 1,
            // The acknowledged prune's effect is gone: a lost write.
            Ok(page) => lost.push(format!(
                "prune of the pruned branch: it holds {} refs; at most {} expected",
                page.items.len(),
                2 + ledger.prunable_uploads_since
            )),
            Err(e) => lost.push(format!("pruned branch unreadable: {e}")),
        }
    }
    (verified, lost, torn)
}

/// How one run of the driver goes.
struct Drive {
    /// Extra server flags (the engine, the durability mode).
    args: Vec<String>,
    /// Acknowledged writes must all survive (strict durability); otherwise
    /// losing the last moments' writes is allowed, tearing never is.
    strict: bool,
    /// The sled engine: its staging folder must be empty after each restart.
    sled: bool,
    cycles: u64,
    /// Every kill is also a power cut: the data folder is on a
    /// [`trove_tests::lazyfs`] mount, unmounted without a sync.
    power_cut: bool,
}

/// A data folder on a [`trove_tests::lazyfs`] mount, and the power switch.
struct PowerSwitch {
    _dir: Option<tempfile::TempDir>,
    backing: std::path::PathBuf,
    mountpoint: std::path::PathBuf,
    mounted: Option<trove_tests::lazyfs::Mounted>,
}

impl PowerSwitch {
    fn new() -> Self {
        let mut dir = Some(tempfile::tempdir().expect("temp dir"));
        let root = dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .expect("temp dir");
        // Kept for a post-mortem when asked.
        if std::env::var_os("TROVE_KEEP_POWER_DIR").is_some() {
            let _ = dir.take().map(tempfile::TempDir::keep);
            eprintln!("power-cut folder kept: {}", root.display());
        }
        let backing = root.join("disk");
        let mountpoint = root.join("mnt");
        std::fs::create_dir_all(&backing).expect("backing folder");
        std::fs::create_dir_all(&mountpoint).expect("mount point");
        let mounted = trove_tests::lazyfs::Mounted::mount(&backing, &mountpoint).expect("mount");
        PowerSwitch {
            _dir: dir,
            backing,
            mountpoint,
            mounted: Some(mounted),
        }
    }

    /// The mount itself, so that the server's log (beside it) is not on it.
    fn data_dir(&self) -> std::path::PathBuf {
        self.mountpoint.clone()
    }

    /// Throws away every unsynced byte, then mounts what is left.
    fn cut(&mut self) {
        if let Some(mounted) = self.mounted.take() {
            mounted.power_cut();
        }
        self.mounted = Some(
            trove_tests::lazyfs::Mounted::mount(&self.backing, &self.mountpoint).expect("remount"),
        );
    }
}

/// Runs the driver: writers over every group, a kill -9 once each cycle has
/// an acknowledged write, a restart and a full check; repeated.
async fn drive(run: Drive) {
    let seed: u64 = std::env::var("TROVE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cycles: u64 = std::env::var("TROVE_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(run.cycles);
    let label = run.args.join(" ");
    println!(
        "crash recovery [{label}]: seed {seed} (replay with TROVE_CRASH_SEED={seed}), {cycles} cycles"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let args: Vec<&str> = run.args.iter().map(String::as_str).collect();
    let mut power = run.power_cut.then(PowerSwitch::new);
    let mut server = match &power {
        Some(power) => ServerProcess::start_in(&power.data_dir(), &args).await,
        None => ServerProcess::start_with(&args).await,
    };
    let mut slowest_start = Duration::ZERO;
    let mut total_verified = 0;
    let mut total_lost = 0;
    for cycle in 0..cycles {
        let client = server.client().await;
        let before = ledger.lock().expect("ledger").acknowledged;
        let writers: Vec<_> = (0..8)
            .map(|kind| {
                tokio::spawn(writer(
                    kind,
                    client.clone(),
                    Arc::clone(&ledger),
                    seed,
                    cycle,
                ))
            })
            .collect();
        // Every cycle acknowledges something before the kill, which then
        // comes at a random moment.
        let deadline = Instant::now() + Duration::from_secs(60);
        while ledger.lock().expect("ledger").acknowledged == before {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: nothing was acknowledged in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        server.kill9();
        for w in writers {
            w.await.expect("writer task");
        }
        if let Some(power) = power.as_mut() {
            power.cut();
        }
        let started = Instant::now();
        server.restart().await;
        slowest_start = slowest_start.max(started.elapsed());
        if run.sled {
            let staged = std::fs::read_dir(server.data_dir.join("staging"))
                .map(|d| d.count())
                .unwrap_or(0);
            assert_eq!(
                staged, 0,
                "cycle {cycle}: staged files survived the restart"
            );
        }
        let client = server.client().await;
        let mut snapshot = std::mem::take(&mut *ledger.lock().expect("ledger"));
        let (verified, lost, torn) = verify(&client, &mut snapshot).await;
        assert!(
            torn.is_empty(),
            "[{label}] seed {seed} cycle {cycle}: torn {torn:?}"
        );
        if run.strict {
            assert!(
                lost.is_empty(),
                "[{label}] seed {seed} cycle {cycle}: lost {lost:?}"
            );
        } else {
            // What was lost is forgotten: the next check starts from what is there.
            total_lost += lost.len();
            forget_lost(&mut snapshot, &lost);
        }
        *ledger.lock().expect("ledger") = snapshot;
        total_verified = verified;
    }
    let (acknowledged, branch_maps) = {
        let l = ledger.lock().expect("ledger");
        (l.acknowledged, l.branch_maps.len())
    };
    let kind = if power.is_some() {
        "power-cut"
    } else {
        "kill -9"
    };
    shut_down(server, power);
    println!(
        "crash recovery [{label}]: seed {seed}, {cycles} {kind} cycles, {acknowledged} writes \
         acknowledged (at least one per cycle), {total_verified} items verified in the final \
         check, {total_lost} lost (allowed only when relaxed), 0 torn, slowest restart {} ms, \
         {branch_maps} branch maps attempted",
        slowest_start.as_millis()
    );
    // How long restarts take is a figure, not a property: it is printed
    // above, and start-up time is measured by trove-bench.
}

/// Checks that the server never panicked, then stops it, then its
/// filesystem (in that order: the mount must outlive the process).
fn shut_down(mut server: ServerProcess, power: Option<PowerSwitch>) {
    assert!(
        !server.log().contains("panicked"),
        "the server panicked:\n{}",
        server.log()
    );
    server.kill9();
    drop(power);
}

/// Drops from the ledger the acknowledged writes a relaxed run lost, so
/// later cycles do not count them again.
fn forget_lost(ledger: &mut Ledger, lost: &[String]) {
    for item in lost {
        let Some((kind, id)) = item.split_once(' ') else {
            continue;
        };
        match kind {
            "artifact" => {
                if let Some(state) = ledger.artifacts.get_mut(id) {
                    state.acked = false;
                    state.possible.clear();
                }
            }
            "object" => {
                ledger.objects.remove(id);
            }
            "stream" => {
                ledger.streams.remove(id);
            }
            "archive" => {
                ledger.archives.remove(id);
            }
            "append" => {
                if let Some(batch) = id.strip_prefix("batch ") {
                    ledger.batches.remove(batch);
                }
            }
            "replaced" => ledger.replace_acked = None,
            "prune" => ledger.prune_acked = false,
            "branch" => ledger.branch_map_acked = None,
            _ => {}
        }
    }
}

/// A driver run on sled with `--durability mode`; strict runs must lose nothing.
/// Packs of 256 KiB and a compaction interval of 200 ms make compaction
/// move values and delete packs within each cycle, so kills and power cuts
/// land in the middle of it.
fn on_sled(mode: &str, cycles: u64, power_cut: bool) -> Drive {
    Drive {
        args: [
            "--durability",
            mode,
            "--pack-bytes",
            "262144",
            "--compaction-interval-ms",
            "200",
        ]
        .map(String::from)
        .to_vec(),
        strict: mode == "strict",
        sled: true,
        cycles,
        power_cut,
    }
}

/// Whether power cuts can be simulated here; says so when they cannot. Not a
/// recorded skip: FUSE needs root and /dev/fuse, which some CI machines
/// lack; the kill -9 drivers still run there.
fn power_cuts_possible() -> bool {
    let possible = trove_tests::lazyfs::available();
    if !possible {
        eprintln!("power-cut test not run: FUSE needs root and /dev/fuse");
    }
    possible
}

/// sled, strict durability: every acknowledged write survives kill -9 across
/// many cycles; nothing is torn; staging is reclaimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_repeated_kill9() {
    drive(on_sled("strict", 20, false)).await;
}

/// sled, strict durability, power cuts: after each kill every byte the
/// server wrote but did not fsync is thrown away; every acknowledged write
/// survives, nothing is torn, every restart is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_power_cuts() {
    if !power_cuts_possible() {
        return;
    }
    drive(on_sled("strict", 20, true)).await;
}

/// sled, relaxed durability, power cuts: what was acknowledged in the last
/// moments before a cut may be lost (the documented window), but nothing is
/// torn: a value is whole or absent, and every restart is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_durability_never_tears_across_power_cuts() {
    if !power_cuts_possible() {
        return;
    }
    drive(on_sled("relaxed", 10, true)).await;
}

/// sled, relaxed durability: acknowledged writes of the last moments may
/// be lost to kill -9 (the documented window), but nothing is ever torn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_durability_never_tears() {
    drive(on_sled("relaxed", 10, false)).await;
}

/// The object-storage engine on the S3 cluster: a server killed mid-write
/// loses no acknowledged write and leaves nothing torn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_storage_engine_survives_kill9() {
    let Some((endpoint, bucket)) = trove_tests::target::s3_cluster() else {
        return;
    };
    let url = trove_tests::target::s3_test_url(&bucket, "crash");
    drive(Drive {
        args: vec!["--store".into(), url, "--s3-endpoint".into(), endpoint],
        strict: true,
        sled: false,
        cycles: 10,
        power_cut: false,
    })
    .await;
}

/// Ids (entry sequence numbers, generations, blob ids) are never handed out
/// twice, even when power is cut before any checkpoint: one entry with the
/// same recorded time is appended per power cycle, and every one of them is
/// still there at the end. An id reused after a cut would key a new entry
/// exactly like an older one and overwrite it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_never_reused_after_power_cuts() {
    if !power_cuts_possible() {
        return;
    }
    let ns = Namespace::new("ids").expect("ns");
    let cassette = name("same-time");
    let mut power = PowerSwitch::new();
    let mut server = ServerProcess::start_in(&power.data_dir(), &[]).await;
    let cycles = 4;
    for cycle in 0..cycles {
        let client = server.client().await;
        let entry = NewEntry::parse(
            "entry",
            Bytes::from(serde_json::json!({ "cycle": cycle }).to_string()),
            Some(7),
        )
        .expect("entry");
        client
            .append_entries(&ns, &cassette, vec![entry], AppendOptions::default())
            .await
            .expect("append");
        server.kill9();
        power.cut();
        server.restart().await;
    }
    let client = server.client().await;
    let cycles_seen: Vec<serde_json::Value> = client
        .read_entries(&ns, &cassette, ReadOptions::default())
        .await
        .expect("read")
        .map(|e| {
            serde_json::from_slice::<serde_json::Value>(&e.expect("entry").json).expect("json")
        })
        .map(|json| json["cycle"].clone())
        .collect()
        .await;
    shut_down(server, Some(power));
    let expected: Vec<serde_json::Value> = (0..cycles).map(serde_json::Value::from).collect();
    assert_eq!(
        cycles_seen, expected,
        "one acknowledged entry per power cycle, in arrival order"
    );
}

/// Eviction under power cuts: a namespace evicting down to its quota while
/// writers and readers keep going, cut at a random moment each cycle. After
/// every restart each object ever written is either whole or gone (evicted,
/// or never acknowledged); a record pointing at a blob file that eviction
/// removed before its removal was durable would read as DATA_LOSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_never_leaves_a_dangling_value_across_power_cuts() {
    if !power_cuts_possible() {
        return;
    }
    const SIZE: u64 = 100_000;
    let seed: u64 = std::env::var("TROVE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("eviction under power cuts: seed {seed} (replay with TROVE_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let config_dir = tempfile::tempdir().expect("temp dir");
    let config = config_dir.path().join("trove.toml");
    // Twenty values' worth: every cycle writes past it and evicts.
    std::fs::write(
        &config,
        format!(
            "[namespaces.\"evicting\"]\nmax_bytes = {}\non_full = \"evict\"\n",
            20 * SIZE
        ),
    )
    .expect("config");
    let mut power = PowerSwitch::new();
    let args = ["--config", config.to_str().expect("path")];
    let mut server = ServerProcess::start_in(&power.data_dir(), &args).await;
    let ns = Namespace::new("evicting").expect("ns");
    // Every object attempted, and whether it was acknowledged.
    let written: Arc<Mutex<BTreeMap<String, bool>>> = Arc::default();
    let mut evicted_some = false;
    for cycle in 0..6u64 {
        let client = server.client().await;
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writers: Vec<_> = (0..4u64)
            .map(|writer| {
                let (client, ns, written, acked) = (
                    client.clone(),
                    ns.clone(),
                    Arc::clone(&written),
                    Arc::clone(&acked),
                );
                tokio::spawn(async move {
                    for n in 0.. {
                        let value_seed = seed ^ (cycle << 40) ^ (writer << 32) ^ n;
                        let sha = generated_sha256(value_seed, SIZE, 65_536).await;
                        written.lock().expect("ledger").insert(sha.clone(), false);
                        let stream = generated_stream(value_seed, SIZE, 65_536);
                        match client
                            .put_object(&ns, &name(&sha), Some(SIZE), stream)
                            .await
                        {
                            Ok(_) => {}
                            // Concurrent writers can still meet at the quota's
                            // bounded overshoot: the documented answer is to retry.
                            Err(trove_proto::Error::ResourceExhausted { .. }) => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            Err(e) => return Some(e),
                        }
                        written.lock().expect("ledger").insert(sha, true);
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // A read of an older value makes it recently used.
                        let older = written.lock().expect("ledger").keys().next().cloned();
                        if let Some(older) = older {
                            if client.get_object(&ns, &name(&older)).await.is_err() {
                                // Evicted or the server is gone: both fine here.
                            }
                        }
                    }
                    None
                })
            })
            .collect();
        // The first cycle fills past the quota; later ones keep evicting.
        let wanted = if cycle == 0 { 25 } else { 5 };
        let deadline = Instant::now() + Duration::from_secs(120);
        while acked.load(std::sync::atomic::Ordering::Relaxed) < wanted {
            if Instant::now() > deadline || writers.iter().all(|w| w.is_finished()) {
                server.kill9();
                let mut errors = Vec::new();
                for w in writers {
                    errors.push(w.await.expect("writer"));
                }
                panic!(
                    "seed {seed} cycle {cycle}: writes stopped: {errors:?}\n{}",
                    server.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        server.kill9();
        for w in writers {
            w.await.expect("writer");
        }
        power.cut();
        server.restart().await;
        let client = server.client().await;
        let ledger = written.lock().expect("ledger").clone();
        let mut present = 0;
        for (sha, was_acked) in &ledger {
            match client.get_object(&ns, &name(sha)).await {
                Ok((_, body)) => match digest_stream(body).await {
                    Ok((len, got)) if len == SIZE && &got == sha => present += 1,
                    other => panic!("seed {seed} cycle {cycle}: object {sha} torn: {other:?}"),
                },
                Err(trove_proto::Error::NotFound { .. }) => evicted_some |= *was_acked,
                Err(e) => panic!("seed {seed} cycle {cycle}: object {sha}: {e}"),
            }
        }
        assert!(present > 0, "cycle {cycle}: nothing kept at all");
    }
    shut_down(server, Some(power));
    assert!(
        evicted_some,
        "no acknowledged object was ever evicted: the quota did not bite"
    );
}
