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
            let mut entries = new_entries(&file, with_meta).await?;
            let mut appended = 0u64;
            let mut pending = Vec::new();
            let mut pending_bytes = 0usize;
            loop {
                let next = entries.try_next().await?;
                let full = pending.len() >= batch as usize
                    || next
                        .as_ref()
                        .is_some_and(|e| pending_bytes + e.json.len() > APPEND_BATCH_BYTES);
                if !pending.is_empty() && (next.is_none() || full) {
                    pending_bytes = 0;
                    let batch = std::mem::take(&mut pending);
                    appended += client
                        .append_entries(ns, &name, batch, AppendOptions::default())
                        .await?;
                }
                match next {
                    Some(entry) => {
                        pending_bytes += entry.json.len();
                        pending.push(entry);
                    }
                    None => break,
                }
            }
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
