//! [`EntryStore`] on the bucket engine.
//!
//! A cassette is one head object at `n/{ns}/c/{cassette}!h`, replaced with
//! conditional writes. The head lists runs: batches of entries stored inline
//! in the head or as a blob, in arrival order. Each append adds one run and
//! takes the next arrival numbers; a replace swaps every run for new ones in
//! one write. Readers take one head and so see one version whole.
//!
//! Run bodies are frames `[recorded_at i64 BE][len u32 BE][json]`; frames
//! concatenate, so merging runs (compaction, once a head holds many runs)
//! is appending their bodies.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use trove_proto::entries::{
    AppendOptions, EntryCursor, EntryStream, NewEntry, NewEntryStream, ReadOptions, StoredEntry,
};
use trove_proto::types::{clamp_page_size, encode_page_token, ListPage, Name, Namespace, Page};
use trove_proto::{EntryStore, Error};

use super::formats::*;
use super::layout::*;
use super::names::NameQuery;
use super::{Backoff, BucketStore, Expect, Written};
use crate::engine::record::Body;
use crate::engine::values::check_append;

/// A head with more runs than this is compacted after an append.
const COMPACT_RUNS: usize = 32;
/// Run bodies read at once.
const PARALLEL_READS: usize = 8;

impl BucketStore {
    async fn read_head(&self, path: &Path) -> Result<Option<(Head, Expect)>, Error> {
        Ok(match self.read(path).await? {
            Some((bytes, version)) => Some((decode_head(&bytes)?, Expect::Version(version))),
            None => None,
        })
    }

    /// Every entry of `head`, sorted in read order. `None` when a run's blob
    /// vanished (the head was replaced meanwhile): read the head again.
    async fn load_entries(&self, head: &Head) -> Result<Option<Vec<(i64, u64, Bytes)>>, Error> {
        let reads: Vec<_> = head
            .runs
            .iter()
            .map(|run| {
                let (store, body) = (self.clone(), run.body.clone());
                async move {
                    match body {
                        Body::Inline(data) => Ok::<_, Error>(Some(Bytes::from(data))),
                        Body::Blob(id) => Ok(store
                            .read(&store.path(&format!("blobs/{id:016x}")))
                            .await?
                            .map(|(bytes, _)| bytes)),
                    }
                }
            })
            .collect();
        let bodies: Vec<Option<Bytes>> = futures::stream::iter(reads)
            .buffered(PARALLEL_READS)
            .try_collect()
            .await?;
        let mut entries = Vec::new();
        for (run, body) in head.runs.iter().zip(bodies) {
            let Some(body) = body else {
                return Ok(None);
            };
            decode_run(body, run, &mut entries)?;
        }
        entries.sort_by_key(|(recorded_at, seq, _)| (*recorded_at, *seq));
        Ok(Some(entries))
    }

    /// Merges the runs of a head into one, when it holds many; best effort.
    async fn compact(&self, path: &Path) -> Result<(), Error> {
        let _turn = self.turn(path).await;
        let Some((head, expect)) = self.read_head(path).await? else {
            return Ok(());
        };
        if head.runs.len() <= COMPACT_RUNS {
            return Ok(());
        }
        let mut body = Vec::new();
        for run in &head.runs {
            let data = match &run.body {
                Body::Inline(data) => data.clone(),
                Body::Blob(id) => match self.read(&self.path(&format!("blobs/{id:016x}"))).await? {
                    Some((bytes, _)) => bytes.to_vec(),
                    None => return Ok(()),
                },
            };
            body.extend_from_slice(&data);
        }
        let staged = self
            .stage(
                futures::stream::once(async { Ok(Bytes::from(body)) }).boxed(),
                None,
                path,
            )
            .await?;
        let mut staged = staged;
        let write_id: u64 = rand::random();
        let mut compacted = head.clone();
        compacted.written_by = write_id;
        compacted.runs = vec![Run {
            id: write_id,
            first_seq: head.runs[0].first_seq,
            count: head.runs.iter().map(|r| r.count).sum(),
            body: staged.body.clone(),
        }];
        let old_blobs = head.blobs();
        let mut markers = Vec::new();
        for blob in &old_blobs {
            markers.push(self.mark_retiring(path, *blob).await?);
        }
        let bytes = encode_head(&compacted)?;
        staged.sending();
        let landed = match self.write(path, bytes.clone(), &expect).await? {
            Written::Done(version) => {
                self.remember(path, bytes.into(), version);
                true
            }
            // Lost, or landed with its reply lost: the stored head says.
            Written::Conflict => {
                self.forget(path);
                self.read_head(path)
                    .await?
                    .is_some_and(|(now, _)| now.written_by == write_id)
            }
        };
        if landed {
            staged.published();
            self.retire(old_blobs, markers).await;
        } else {
            // Someone appended meanwhile; the next append compacts. The
            // merged blob stays with its marker for reclaim.
            self.retire(Vec::new(), markers).await;
        }
        Ok(())
    }
}

