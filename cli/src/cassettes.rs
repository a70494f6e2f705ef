//! `trove cassettes`: recorded interactions as JSON lines in and out, through
//! the client's `EntryStore` implementation; and the JSON-lines reader the
//! streams commands share.

use std::path::Path;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use trove_client::trove_proto::entries::{AppendOptions, NewEntry, ReadOptions, StoredEntry};
use trove_client::trove_proto::types::{ListPage, Name, Namespace};
use trove_client::trove_proto::{EntryStore, Error};
use trove_client::TroveClient;

use crate::args::CassettesCommand;
use crate::objects::{report_delete, LIST_PAGE};
use crate::report::out;
use crate::report::{print_json, Exit, Failure, Outcome};
use crate::transfer::Source;

/// Most bytes of entries gathered into one Append call, whatever `--batch` says,
/// so a batch stays well under the server's default message limit.
const APPEND_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Runs one `trove cassettes` command.
pub async fn run(
    client: &TroveClient,
    ns: &Namespace,
    json: bool,
    cmd: CassettesCommand,
) -> Outcome {
    match cmd {
        CassettesCommand::Ls { prefix } => {
            let mut page = ListPage::new(&prefix, LIST_PAGE, "")?;
            loop {
                let listed = client.list_cassettes(ns, &page).await?;
                for name in &listed.items {
                    if json {
                        print_json(&json!({ "name": name }))?;
                    } else {
                        out!("{name}");
                    }
                }
                match listed.next_page_token {
                    Some(token) => page = ListPage::new(&prefix, LIST_PAGE, &token)?,
                    None => return Ok(()),
                }
            }
        }
        CassettesCommand::Read { name, with_meta } => {
            let name = Name::new("cassette", name)?;
            let mut entries = client
                .read_entries(ns, &name, ReadOptions::default())
                .await?;
            while let Some(entry) = entries.next().await {
                out!("{}", entry_line(&entry?, with_meta));
            }
            Ok(())
        }
        CassettesCommand::Append {
            name,
            file,
            with_meta,
            batch,
        } => {
            let name = Name::new("cassette", name)?;
            let entries = new_entries(&file, with_meta).await?;
            let appended = append_in_batches(client, ns, &name, entries, batch as usize).await?;
            report_count(json, "appended", appended, &name)
        }
        CassettesCommand::Replace {
            name,
            file,
            with_meta,
        } => {
            let name = Name::new("cassette", name)?;
            let entries = new_entries(&file, with_meta).await?;
            let count = client.replace_entries(ns, &name, entries).await?;
            report_count(json, "replaced", count, &name)
        }
        CassettesCommand::Rm { name } => {
            let name = Name::new("cassette", name)?;
            let existed = client.delete_cassette(ns, &name).await?;
            report_delete(json, "cassette", name.as_str(), existed)
        }
        CassettesCommand::Exists { name } => {
            let name = Name::new("cassette", name)?;
            let exists = client.cassette_exists(ns, &name).await?;
            if json {
                print_json(&json!({ "cassette": name.as_str(), "exists": exists }))?;
            } else {
                out!("{exists}");
            }
            if exists {
                Ok(())
            } else {
                // The answer is printed; the exit code alone tells scripts.
                Err(Failure::new(Exit::NotFound, ""))
            }
        }
    }
}

/// Appends entries in batches of at most `batch` entries (and about
/// [`APPEND_BATCH_BYTES`]), sending each batch as soon as it is full so a
/// slow producer (`tail -f`) is not held back. Each batch carries an
/// idempotency key, so the retries of an ambiguous failure (the reply was
/// lost, the connection dropped) never append it twice. A failure reports
/// how many entries earlier batches appended.
async fn append_in_batches(
    client: &TroveClient,
    ns: &Namespace,
    name: &Name,
    mut entries: BoxStream<'static, Result<NewEntry, Error>>,
    batch: usize,
) -> Outcome<u64> {
    let mut batches = Batches {
        client,
        ns,
        name,
        run_id: run_id(),
        pending: Vec::new(),
        pending_bytes: 0,
        sent: 0,
        appended: 0,
    };
    loop {
        let next = entries.try_next().await.map_err(|e| batches.failure(e))?;
        let Some(entry) = next else {
            batches.send().await?;
            return Ok(batches.appended);
        };
        if batches.pending_bytes + entry.json.len() > APPEND_BATCH_BYTES {
            batches.send().await?;
        }
        batches.pending_bytes += entry.json.len();
        batches.pending.push(entry);
        if batches.pending.len() >= batch {
            batches.send().await?;
        }
    }
}

/// The state of a batched append.
struct Batches<'a> {
    client: &'a TroveClient,
    ns: &'a Namespace,
    name: &'a Name,
    run_id: String,
    pending: Vec<NewEntry>,
    pending_bytes: usize,
    sent: u64,
    appended: u64,
}

