//! [`EntryStore`] on the bucket engine.
//!
//! A cassette is one head object at `n/{ns}/c/{cassette}!h`, replaced with
//! conditional writes. The head lists runs: batches of entries stored inline
//! in the head or as a blob, each sorted in read order (see [`super::runs`]).
//! Each append adds one run and takes the next arrival numbers; a replace
//! swaps every run for new ones in one write. Readers take one head, open
//! every run of it, and merge them as they stream: they see one version
//! whole and hold one entry per run.
//!
//! Compaction ([`super::compaction`]) keeps the runs few.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use trove_proto::entries::{
    AppendOptions, EntryCursor, EntryStream, NewEntry, NewEntryStream, ReadOptions, StoredEntry,
};
use trove_proto::types::{
    clamp_page_size, encode_page_token, ByteStream, ListPage, Name, Namespace, Page,
};
use trove_proto::{EntryStore, Error};

use super::formats::*;
use super::layout::*;
use super::names::NameQuery;
use super::runs::{self, RunReader};
use super::{bucket_error, Backoff, BucketStore, Expect, Written};
use crate::engine::record::Body;
use crate::engine::values::check_append;
use object_store::ObjectStoreExt;

use super::compaction::{leave_for_reclaim, COMPACT_RUNS};

impl BucketStore {
    pub(super) async fn read_head(&self, path: &Path) -> Result<Option<(Head, Expect)>, Error> {
        Ok(match self.read(path).await? {
            Some((bytes, version)) => Some((decode_head(&bytes)?, Expect::Version(version))),
            None => None,
        })
    }

