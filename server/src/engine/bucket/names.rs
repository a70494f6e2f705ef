//! Names whose keys are hashed (see [`super::layout`]): the notes that keep
//! their full names, and listings that read those notes so that every
//! listing still comes out in byte order of the names.

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::ObjectMeta;
use trove_proto::Error;

use super::layout::{self, ListedKey};
use super::BucketStore;

/// One name found by a listing: the name, its kind letter, and the record's
/// metadata (its location is where the record is read).
pub(super) type ListedName = (String, char, ObjectMeta);

/// What a listing is for: names in a directory under a prefix, after a name.
#[derive(Debug, Clone)]
pub(super) struct NameQuery {
    /// The directory, relative to the root, ending in `/`.
    pub dir: String,
    /// Names must start with it.
    pub prefix: String,
    /// Names must sort after it (a page token), and the kind letter whose
    /// key the page resumes after.
    pub after: Option<(String, char)>,
}

impl BucketStore {
    /// Writes the note of `record` (its full name `name`) when its key is
    /// hashed; call before writing the record, so a listed record always
    /// has its note.
    pub(super) async fn write_note(&self, record: &Path, name: &str) -> Result<(), Error> {
        if !layout::is_hashed_record(record.as_ref()) {
            return Ok(());
        }
        let note = Path::from(layout::note_of(record.as_ref()));
        self.overwrite(&note, name.as_bytes().to_vec()).await
    }

    /// Lists the names of `query` in byte order, each with its kind.
    pub(super) fn list_names(
        &self,
        query: NameQuery,
    ) -> BoxStream<'static, Result<ListedName, Error>> {
        let room = self.room(&query.dir);
        let start = layout::list_prefix(room, &query.prefix);
        let after_key = query
            .after
            .as_ref()
            .map(|(name, kind)| layout::list_after(room, name, *kind));
        let keys = self
            .list(&query.dir, &start, after_key.as_deref())
            .peekable();
        let state = (Box::pin(keys), query, self.clone());
        futures::stream::unfold(state, |(mut keys, query, store)| async move {
            loop {
                let (rest, meta) = match keys.next().await? {
                    Ok(found) => found,
                    Err(err) => return Some((Err(err), (keys, query, store))),
                };
                let wanted = |name: &str| {
                    name.starts_with(&query.prefix)
                        && query
                            .after
                            .as_ref()
                            .is_none_or(|(after, _)| name > after.as_str())
                };
                match layout::parse_listed(&rest) {
                    Some(ListedKey::Plain(name, kind)) if wanted(&name) => {
                        let batch = vec![Ok((name, kind, meta))];
                        return Some((Ok(batch), (keys, query, store)));
                    }
                    Some(ListedKey::Hashed { group, .. }) => {
                        // The group is contiguous in key order: read it whole.
                        let mut members = vec![(rest, meta)];
                        loop {
                            let same_group = match keys.as_mut().peek().await {
                                Some(Ok((next, _))) => matches!(
                                    layout::parse_listed(next),
                                    Some(ListedKey::Hashed { group: g, .. }) if g == group
                                ),
                                _ => false,
                            };
                            if !same_group {
                                break;
                            }
                            if let Some(Ok(member)) = keys.next().await {
                                members.push(member);
                            }
                        }
                        let resolved = match store.resolve_group(members).await {
                            Ok(resolved) => resolved,
                            Err(err) => return Some((Err(err), (keys, query, store))),
                        };
                        let batch: Vec<_> = resolved
                            .into_iter()
                            .filter(|(name, _, _)| wanted(name))
                            .map(Ok)
                            .collect();
                        if !batch.is_empty() {
                            return Some((Ok(batch), (keys, query, store)));
                        }
                    }
                    _ => {}
                }
            }
        })
        .map_ok(futures::stream::iter)
        .try_flatten()
        .boxed()
    }

    /// The names of one group's records, read from their notes, sorted by
    /// name (then kind). A record without a note (lost) or a note without a
    /// record (a write in progress or a removal half done) is skipped.
    async fn resolve_group(
        &self,
        members: Vec<(String, ObjectMeta)>,
    ) -> Result<Vec<ListedName>, Error> {
        let mut records = Vec::new();
        let mut notes = std::collections::HashSet::new();
        for (rest, meta) in members {
            if let Some(ListedKey::Hashed {
                kind, hash, note, ..
            }) = layout::parse_listed(&rest)
            {
                if note {
                    notes.insert(meta.location.as_ref().to_owned());
                } else {
                    records.push((kind, hash, meta));
                }
            }
        }
        let mut out = Vec::new();
        for (kind, hash, meta) in records {
            let note = layout::note_of(meta.location.as_ref());
            if !notes.contains(&note) {
                tracing::warn!(record = %meta.location, "a hashed record has no name note; not listed");
                continue;
            }
            let Some((bytes, _)) = self.read(&Path::from(note)).await? else {
                continue;
            };
            let Ok(name) = String::from_utf8(bytes.to_vec()) else {
                continue;
            };
            if layout::name_hash(&name) != hash {
                continue;
            }
            out.push((name, kind, meta));
        }
        out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.cmp(&b.1)));
        Ok(out)
    }
}
