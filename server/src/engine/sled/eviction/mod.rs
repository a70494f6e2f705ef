//! Eviction: content-addressed objects and cache archives of namespaces
//! whose quota says `on_full = "evict"` are removed least recently used
//! first, in the background, from the quota (high watermark) down to 90% of
//! it (low watermark).
//!
//! | tree | key | value |
//! |---|---|---|
//! | `lru` | `namespace` + class + last use (u64 BE) + source + source key | empty |
//! | `lru_at` | source + source key | class + last use (u64 BE) |
//! | `lru_at` | empty key | format marker: every evictable value is indexed |
//!
//! A source is an object (`o`, its key in `objects`) or a cache ref (`c`,
//! its key in `cache_ref_time`: all the ref's suites go together). The
//! class orders pull-request tiers (0) before the main tier and objects
//! (1), so a storm of branch uploads is evicted before anything the default
//! branch uses.
//!
//! The index is kept by [`track`], which runs at the end of every logged
//! write and reads what the write changed, so it is exactly as durable as
//! the data it indexes. Uses (a Get, a Download, a FindMissing that finds
//! the value) are gathered in memory and written in batches by the
//! maintenance task: a use lost in a crash only makes the order less exact.
//! Records (artifacts, cassettes, streams) are never indexed, never evicted.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use sled::transaction::UnabortableTransactionError;
use sled::IVec;
use trove_proto::Error;

mod backfill;
mod cache_refs;
mod index;
mod namespaces;

use index::{classify, now_stamp, parse_at, relink};
pub(super) use index::{index_trees, track};

use super::packs::refs::swap as swap_refs;
use super::{keys, schema, sled_error, SledStore};
use crate::engine::record;

/// Tree of evictable values by namespace, class and last use.
pub(super) const LRU: &str = "lru";
/// Tree of each evictable value's class and last use.
pub(super) const LRU_AT: &str = "lru_at";
/// The key under which the index's format marker lives.
const MARKER: &[u8] = b"";
/// The current format marker.
const FORMAT: &[u8] = b"1";

const SOURCE_OBJECT: u8 = b'o';
const SOURCE_CACHE: u8 = b'c';
/// Pull-request tiers: evicted first.
const CLASS_PR: u8 = 0;
/// Objects and main tiers.
const CLASS_MAIN: u8 = 1;

/// Values removed per logged write, and candidates read per scan.
const BATCH: usize = 512;
/// Candidates per batch while calls are being served (and in a pass's
/// first batch, before it knows): shorter bursts of eviction work between
/// the rests (see [`Eviction::rest_after`]).
const BUSY_BATCH: usize = 64;
/// While calls are being served and no write waits for room, a pass rests
/// this many times as long as its last batch took, so that eviction takes
/// about `1 / (1 + BUSY_REST_FACTOR)` of the time it would alone (more
/// when batches take longer than `MAX_REST / BUSY_REST_FACTOR`). 8 keeps
/// the p99 of small gets within 1.5x (at 2: up to 1.8x; BENCHMARKS.md).
const BUSY_REST_FACTOR: u32 = 8;
/// The longest single rest: a slow batch must not stall the pass for long.
const MAX_REST: std::time::Duration = std::time::Duration::from_millis(50);
/// A rest is slept in slices this long, so that a write that starts
/// waiting for room ends it early.
const REST_SLICE: std::time::Duration = std::time::Duration::from_millis(5);
/// Uses kept in memory between two flushes; more are dropped (the order
/// gets less exact, nothing else).
const MAX_PENDING_USES: usize = 200_000;

type TxResult<T> = Result<T, UnabortableTransactionError>;

/// The index trees, the pending uses and the wake-up of the maintenance task.
#[derive(Debug)]
pub(super) struct Eviction {
    pub(super) lru: sled::Tree,
    pub(super) lru_at: sled::Tree,
    /// Uses not yet written: source key -> when it was used.
    uses: Mutex<HashMap<Vec<u8>, u64>>,
    /// Set by a write that took an evicting namespace past its quota; the
    /// maintenance thread waits on it.
    wake: Arc<(Mutex<bool>, Condvar)>,
    /// Passes never overlap (the task and a caller of [`SledStore::run_eviction`]).
    pass: Mutex<()>,
    /// Values evicted since the store opened.
    pub(super) evicted: AtomicU64,
    /// Whether the maintenance thread runs (writes then wait for it).
    pub(super) running: Arc<std::sync::atomic::AtomicBool>,
    /// Operations started through the store's traits, and chunks they
    /// stream in or out: a pass that sees it move knows it shares the
    /// machine with them. Shared with download streams.
    calls: Arc<AtomicU64>,
    /// Writes waiting for eviction to make room: while any does, a pass
    /// never rests.
    waiting_writes: AtomicU64,
}