    /// Opens every run in `runs` for reading. `None` when a run's blob
    /// vanished (the head was replaced meanwhile): read the head again.
    pub(super) async fn open_runs(&self, runs: &[Run]) -> Result<Option<Vec<RunReader>>, Error> {
        let opens = runs.iter().map(|run| {
            let store = self.clone();
            async move {
                let body: ByteStream = match &run.body {
                    Body::Inline(data) => {
                        let data = Bytes::from(data.clone());
                        futures::stream::once(async move { Ok(data) }).boxed()
                    }
                    Body::Blob(id) => match store.inner.bucket.get(&store.blob_path(*id)).await {
                        Ok(found) => found
                            .into_stream()
                            .map_err(|e| bucket_error("read a cassette run", &e))
                            .boxed(),
                        Err(object_store::Error::NotFound { .. }) => return Ok(None),
                        Err(e) => return Err(bucket_error("open a cassette run", &e)),
                    },
                    Body::Packed { .. } => return Err(super::bodies::packed_here()),
                };
                Ok(Some(RunReader::new(run.clone(), body)))
            }
        });
        let opened: Vec<Option<RunReader>> = futures::future::try_join_all(opens).await?;
        Ok(opened.into_iter().collect())
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
        let body = runs::sorted_body(entries.iter().map(|e| (e.recorded_at, e.json.clone())))?;
        let staged = self
            .stage(
                futures::stream::once(async move { Ok(body) }).boxed(),
                None,
                &path,
            )
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
            if head.has_run(write_id) {
                // An earlier attempt landed although it looked lost.
                break head.runs.len();
            }
            if let Some(key) = &idempotency_key {
                if let Some(applied) = head.applied(key) {
                    if from_memory {
                        // The cassette may have been replaced since: only
                        // the stored head can say the key still applies.
                        continue;
                    }
                    return Ok(applied);
                }
            }
            head.runs.push(Run {
                id: write_id,
                first_seq: head.next_seq,
                count,
                body: staged.body.clone(),
                sorted: true,
                bytes: staged.len,
            });
            head.next_seq += count;
            head.written_by = write_id;
            if let Some(key) = &idempotency_key {
                head.apply(key.clone(), count);
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
        if runs > 4 * COMPACT_RUNS {
            // Appends are outrunning the background compaction: this one
            // waits for it, so a head never grows without bound.
            if let Err(e) = self.compact(&path).await {
                tracing::warn!(error = %e, "cassette compaction failed; the next append retries");
            }
        } else if runs > COMPACT_RUNS {
            self.compact_in_background(path);
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
            let Some(readers) = self.open_runs(&head.runs).await? else {
                continue;
            };
            let limit = options
                .limit
                .filter(|l| *l > 0)
                .map_or(usize::MAX, |l| l as usize);
            let after = options.after;
            let entries = runs::merge(readers)
                .try_filter(move |(recorded_at, seq, _)| {
                    let wanted =
                        after.is_none_or(|c| (*recorded_at, *seq) > (c.recorded_at, c.seq));
                    futures::future::ready(wanted)
                })
                .take(limit)
                .map_ok(|(recorded_at, seq, json)| StoredEntry {
                    json,
                    recorded_at,
                    cursor: EntryCursor { recorded_at, seq }.encode(),
                })
                .boxed();
            return Ok(entries);
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
        let entries = entries
            .inspect_ok(move |_| {
                counter.fetch_add(1, Ordering::Relaxed);
            })
            .boxed();
        let staged = self.stage_sorted_runs(entries, &path).await?;
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
                for (run, _) in staged {
                    run.published();
                }
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
                        .filter(|id| !staged.iter().any(|(run, _)| run.is_blob(&Body::Blob(*id))))
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
                runs: staged
                    .iter()
                    .scan(first_seq, |next, (run, n)| {
                        let at = *next;
                        *next += n;
                        Some(Run {
                            id: write_id,
                            first_seq: at,
                            count: *n,
                            body: run.body.clone(),
                            sorted: true,
                            bytes: run.len,
                        })
                    })
                    .collect(),
                applied: Vec::new(),
                written_by: write_id,
                merged_runs: Vec::new(),
            };
            let mut markers = Vec::new();
            for blob in &old_blobs {
                markers.push(self.mark_retiring(&path, *blob).await?);
            }
            let bytes = encode_head(&head)?;
            for (run, _) in staged.iter_mut() {
                run.sending();
            }
            match self.write(&path, bytes.clone(), &expect).await? {
                Written::Done(version) => {
                    self.remember(&path, bytes.into(), version);
                    let runs = staged.len();
                    for (run, _) in staged {
                        run.published();
                    }
                    leave_for_reclaim(old_blobs, markers);
                    drop(_turn);
                    if runs > COMPACT_RUNS {
                        self.compact_in_background(path);
                    }
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

    /// A cassette written by version 1 (positional, unsorted runs) reads
    /// back in order, and the next append and compaction carry it over.
    #[tokio::test]
    async fn version_one_cassettes_stay_readable() {
        #[derive(serde::Serialize)]
        struct RunV1 {
            id: u64,
            first_seq: u64,
            count: u64,
            body: Body,
        }
        #[derive(serde::Serialize)]
        struct HeadV1 {
            created_at: i64,
            next_seq: u64,
            runs: Vec<RunV1>,
            applied: std::collections::BTreeMap<String, u64>,
            written_by: u64,
        }
        let store = BucketStore::open(Arc::new(InMemory::new()), "r", BucketOptions::default())
            .await
            .expect("open");
        let (ns, c) = (
            Namespace::default(),
            Name::new("cassette", "old").expect("name"),
        );
        let mut body = Vec::new();
        for (at, tag) in [(3i64, "late"), (1, "early")] {
            let json = format!(r#"{{"tag":"{tag}"}}"#);
            body.extend_from_slice(&at.to_be_bytes());
            body.extend_from_slice(&u32::try_from(json.len()).expect("small").to_be_bytes());
            body.extend_from_slice(json.as_bytes());
        }
        let head = HeadV1 {
            created_at: 1,
            next_seq: 102,
            runs: vec![RunV1 {
                id: 1,
                first_seq: 100,
                count: 2,
                body: Body::Inline(body),
            }],
            applied: std::collections::BTreeMap::from([("k".to_owned(), 2)]),
            written_by: 1,
        };
        let mut bytes = vec![1u8];
        bytes.extend_from_slice(&postcard::to_stdvec(&head).expect("encode"));
        store
            .overwrite(&store.head_path(&ns, c.as_str()), bytes)
            .await
            .expect("write v1 head");
        assert_eq!(tags(&store, &ns, &c).await, ["early", "late"]);
        let key = AppendOptions {
            idempotency_key: Some(Name::new("key", "k").expect("name")),
        };
        assert_eq!(
            store
                .append_entries(&ns, &c, vec![entry("again")], key)
                .await
                .expect("retry"),
            2,
            "a key applied under version 1 still applies"
        );
        for i in 0..12 {
            store
                .append_entries(
                    &ns,
                    &c,
                    vec![entry(&format!("n{i}"))],
                    AppendOptions::default(),
                )
                .await
                .expect("append");
        }
        // The new entries carry no time (0): they read before the old ones.
        let mut expected: Vec<String> = (0..12).map(|i| format!("n{i}")).collect();
        expected.extend(["early".to_owned(), "late".to_owned()]);
        assert_eq!(tags(&store, &ns, &c).await, expected);
    }

    /// However many appends, a head keeps at most a few runs, and at most
    /// the newest idempotency keys.
    #[tokio::test]
    async fn heads_stay_bounded() {
        let store = BucketStore::open(Arc::new(InMemory::new()), "r", BucketOptions::default())
            .await
            .expect("open");
        let (ns, c) = (
            Namespace::default(),
            Name::new("cassette", "busy").expect("name"),
        );
        let total = MAX_APPLIED_KEYS + 100;
        for i in 0..total {
            let key = AppendOptions {
                idempotency_key: Some(Name::new("key", format!("k{i}")).expect("name")),
            };
            store
                .append_entries(&ns, &c, vec![entry(&format!("e{i}"))], key)
                .await
                .expect("append");
        }
        // Compaction runs in the background; one more pass settles it.
        let path = store.head_path(&ns, c.as_str());
        store.compact(&path).await.expect("compact");
        let (head, _) = store.read_head(&path).await.expect("read").expect("head");
        assert!(head.runs.len() <= COMPACT_RUNS, "{} runs", head.runs.len());
        assert_eq!(head.applied.len(), MAX_APPLIED_KEYS);
        assert_eq!(
            head.applied.last().map(|(k, _)| k.as_str()),
            Some(format!("k{}", total - 1).as_str())
        );
        let read = tags(&store, &ns, &c).await;
        assert_eq!(read.len(), total);
        assert_eq!(
            read.last().map(String::as_str),
            Some(format!("e{}", total - 1).as_str())
        );
    }

    /// A replacement bigger than one sort chunk, given newest first, is
    /// stored as several sorted runs and reads back in time order.
    #[tokio::test]
    async fn big_replacements_sort_in_chunks() {
        let store = BucketStore::open(Arc::new(InMemory::new()), "r", BucketOptions::default())
            .await
            .expect("open");
        let (ns, c) = (
            Namespace::default(),
            Name::new("cassette", "big").expect("name"),
        );
        let pad = "x".repeat(4000);
        let total = 3000i64;
        let entries = (0..total).rev().map(move |t| {
            NewEntry::parse(
                "e",
                Bytes::from(format!(r#"{{"tag":"{t}","pad":"{pad}"}}"#)),
                Some(t),
            )
        });
        let stream = futures::stream::iter(entries).boxed();
        let written = store
            .replace_entries(&ns, &c, stream)
            .await
            .expect("replace");
        assert_eq!(written, 3000);
        let (head, _) = store
            .read_head(&store.head_path(&ns, c.as_str()))
            .await
            .expect("read")
            .expect("head");
        // 12 MB in 64 KiB test chunks: about 190 runs, merged 16 at a time
        // as they are staged.
        assert!(head.runs.len() > 1, "several runs");
        assert!(
            head.runs.len() < 2 * super::super::compaction::MAX_FAN_IN,
            "{} runs",
            head.runs.len()
        );
        let read = tags(&store, &ns, &c).await;
        let expected: Vec<String> = (0..total).map(|t| t.to_string()).collect();
        assert_eq!(read, expected);
    }
}
