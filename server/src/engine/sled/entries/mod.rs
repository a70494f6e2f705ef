//! [`EntryStore`] on sled: cassettes as generations of ordered entries.
//!
//! Layout:
//! - `cassettes`: `(namespace, cassette)` -> header `[generation u64][created_at i64]`.
//! - `entries`: `[generation u64][recorded_at i64, order-preserving][seq u64]` -> JSON
//!   (from 8 KiB on, a pointer to it in a value pack; see `packs::spill`).
//!   Generations are unique ids, so one generation's entries are one contiguous
//!   range, read in `(recorded_at, arrival)` order by a plain range scan.
//! - `entry_gc`: `[generation u64]` -> cassette key: generations that may be
//!   garbage (a Replace being staged, or content replaced or deleted).
//!
//! Replace writes the new content under a fresh generation (invisible), then
//! switches the header in one transaction: readers see the old generation or
//! the new one, never a mix. A reader holds a lease on its generation, and a
//! replaced generation's entries are removed only once no lease remains, so a
//! read that started before a Replace still returns the complete old content.
//! Crash leftovers are found through `entry_gc` at open, without a full scan.
//!
//! Never imports tonic; never awaits inside a logged write.

mod gc;

use std::collections::{HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use trove_proto::entries::{
    AppendOptions, EntryStream, NewEntry, NewEntryStream, ReadOptions, StoredEntry,
};
use trove_proto::types::{encode_page_token, now_micros, ListPage, Name, Namespace, Page};
use trove_proto::{EntryStore, Error};

use super::packs::spill;
use super::schema::{self, *};
use super::{blocking, keys, scan_after, sled_error, SledStore};
use crate::engine::values::check_append;

/// Entries fetched from sled per step of a read.
const READ_BATCH: usize = 256;
/// Keys removed per sled batch when collecting a generation.
const DELETE_BATCH: usize = 1000;

/// The sled trees and in-memory leases of the entries group.
pub struct EntryTrees {
    pub(super) cassettes: sled::Tree,
    pub(super) entries: sled::Tree,
    pub(super) gc: sled::Tree,
    /// `[generation u64][idempotency key part]` -> count of the append.
    append_keys: sled::Tree,
    /// Per-generation entry counters (see `accounting`).
    usage: sled::Tree,
    leases: Mutex<HashMap<u64, usize>>,
}

impl EntryTrees {
    /// Opens the trees; [`EntryTrees::collect_leftovers`] then removes what a
    /// crash left.
    pub fn open(db: &sled::Db) -> Result<Arc<Self>, Error> {
        let trees = Arc::new(EntryTrees {
            cassettes: db.open_tree(schema::CASSETTES).map_err(sled_error)?,
            entries: db.open_tree(schema::ENTRIES).map_err(sled_error)?,
            gc: db.open_tree(schema::ENTRY_GC).map_err(sled_error)?,
            append_keys: db
                .open_tree(schema::ENTRY_APPEND_KEYS)
                .map_err(sled_error)?,
            usage: db
                .open_tree(super::accounting::ENTRY_USAGE)
                .map_err(sled_error)?,
            leases: Mutex::new(HashMap::new()),
        });
        Ok(trees)
    }

    /// Cassettes, entries and entry bytes. Blocking.
    pub(super) fn usage(&self) -> Result<(u64, u64, u64), Error> {
        let (mut entries, mut bytes) = (0u64, 0u64);
        for value in self.entries.iter().values() {
            bytes += spill::logical_len(&value.map_err(sled_error)?);
            entries += 1;
        }
        Ok((self.cassettes.len() as u64, entries, bytes))
    }

    fn leased(&self, gen: u64) -> bool {
        self.leases
            .lock()
            .map(|l| l.get(&gen).copied().unwrap_or(0) > 0)
            .unwrap_or(true)
    }
}

fn header_of(bytes: &[u8]) -> Result<(u64, i64), Error> {
    decode_header(bytes).ok_or_else(|| Error::DataLoss {
        message: "unreadable cassette header".into(),
    })
}

/// A reader's hold on a generation; releasing the last one lets it be collected.
struct Lease {
    store: SledStore,
    gen: u64,
}

impl Lease {
    fn take(store: &SledStore, gen: u64) -> Self {
        if let Ok(mut leases) = store.inner.entry_trees.leases.lock() {
            *leases.entry(gen).or_insert(0) += 1;
        }
        Lease {
            store: store.clone(),
            gen,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let last = match self.store.inner.entry_trees.leases.lock() {
            Ok(mut leases) => match leases.get_mut(&self.gen) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                _ => {
                    leases.remove(&self.gen);
                    true
                }
            },
            Err(_) => false,
        };
        if last {
            self.store.collect_later(self.gen);
        }
    }
}

/// Removes a staged Replace generation unless it was committed. A batch
/// write still running when the Replace is dropped is awaited first, so it
/// cannot land after the cleanup.
struct StagingGuard {
    store: SledStore,
    gen: u64,
    committed: bool,
    in_flight: Option<tokio::task::JoinHandle<Result<(), Error>>>,
}

impl Drop for StagingGuard {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        match (self.in_flight.take(), tokio::runtime::Handle::try_current()) {
            (Some(batch), Ok(runtime)) => {
                let (store, gen) = (self.store.clone(), self.gen);
                runtime.spawn(async move {
                    let _ = batch.await;
                    store.collect_later(gen);
                });
            }
            _ => self.store.collect_later(self.gen),
        }
    }
}