impl Eviction {
    /// Opens the index trees.
    pub(super) fn open(db: &sled::Db) -> Result<Self, Error> {
        Ok(Eviction {
            lru: db.open_tree(LRU).map_err(sled_error)?,
            lru_at: db.open_tree(LRU_AT).map_err(sled_error)?,
            uses: Mutex::default(),
            wake: Arc::new((Mutex::new(false), Condvar::new())),
            pass: Mutex::new(()),
            evicted: AtomicU64::new(0),
            running: Default::default(),
            calls: Arc::new(AtomicU64::new(0)),
            waiting_writes: AtomicU64::new(0),
        })
    }

    /// Counts an operation of a caller, or a chunk it sent or received
    /// (see [`Eviction::rest_after`]).
    pub(super) fn note_call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// The call counter, for a download stream to count its chunks with.
    pub(super) fn call_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.calls)
    }

    /// Sleeps `rest`, in slices, ending early once a write waits for room.
    fn rest(&self, rest: std::time::Duration) {
        let until = std::time::Instant::now() + rest;
        loop {
            let now = std::time::Instant::now();
            if now >= until || self.waiting_writes.load(Ordering::Acquire) > 0 {
                return;
            }
            std::thread::sleep(REST_SLICE.min(until - now));
        }
    }

    /// Marks a write as waiting for room until the guard drops.
    pub(super) fn waiting_write(&self) -> WaitingWrite<'_> {
        self.waiting_writes.fetch_add(1, Ordering::AcqRel);
        WaitingWrite(&self.waiting_writes)
    }

    /// How long a pass rests after a batch that took `took`, given the
    /// call count when the batch started: eviction is background work, so
    /// while callers are being served it takes a bounded share of the
    /// machine (on two cores a full-speed pass raised the p99 of small
    /// gets 1.4x to 2.3x), unless a write waits for the room it makes. An
    /// idle store, or one whose writers wait, is evicted at full speed.
    fn rest_after(&self, calls_before: u64, took: std::time::Duration) -> std::time::Duration {
        let busy = self.calls.load(Ordering::Relaxed) != calls_before;
        if !busy || self.waiting_writes.load(Ordering::Acquire) > 0 {
            return std::time::Duration::ZERO;
        }
        (took * BUSY_REST_FACTOR).min(MAX_REST)
    }

    /// Wakes the maintenance thread: a namespace passed its quota.
    pub(super) fn wake(&self) {
        let (flag, cond) = &*self.wake;
        if let Ok(mut woken) = flag.lock() {
            *woken = true;
            cond.notify_one();
        }
    }

    /// True once the format marker says every evictable value is indexed.
    pub(super) fn indexed(&self) -> Result<bool, Error> {
        Ok(self.lru_at.get(MARKER).map_err(sled_error)?.as_deref() == Some(FORMAT))
    }

    /// Notes a use of the value under `key` of `source` (batched).
    fn note_use(&self, source: u8, key: &[u8]) {
        if let Ok(mut uses) = self.uses.lock() {
            if uses.len() < MAX_PENDING_USES {
                let mut entry = Vec::with_capacity(key.len() + 1);
                entry.push(source);
                entry.extend_from_slice(key);
                uses.insert(entry, now_stamp());
            }
        }
    }

    /// True when a use of `source_key` waits to be written: the value was
    /// used after the last flush, so a pass running now must keep it.
    fn is_pending(&self, source_key: &[u8]) -> bool {
        self.uses
            .lock()
            .map_or(true, |uses| uses.contains_key(source_key))
    }

    fn take_uses(&self) -> Vec<(Vec<u8>, u64)> {
        match self.uses.lock() {
            Ok(mut uses) => uses.drain().collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// What one eviction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EvictionPass {
    /// Values (objects, cache refs) removed.
    pub evicted: u64,
    /// Logical bytes they held.
    pub bytes: u64,
}

/// One candidate: its index entry and what it holds.
struct Candidate {
    index_key: IVec,
    source_key: Vec<u8>,
    bytes: u64,
}

impl SledStore {
    /// Notes a use of the object under `key` (an evicting namespace only).
    pub(super) fn note_object_use(&self, namespace: &str, key: &[u8]) {
        if self.inner.options.quotas.evicts(namespace) {
            self.inner.eviction.note_use(SOURCE_OBJECT, key);
        }
    }

    /// Notes a use of the cache ref under `ref_key` (`tier, ref`).
    pub(super) fn note_cache_use(&self, namespace: &str, ref_key: &[u8]) {
        if self.inner.options.quotas.evicts(namespace) {
            self.inner.eviction.note_use(SOURCE_CACHE, ref_key);
        }
    }

    /// Writes the uses gathered since the last flush. Blocking.
    fn flush_uses(&self) -> Result<(), Error> {
        let uses = self.inner.eviction.take_uses();
        for batch in uses.chunks(BATCH) {
            self.write_quiet(&[], |tx| {
                let (lru, lru_at) = index_trees(tx, 0);
                for (source_key, used_at) in batch {
                    // Only a value still indexed moves (a use racing a
                    // delete must not bring its entry back), and only
                    // forward (it may have been rewritten since).
                    let current = lru_at.get(source_key)?.as_deref().and_then(parse_at);
                    if current.is_some_and(|(_, stamp)| stamp < *used_at) {
                        relink(&lru, &lru_at, source_key, true, *used_at)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Flushes the pending uses, then evicts every evicting namespace that
    /// holds more than its quota down to its low watermark. Blocking; one
    /// pass at a time.
    pub fn run_eviction(&self) -> Result<EvictionPass, Error> {
        let _pass = self
            .inner
            .eviction
            .pass
            .lock()
            .map_err(|_| Error::internal("the eviction lock is poisoned"))?;
        self.backfill_index()?;
        self.flush_uses()?;
        let mut done = EvictionPass::default();
        for (name, quota) in self.evicting_namespaces()? {
            let ns_key = keys::key(&[name.as_bytes()]);
            let held = self.namespace_bytes(&ns_key)?;
            if held <= quota.max_bytes {
                continue;
            }
            let mut excess = held - quota.low_watermark();
            let mut idle_rounds = 0;
            let mut batch = BUSY_BATCH;
            while excess > 0 && idle_rounds < 3 {
                let calls_before = self.inner.eviction.calls.load(Ordering::Relaxed);
                let started = std::time::Instant::now();
                let (candidates, skipped_used) = self.candidates(&ns_key, excess, batch)?;
                if candidates.is_empty() && skipped_used {
                    // Everything left was used during this pass: write those
                    // uses (their entries move back) and look again.
                    self.flush_uses()?;
                    idle_rounds += 1;
                    continue;
                }
                if candidates.is_empty() {
                    tracing::warn!(
                        namespace = %name,
                        held,
                        quota = quota.max_bytes,
                        "nothing left to evict: records fill the namespace"
                    );
                    break;
                }
                let pass = self.evict(&candidates)?;
                // Candidates all used or rewritten meanwhile (or counters
                // that disagree with the index): stop after a few empty
                // rounds rather than spin; the next pass tries again.
                idle_rounds = if pass.evicted == 0 {
                    idle_rounds + 1
                } else {
                    0
                };
                done.evicted += pass.evicted;
                done.bytes += pass.bytes;
                let held = self.namespace_bytes(&ns_key)?;
                excess = held.saturating_sub(quota.low_watermark());
                let rest = self
                    .inner
                    .eviction
                    .rest_after(calls_before, started.elapsed());
                batch = if rest.is_zero() { BATCH } else { BUSY_BATCH };
                if excess > 0 && !rest.is_zero() {
                    self.inner.eviction.rest(rest);
                }
            }
        }
        self.inner
            .eviction
            .evicted
            .fetch_add(done.evicted, Ordering::Relaxed);
        metrics::counter!("trove_evictions_total").increment(done.evicted);
        metrics::counter!("trove_evicted_bytes_total").increment(done.bytes);
        if done.evicted > 0 {
            tracing::info!(
                evicted = done.evicted,
                bytes = done.bytes,
                "evicted least recently used values"
            );
        }
        Ok(done)
    }

    /// The least recently used values of a namespace, until they hold
    /// `excess` bytes (or a batch is full). Entries whose value is gone are
    /// returned too (holding nothing), so that they leave the index. Values
    /// used since the last flush of uses are skipped (they stay), and the
    /// flag says whether any was.
    fn candidates(
        &self,
        ns_key: &[u8],
        excess: u64,
        batch: usize,
    ) -> Result<(Vec<Candidate>, bool), Error> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut skipped_used = false;
        for item in self.inner.eviction.lru.scan_prefix(ns_key).keys() {
            let index_key = item.map_err(sled_error)?;
            let source_key = index_key[ns_key.len() + 9..].to_vec();
            if self.inner.eviction.is_pending(&source_key) {
                skipped_used = true;
                continue;
            }
            let held = self.held_by(&source_key)?;
            bytes += held;
            out.push(Candidate {
                index_key,
                source_key,
                bytes: held,
            });
            if bytes >= excess || out.len() >= batch {
                break;
            }
        }
        Ok((out, skipped_used))
    }

    /// Logical bytes held by the value under `source_key`.
    fn held_by(&self, source_key: &[u8]) -> Result<u64, Error> {
        let Some((&source, key)) = source_key.split_first() else {
            return Ok(0);
        };
        if source == SOURCE_OBJECT {
            return Ok(match self.inner.objects.get(key).map_err(sled_error)? {
                Some(bytes) => record::decode(&bytes).map_or(0, |r| r.size),
                None => 0,
            });
        }
        let mut total = 0u64;
        for value in self.inner.cache.refs.scan_prefix(key).values() {
            total += record::decode(&value.map_err(sled_error)?).map_or(0, |r| r.size);
        }
        Ok(total)
    }

    /// Removes the candidates whose index entry is unchanged (a use or a
    /// rewrite since they were chosen keeps them). Blocking.
    fn evict(&self, candidates: &[Candidate]) -> Result<EvictionPass, Error> {
        // Not `self.ticket()`: eviction is not a caller's operation.
        let ticket = self.inner.wal.ticket();
        let mut done = EvictionPass::default();
        let (objects, refs): (Vec<&Candidate>, Vec<&Candidate>) = candidates
            .iter()
            .partition(|c| c.source_key.first() == Some(&SOURCE_OBJECT));
        if !objects.is_empty() {
            let (removed, blobs) = self.evict_objects(&objects)?;
            done.evicted += removed.len() as u64;
            done.bytes += removed.iter().sum::<u64>();
            self.retire_blobs(blobs, ticket);
        }
        let mut by_tier: BTreeMap<Vec<u8>, Vec<&Candidate>> = BTreeMap::new();
        for candidate in refs {
            let key = &candidate.source_key[1..];
            let exists = self.inner.cache.ref_time.contains_key(key);
            match split_ref_key(key) {
                Some((tier, _)) if exists.map_err(sled_error)? => {
                    if !self.inner.eviction.is_pending(&candidate.source_key) {
                        by_tier.entry(tier).or_default().push(candidate);
                    }
                }
                // An entry whose ref is gone (or unreadable) leaves the index.
                _ => self.drop_index_entry(candidate)?,
            }
        }
        for (tier, chosen) in by_tier {
            let refs: Vec<(String, Vec<u8>)> = chosen
                .iter()
                .filter_map(|c| {
                    let (_, name) = split_ref_key(&c.source_key[1..])?;
                    Some((name, c.index_key.to_vec()))
                })
                .collect();
            let (removed, blobs) = self.evict_refs(&tier, &refs)?;
            done.evicted += removed.len() as u64;
            done.bytes += refs
                .iter()
                .zip(&chosen)
                .filter(|((name, _), _)| removed.contains(name))
                .map(|(_, c)| c.bytes)
                .sum::<u64>();
            self.retire_blobs(blobs, ticket);
        }
        Ok(done)
    }

    /// Removes the objects among `candidates` whose index entry is
    /// unchanged, in one logged write; returns their sizes and blobs.
    fn evict_objects(&self, candidates: &[&Candidate]) -> Result<(Vec<u64>, Vec<u64>), Error> {
        self.write_quiet(&[&self.inner.objects, &self.inner.blob_refs], |tx| {
            let (objects, blob_refs) = (tx.tree(0), tx.tree(1));
            let (lru, lru_at) = index_trees(tx, 2);
            let (mut sizes, mut blobs) = (Vec::new(), Vec::new());
            for candidate in candidates {
                // Used or rewritten since it was chosen (the entry moved),
                // or used since the last flush: it stays.
                if lru.get(&candidate.index_key)?.is_none()
                    || self.inner.eviction.is_pending(&candidate.source_key)
                {
                    continue;
                }
                let key = &candidate.source_key[1..];
                let record = objects.get(key)?.map(|bytes| record::decode(&bytes));
                match record {
                    Some(Ok(old)) => {
                        objects.remove(key)?;
                        let freed = swap_refs(&blob_refs, key, Some(&old), None)?;
                        self.inner.packs.note_freed(freed);
                        blobs.extend(old.blob_id());
                        sizes.push(old.size);
                    }
                    // An entry without its value, or with a value this
                    // engine cannot read (kept for an operator to look
                    // at): the entry leaves the index, so that eviction
                    // does not stop at it (track only sees keys that
                    // changed).
                    other => {
                        if let Some(Err(err)) = other {
                            tracing::warn!(error = %err, "an evictable value does not parse; left in place, out of the eviction index");
                        }
                        lru.remove(&candidate.index_key)?;
                        lru_at.remove(&candidate.source_key)?;
                    }
                }
            }
            Ok((sizes, blobs))
        })
    }

    fn drop_index_entry(&self, candidate: &Candidate) -> Result<(), Error> {
        self.write_quiet(&[], |tx| {
            let (lru, lru_at) = index_trees(tx, 0);
            lru.remove(&candidate.index_key)?;
            lru_at.remove(&candidate.source_key)?;
            Ok(())
        })
    }

    /// Values evicted since the store opened.
    pub fn evicted_total(&self) -> u64 {
        self.inner.eviction.evicted.load(Ordering::Relaxed)
    }

    /// Starts the maintenance thread (when an evicting quota is set): it
    /// indexes an older store, writes uses and evicts, when a write passes
    /// a quota and once a second. It runs at a lower CPU priority than the
    /// threads that serve calls (nice 10): its own share of the work yields
    /// to them (the log and sled writes it causes run on their threads at
    /// normal priority, which is why passes also rest while calls are
    /// served, see [`Eviction::rest_after`]). It holds the store weakly and
    /// ends with it. Blob files it unreferences are unlinked on the Tokio
    /// runtime that opened the store; without one, eviction runs only
    /// through [`SledStore::run_eviction`].
    pub(super) fn start_eviction(&self) {
        if !self.inner.options.quotas.evicts_anywhere() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no runtime: eviction runs only when asked");
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let wake = Arc::clone(&self.inner.eviction.wake);
        // Set before the thread starts: it clears it when it ends.
        let running = Arc::clone(&self.inner.eviction.running);
        running.store(true, Ordering::Release);
        let spawned = std::thread::Builder::new()
            .name("trove-evict".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                let _running = Running(running);
                // On Linux the nice value is per thread: this one only.
                if let Err(err) = rustix::process::setpriority_process(None, 10) {
                    tracing::debug!(error = %err, "eviction runs at normal priority");
                }
                loop {
                    let Some(inner) = weak.upgrade() else {
                        return;
                    };
                    let store = SledStore { inner };
                    if let Err(err) = store.run_eviction() {
                        tracing::warn!(error = %err, "eviction pass failed; retrying");
                    }
                    drop(store);
                    let (flag, cond) = &*wake;
                    let Ok(woken) = flag.lock() else {
                        return;
                    };
                    let waited = cond.wait_timeout_while(
                        woken,
                        std::time::Duration::from_secs(1),
                        |woken| !*woken,
                    );
                    match waited {
                        Ok((mut woken, _)) => *woken = false,
                        Err(_) => return,
                    }
                }
            });
        if let Err(err) = spawned {
            self.inner.eviction.running.store(false, Ordering::Release);
            tracing::warn!(error = %err, "cannot start the eviction thread; eviction runs only when asked");
        }
    }
}

/// A write waiting for eviction to make room (see [`Eviction::waiting_write`]).
pub(super) struct WaitingWrite<'a>(&'a AtomicU64);

impl Drop for WaitingWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Clears [`Eviction::running`] however the thread ends (panics included).
struct Running(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Splits a `cache_ref_time` key (`tier, ref`) into the tier and the ref.
fn split_ref_key(key: &[u8]) -> Option<(Vec<u8>, String)> {
    let (_, rest) = keys::take_part(key)?;
    let (_, rest) = keys::take_part(rest)?;
    let rest = match rest.split_first()? {
        (&schema::TIER_MAIN, rest) => rest,
        (&schema::TIER_PR, rest) => keys::take_part(rest)?.1,
        _ => return None,
    };
    let (reference, tail) = keys::take_part(rest)?;
    if !tail.is_empty() {
        return None;
    }
    let tier = key[..key.len() - rest.len()].to_vec();
    Some((tier, String::from_utf8(reference).ok()?))
}

#[cfg(test)]
mod tests;