#[async_trait]
impl EntryStore for BucketStore {
    async fn append_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: Vec<NewEntry>,
        options: AppendOptions,
    ) -> Result<u64, Error> {
        check_append(&entries)?;
        let count = entries.len() as u64;
        let path = self.head_path(ns, cassette.as_str());
        let frames: Vec<Result<Bytes, Error>> = entries.iter().map(encode_frame).collect();
        let staged = self
            .stage(futures::stream::iter(frames).boxed(), None, &path)
            .await?;
        self.write_note(&path, cassette.as_str()).await?;
        let idempotency_key = options.idempotency_key.map(|k| k.as_str().to_owned());
        let turn = self.turn(&path).await;
        let mut staged = staged;
        let write_id: u64 = rand::random();
        let mut backoff = Backoff::new();
        // A head this process wrote last is tried first, without a read;
        // if anyone changed it since, the conditional write says so.
        let mut remembered = match self.recall(&path) {
            Some((bytes, version)) => Some((decode_head(&bytes)?, Expect::Version(version))),
            None => None,
        };
        let runs = loop {
            let from_memory = remembered.is_some();
            let current = match remembered.take() {
                Some(found) => Some(found),
                None => self.read_head(&path).await?,
            };
            let (mut head, expect) = match current {
                Some(found) => found,
                None => (new_head(), Expect::Absent),
            };
            if head.runs.iter().any(|run| run.id == write_id) {
                // An earlier attempt landed although it looked lost.
                break head.runs.len();
            }
            if let Some(key) = &idempotency_key {
                if let Some(applied) = head.applied.get(key) {
                    if from_memory {
                        // The cassette may have been replaced since: only
                        // the stored head can say the key still applies.
                        continue;
                    }
                    return Ok(*applied);
                }
            }
            head.runs.push(Run {
                id: write_id,
                first_seq: head.next_seq,
                count,
                body: staged.body.clone(),
            });
            head.next_seq += count;
            head.written_by = write_id;
            if let Some(key) = &idempotency_key {
                head.applied.insert(key.clone(), count);
            }
            let bytes = encode_head(&head)?;
            staged.sending();
            match self.write(&path, bytes.clone(), &expect).await? {
                Written::Done(version) => {
                    self.remember(&path, bytes.into(), version);
                    break head.runs.len();
                }
                Written::Conflict => {
                    self.forget(&path);
                    if !from_memory {
                        backoff.wait("append to the cassette").await?;
                    }
                }
            }
        };
        staged.published();
        drop(turn);
        if runs > COMPACT_RUNS {
            if let Err(e) = self.compact(&path).await {
                tracing::warn!(error = %e, "cassette compaction failed; the next append retries");
            }
        }
        Ok(count)
    }

    async fn read_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        options: ReadOptions,
    ) -> Result<EntryStream, Error> {
        let path = self.head_path(ns, cassette.as_str());
        for _ in 0..8 {
            let Some((head, _)) = self.read_head(&path).await? else {
                return Ok(futures::stream::empty().boxed());
            };
            let Some(entries) = self.load_entries(&head).await? else {
                continue;
            };
            let limit = options
                .limit
                .filter(|l| *l > 0)
                .map_or(usize::MAX, |l| l as usize);
            let after = options.after;
            let selected: Vec<Result<StoredEntry, Error>> = entries
                .into_iter()
                .filter(|(recorded_at, seq, _)| {
                    after.is_none_or(|c| (*recorded_at, *seq) > (c.recorded_at, c.seq))
                })
                .take(limit)
                .map(|(recorded_at, seq, json)| {
                    Ok(StoredEntry {
                        json,
                        recorded_at,
                        cursor: EntryCursor { recorded_at, seq }.encode(),
                    })
                })
                .collect();
            return Ok(futures::stream::iter(selected).boxed());
        }
        Err(Error::Unavailable {
            message: format!(
                "cassette {} kept changing while it was read; retry",
                trove_proto::error::shorten(cassette.as_str())
            ),
        })
    }

    async fn replace_entries(
        &self,
        ns: &Namespace,
        cassette: &Name,
        entries: NewEntryStream,
    ) -> Result<u64, Error> {
        let path = self.head_path(ns, cassette.as_str());
        let counted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&counted);
        let frames = entries
            .map(move |entry| {
                let entry = entry?;
                counter.fetch_add(1, Ordering::Relaxed);
                encode_frame(&entry)
            })
            .boxed();
        let staged = self.stage(frames, None, &path).await?;
        self.write_note(&path, cassette.as_str()).await?;
        let count = counted.load(Ordering::Relaxed);
        let _turn = self.turn(&path).await;
        let mut staged = staged;
        let write_id: u64 = rand::random();
        let mut backoff = Backoff::new();
        loop {
            let current = self.read_head(&path).await?;
            if current
                .as_ref()
                .is_some_and(|(head, _)| head.written_by == write_id)
            {
                // An earlier attempt landed although it looked lost.
                staged.published();
                return Ok(count);
            }
            let (created_at, first_seq, old_blobs, expect) = match &current {
                Some((head, expect)) => (
                    head.created_at,
                    // Arrival numbers keep growing across a replace, so a
                    // cursor from before it never skips what comes after.
                    head.next_seq,
                    // Never the staged run itself.
                    head.blobs()
                        .into_iter()
                        .filter(|id| !staged.is_blob(&Body::Blob(*id)))
                        .collect(),
                    expect.clone(),
                ),
                None => {
                    let fresh = new_head();
                    (fresh.created_at, fresh.next_seq, Vec::new(), Expect::Absent)
                }
            };
            let head = Head {
                created_at,
                next_seq: first_seq + count,
                runs: if count == 0 {
                    Vec::new()
                } else {
                    vec![Run {
                        id: write_id,
                        first_seq,
                        count,
                        body: staged.body.clone(),
                    }]
                },
                applied: BTreeMap::new(),
                written_by: write_id,
            };
            let mut markers = Vec::new();
            for blob in &old_blobs {
                markers.push(self.mark_retiring(&path, *blob).await?);
            }
            let bytes = encode_head(&head)?;
            staged.sending();
            match self.write(&path, bytes.clone(), &expect).await? {
                Written::Done(version) => {
                    self.remember(&path, bytes.into(), version);
                    staged.published();
                    self.retire(old_blobs, markers).await;
                    return Ok(count);
                }
                Written::Conflict => {
                    self.forget(&path);
                    self.retire(Vec::new(), markers).await;
                    backoff.wait("replace the cassette").await?;
                }
            }
        }
    }

    async fn delete_cassette(&self, ns: &Namespace, cassette: &Name) -> Result<bool, Error> {
        self.remove_value(&self.head_path(ns, cassette.as_str()))
            .await
    }

    async fn cassette_exists(&self, ns: &Namespace, cassette: &Name) -> Result<bool, Error> {
        self.exists(&self.head_path(ns, cassette.as_str())).await
    }

    async fn ensure_cassette(&self, _ns: &Namespace, _cassette: &Name) -> Result<(), Error> {
        // Names are validated when the request is decoded; nothing to create.
        Ok(())
    }

    async fn list_cassettes(&self, ns: &Namespace, page: &ListPage) -> Result<Page<String>, Error> {
        let limit = clamp_page_size(page.page_size) as usize;
        let query = NameQuery {
            dir: Self::ns_dir(ns, 'c'),
            prefix: page.prefix.clone(),
            after: page.after.clone().map(|a| (a, KIND_HEAD)),
        };
        let mut names: Vec<String> = self
            .list_names(query)
            .try_filter_map(|(name, kind, _)| {
                futures::future::ready(Ok((kind == KIND_HEAD).then_some(name)))
            })
            .take(limit + 1)
            .try_collect()
            .await?;
        let more = names.len() > limit;
        names.truncate(limit);
        let next_page_token = if more {
            names.last().map(|last| encode_page_token(last))
        } else {
            None
        };
        Ok(Page {
            items: names,
            next_page_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::bucket::BucketOptions;
    use object_store::memory::InMemory;

    fn entry(tag: &str) -> NewEntry {
        NewEntry::parse(
            "entries[0]",
            Bytes::from(format!(r#"{{"tag":"{tag}"}}"#)),
            None,
        )
        .expect("entry")
    }

    async fn tags(store: &BucketStore, ns: &Namespace, cassette: &Name) -> Vec<String> {
        let entries: Vec<StoredEntry> = store
            .read_entries(ns, cassette, ReadOptions::default())
            .await
            .expect("read")
            .try_collect()
            .await
            .expect("entries");
        entries
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_slice(&e.json).expect("json");
                v["tag"].as_str().unwrap_or_default().to_owned()
            })
            .collect()
    }

    /// Two engines on one bucket (two servers): a head one of them remembers
    /// goes stale when the other writes, and nothing is lost or skipped.
    #[tokio::test]
    async fn remembered_heads_never_hide_other_writers() {
        let bucket: Arc<InMemory> = Arc::new(InMemory::new());
        let a = BucketStore::open(bucket.clone(), "r", BucketOptions::default())
            .await
            .expect("open a");
        let b = BucketStore::open(bucket, "r", BucketOptions::default())
            .await
            .expect("open b");
        let (ns, c) = (
            Namespace::default(),
            Name::new("cassette", "c").expect("name"),
        );
        let key = || AppendOptions {
            idempotency_key: Some(Name::new("key", "k").expect("name")),
        };
        a.append_entries(&ns, &c, vec![entry("a1")], key())
            .await
            .expect("a1");
        b.append_entries(&ns, &c, vec![entry("b1")], AppendOptions::default())
            .await
            .expect("b1");
        // A's remembered head is stale: its write must notice and retry.
        a.append_entries(&ns, &c, vec![entry("a2")], AppendOptions::default())
            .await
            .expect("a2");
        assert_eq!(tags(&b, &ns, &c).await, ["a1", "b1", "a2"]);
        // A retry of the keyed batch writes nothing...
        a.append_entries(&ns, &c, vec![entry("a1")], key())
            .await
            .expect("retry");
        assert_eq!(tags(&a, &ns, &c).await, ["a1", "b1", "a2"]);
        // ...until B replaces the content: then the key no longer applies,
        // although A still remembers a head that has it.
        let replacement = futures::stream::iter([Ok(entry("b2"))]).boxed();
        b.replace_entries(&ns, &c, replacement)
            .await
            .expect("replace");
        a.append_entries(&ns, &c, vec![entry("a3")], key())
            .await
            .expect("a3");
        assert_eq!(tags(&a, &ns, &c).await, ["b2", "a3"]);
    }
}