impl SledStore {
    /// Collects generation `gen` in the background (or inline without a runtime).
    fn collect_later(&self, gen: u64) {
        let trees = Arc::clone(&self.inner.entry_trees);
        let wal = self.inner.wal.clone();
        let packs = Arc::clone(&self.inner.packs);
        let work = move || {
            if let Err(err) = trees.collect(&wal, &packs, gen) {
                tracing::warn!(generation = gen, error = %err, "could not remove an old cassette version; it will be retried at next start");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }

    /// Collects `gen` once the header change that orphaned it is durable
    /// (a crash before that would bring the header back), independently of
    /// whether the caller is still waiting.
    fn collect_when_durable(&self, gen: u64, ticket: u64) {
        let store = self.clone();
        let work = async move {
            if store.inner.wal.barrier(ticket).await.is_ok() {
                store.collect_later(gen);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(work);
            }
            Err(_) => tracing::warn!(
                generation = gen,
                "no runtime; the old cassette version is removed at next start"
            ),
        }
    }

    /// The current generation of a cassette, leased so it stays readable.
    fn lease_current(&self, key: &[u8]) -> Result<Option<Lease>, Error> {
        let trees = &self.inner.entry_trees;
        loop {
            let Some(header) = trees.cassettes.get(key).map_err(sled_error)? else {
                return Ok(None);
            };
            let (gen, _) = header_of(&header)?;
            let lease = Lease::take(self, gen);
            // Confirm after taking the lease: collection of `gen` can only
            // start once the header has moved on, and then sees the lease.
            match trees.cassettes.get(key).map_err(sled_error)? {
                Some(again) if header_of(&again)?.0 == gen => return Ok(Some(lease)),
                _ => drop(lease),
            }
        }
    }
}

#[async_trait]
impl EntryStore for SledStore {
    async fn append_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: Vec<NewEntry>,
        options: AppendOptions,
    ) -> Result<u64, Error> {
        let ticket = self.ticket();
        check_append(&entries)?;
        let trees = &self.inner.entry_trees;
        let key = cassette_key(ns, cassette);
        let mut seqs = Vec::with_capacity(entries.len());
        for _ in 0..entries.len() {
            seqs.push(self.next_id()?);
        }
        let new_gen = self.next_id()?;
        let now = now_micros();
        let count = entries.len() as u64;
        let idempotency = options
            .idempotency_key
            .as_ref()
            .map(|k| k.as_bytes().to_vec());
        let result = self.write(
            &[&trees.cassettes, &trees.entries, &trees.append_keys],
            |tx| {
                let (cassettes, stored, applied) = (tx.tree(0), tx.tree(1), tx.tree(2));
                let gen = match cassettes.get(&key)? {
                    Some(header) => decode_header(&header).map_or(new_gen, |h| h.0),
                    None => {
                        cassettes.insert(key.as_slice(), &encode_header(new_gen, now)[..])?;
                        new_gen
                    }
                };
                if let Some(idempotency) = &idempotency {
                    let applied_key = append_key(gen, idempotency);
                    if let Some(previous) = applied.get(&applied_key)? {
                        let previous = keys::take_u64(&previous).map_or(count, |(n, _)| n);
                        return Ok(previous);
                    }
                    applied.insert(applied_key, &count.to_be_bytes()[..])?;
                }
                for (entry, seq) in entries.iter().zip(&seqs) {
                    stored.insert(
                        entry_key(gen, entry.recorded_at, *seq),
                        spill::store(tx, &entry.json),
                    )?;
                }
                Ok(count)
            },
        );
        let appended = result?;
        self.durable(ticket).await?;
        Ok(appended)
    }

    async fn read_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        options: ReadOptions,
    ) -> Result<EntryStream, Error> {
        let ticket = self.ticket();
        let Some(lease) = self.lease_current(&cassette_key(ns, cassette))? else {
            self.visible(ticket).await?;
            return Ok(futures::stream::empty().boxed());
        };
        let gen = lease.gen;
        let start = match options.after {
            Some(c) => Bound::Excluded(entry_key(gen, c.recorded_at, c.seq)),
            None => Bound::Included(gen.to_be_bytes().to_vec()),
        };
        let end = match gen.checked_add(1) {
            Some(next) => Bound::Excluded(next.to_be_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let remaining = options.limit.filter(|l| *l > 0).map_or(u64::MAX, u64::from);
        let tree = self.inner.entry_trees.entries.clone();
        struct State {
            store: SledStore,
            tree: sled::Tree,
            start: Bound<Vec<u8>>,
            end: Bound<Vec<u8>>,
            remaining: u64,
            buffer: VecDeque<StoredEntry>,
            done: bool,
            /// Names the cassette in errors.
            cassette: String,
            _lease: Lease,
        }
        let state = State {
            cassette: format!("{}/{}", ns.as_str(), cassette.as_str()),
            store: self.clone(),
            tree,
            start,
            end,
            remaining,
            buffer: VecDeque::new(),
            done: false,
            _lease: lease,
        };
        let stream = futures::stream::try_unfold(state, |mut state| async move {
            if state.buffer.is_empty() && !state.done && state.remaining > 0 {
                let (tree, start, end) =
                    (state.tree.clone(), state.start.clone(), state.end.clone());
                let ticket = state.store.ticket();
                let want =
                    usize::try_from(state.remaining.min(READ_BATCH as u64)).unwrap_or(READ_BATCH);
                let (store, cassette) = (state.store.clone(), state.cassette.clone());
                let (batch, exhausted) = blocking(move || {
                    let packs = &store.inner.packs;
                    let mut out = Vec::new();
                    let mut bytes = 0usize;
                    let mut range = tree.range((start, end));
                    for item in range.by_ref() {
                        let (key, value) = item.map_err(sled_error)?;
                        let value = match spill::load(packs, value) {
                            Ok(Some(json)) => json,
                            // Moved by compaction since the range read it.
                            Ok(None) => {
                                match spill::get(packs, &tree, &key, "cassette", &cassette)? {
                                    Some(json) => json,
                                    None => continue,
                                }
                            }
                            Err(err) => return Err(spill::load_error("cassette", &cassette, err)),
                        };
                        bytes += value.len();
                        out.push((key.to_vec(), value));
                        if out.len() >= want || bytes >= 4 * 1024 * 1024 {
                            // Stopped for size, not because the range ended.
                            return Ok((out, false));
                        }
                    }
                    Ok((out, true))
                })
                .await?;
                state.store.visible(ticket).await?;
                if exhausted {
                    state.done = true;
                }
                if let Some((last, _)) = batch.last() {
                    state.start = Bound::Excluded(last.clone());
                }
                for (key, value) in batch {
                    let cursor = parse_entry_key(&key).ok_or_else(|| Error::DataLoss {
                        message: "unreadable entry key".into(),
                    })?;
                    state.buffer.push_back(StoredEntry {
                        json: bytes::Bytes::from(value.to_vec()),
                        recorded_at: cursor.recorded_at,
                        cursor: cursor.encode(),
                    });
                }
            }
            if state.remaining == 0 {
                return Ok(None);
            }
            match state.buffer.pop_front() {
                Some(entry) => {
                    state.remaining -= 1;
                    Ok(Some((entry, state)))
                }
                None => Ok(None),
            }
        });
        Ok(stream.boxed())
    }

    async fn replace_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: NewEntryStream,
    ) -> Result<u64, Error> {
        let ticket = self.ticket();
        let trees = Arc::clone(&self.inner.entry_trees);
        let key = cassette_key(ns, cassette);
        let gen = self.next_id()?;
        self.write(&[&trees.gc], |tx| {
            tx.tree(0).insert(gen.to_be_bytes(), key.as_slice())?;
            Ok(())
        })?;
        let mut guard = StagingGuard {
            store: self.clone(),
            gen,
            committed: false,
            in_flight: None,
        };
        let mut count = 0u64;
        let mut batches = entries.ready_chunks(256);
        while let Some(batch) = batches.next().await {
            let mut staged = Vec::with_capacity(batch.len());
            for entry in batch {
                let entry = entry?;
                staged.push((
                    entry_key(gen, entry.recorded_at, self.next_id()?),
                    entry.json,
                ));
                count += 1;
            }
            let (store, tree) = (self.clone(), trees.entries.clone());
            let write = guard.in_flight.insert(tokio::task::spawn_blocking(move || {
                store.write(&[&tree], |tx| {
                    for (key, json) in &staged {
                        tx.tree(0).insert(key.as_slice(), spill::store(tx, json))?;
                    }
                    Ok(())
                })
            }));
            let written = write.await;
            guard.in_flight = None;
            written.map_err(|e| Error::internal(format!("store task failed: {e}")))??;
        }
        let now = now_micros();
        let old_gen = self.write(&[&trees.cassettes, &trees.gc], |tx| {
            let (cassettes, gc) = (tx.tree(0), tx.tree(1));
            let old = cassettes.get(&key)?.and_then(|h| decode_header(&h));
            let created_at = old.map_or(now, |(_, created)| created);
            cassettes.insert(key.as_slice(), &encode_header(gen, created_at)[..])?;
            gc.remove(gen.to_be_bytes())?;
            if let Some((old_gen, _)) = old {
                gc.insert(old_gen.to_be_bytes(), key.as_slice())?;
            }
            Ok(old.map(|(g, _)| g))
        })?;
        guard.committed = true;
        drop(guard);
        if let Some(old_gen) = old_gen {
            self.collect_when_durable(old_gen, ticket);
        }
        self.durable(ticket).await?;
        Ok(count)
    }

    async fn delete_cassette(&self, ns: &Namespace, cassette: &Name) -> Result<bool, Error> {
        let ticket = self.ticket();
        let trees = &self.inner.entry_trees;
        let key = cassette_key(ns, cassette);
        let removed = self.write(&[&trees.cassettes, &trees.gc], |tx| {
            let (cassettes, gc) = (tx.tree(0), tx.tree(1));
            let Some(header) = cassettes.remove(key.as_slice())? else {
                return Ok(None);
            };
            let gen = decode_header(&header).map(|h| h.0);
            if let Some(gen) = gen {
                gc.insert(gen.to_be_bytes(), key.as_slice())?;
            }
            Ok(Some(gen))
        })?;
        let Some(gen) = removed else {
            // Nothing to delete, but a concurrent delete may not be durable yet.
            self.durable(ticket).await?;
            return Ok(false);
        };
        if let Some(gen) = gen {
            self.collect_when_durable(gen, ticket);
        }
        self.durable(ticket).await?;
        Ok(true)
    }

    async fn cassette_exists(&self, ns: &Namespace, cassette: &Name) -> Result<bool, Error> {
        let ticket = self.ticket();
        let exists = self
            .inner
            .entry_trees
            .cassettes
            .contains_key(cassette_key(ns, cassette))
            .map_err(sled_error)?;
        self.visible(ticket).await?;
        Ok(exists)
    }

    async fn ensure_cassette(&self, _ns: &Namespace, _cassette: &Name) -> Result<(), Error> {
        // Names are validated when the request is decoded; there is no
        // directory structure to create.
        Ok(())
    }

    async fn list_cassettes(&self, ns: &Namespace, page: &ListPage) -> Result<Page<String>, Error> {
        let ticket = self.ticket();
        let tree = self.inner.entry_trees.cassettes.clone();
        let ns_key = namespace_key(ns);
        let page = page.clone();
        let page = blocking(move || {
            let limit = trove_proto::types::clamp_page_size(page.page_size) as usize;
            let mut items = Vec::new();
            let mut more = false;
            for entry in scan_after(&tree, &ns_key, &page.prefix, page.after.as_deref()) {
                let (key, _) = entry.map_err(sled_error)?;
                let Some((name, _)) = keys::take_part(&key[ns_key.len()..]) else {
                    continue;
                };
                let Ok(name) = String::from_utf8(name) else {
                    continue;
                };
                if items.len() == limit {
                    more = true;
                    break;
                }
                items.push(name);
            }
            let next_page_token = if more {
                items.last().map(|l| encode_page_token(l))
            } else {
                None
            };
            Ok(Page {
                items,
                next_page_token,
            })
        })
        .await?;
        self.visible(ticket).await?;
        Ok(page)
    }
}