impl Batches<'_> {
    /// Sends the pending entries, if any, as one Append.
    async fn send(&mut self) -> Outcome {
        if self.pending.is_empty() {
            return Ok(());
        }
        let key = Name::new(
            "idempotency_key",
            format!("trove-cli/{}/{}", self.run_id, self.sent),
        )?;
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let written = append_with_retries(self.client, self.ns, self.name, batch, key)
            .await
            .map_err(|e| self.failure(e))?;
        self.appended += written;
        self.sent += 1;
        Ok(())
    }

    /// A failure that also says what earlier batches appended.
    fn failure(&self, err: Error) -> Failure {
        let mut failure = Failure::from(err);
        failure.message = format!(
            "{}; {} entries from earlier lines were appended before this",
            failure.message, self.appended
        );
        failure
    }
}

/// One Append, tried up to three times while the outcome is unknown.
async fn append_with_retries(
    client: &TroveClient,
    ns: &Namespace,
    name: &Name,
    batch: Vec<NewEntry>,
    key: Name,
) -> Result<u64, Error> {
    const ATTEMPTS: u32 = 3;
    let mut attempt = 1;
    loop {
        let options = AppendOptions {
            idempotency_key: Some(key.clone()),
        };
        match client
            .append_entries(ns, name, batch.clone(), options)
            .await
        {
            Err(
                Error::Unavailable { .. }
                | Error::DeadlineExceeded { .. }
                | Error::Cancelled { .. },
            ) if attempt < ATTEMPTS => {
                tokio::time::sleep(std::time::Duration::from_millis(250 * u64::from(attempt)))
                    .await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// An identifier unique to this run of the command, for idempotency keys.
fn run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness once per process.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:016x}", hasher.finish())
}

fn report_count(json: bool, verb: &str, count: u64, name: &Name) -> Outcome {
    if json {
        print_json(&json!({ "cassette": name.as_str(), verb: count }))
    } else {
        out!("{verb} {count} entries: {name}");
        Ok(())
    }
}

/// One read entry as a JSON line: the entry itself, or with `with_meta` an
/// envelope carrying its timestamp and cursor.
fn entry_line(entry: &StoredEntry, with_meta: bool) -> String {
    let raw = compact_json(&entry.json);
    if with_meta {
        format!(
            "{{\"recorded_at\":{},\"cursor\":{},\"entry\":{raw}}}",
            entry.recorded_at,
            json!(entry.cursor)
        )
    } else {
        raw
    }
}

/// Removes whitespace outside strings so a stored entry that spans several
/// lines prints as one; other entries are printed exactly as stored.
fn compact_json(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    if !text.contains(['\n', '\r']) {
        return text.into_owned();
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// Entries from JSON lines: each line an object, or with `with_meta` an
/// envelope `{"recorded_at": N, "entry": {...}}`. A bad line ends the stream
/// with `InvalidArgument` naming the line.
async fn new_entries(
    path: &Path,
    with_meta: bool,
) -> Outcome<BoxStream<'static, Result<NewEntry, Error>>> {
    let lines = json_lines(Some(path)).await?;
    Ok(lines
        .map(move |line| {
            let (number, text) = line?;
            let field = format!("line {number}");
            if !with_meta {
                return NewEntry::parse(&field, Bytes::from(text), None);
            }
            let envelope: Envelope = serde_json::from_str(&text).map_err(|e| {
                Error::invalid(
                    &field,
                    format!("is not {{\"recorded_at\": N, \"entry\": {{...}}}}: {e}"),
                )
            })?;
            NewEntry::parse(
                &field,
                Bytes::copy_from_slice(envelope.entry.get().as_bytes()),
                envelope.recorded_at,
            )
        })
        .boxed())
}

/// What `read --with-meta` prints and `append --with-meta` reads; the entry
/// is kept as written, byte for byte.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    recorded_at: Option<i64>,
    #[serde(borrow)]
    entry: &'a serde_json::value::RawValue,
}

/// The non-blank lines of a file or standard input, numbered from 1.
pub async fn json_lines(
    path: Option<&Path>,
) -> Outcome<BoxStream<'static, Result<(u64, String), Error>>> {
    let source = Source::open(path).await?;
    let label = source.label.clone();
    let lines = tokio::io::BufReader::new(source.into_reader()).lines();
    Ok(futures::stream::try_unfold(
        (lines, 0u64, label),
        |(mut lines, mut number, label)| async move {
            loop {
                number += 1;
                let line = lines.next_line().await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        Error::invalid(format!("line {number}"), "is not UTF-8")
                    } else {
                        Error::internal(format!("reading {label}: {e}"))
                    }
                })?;
                match line {
                    None => return Ok(None),
                    Some(line) if line.trim().is_empty() => continue,
                    Some(line) => return Ok(Some(((number, line), (lines, number, label)))),
                }
            }
        },
    )
    .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Multi-line entries print on one line; whitespace inside strings stays.
    #[test]
    fn compacts_only_outside_strings() {
        assert_eq!(
            compact_json(b"{\n  \"a\": \"x y\\\" z\",\n  \"b\": [1, 2]\n}"),
            "{\"a\":\"x y\\\" z\",\"b\":[1,2]}"
        );
        assert_eq!(compact_json(b"{\"a\": 1}"), "{\"a\": 1}");
    }
}
