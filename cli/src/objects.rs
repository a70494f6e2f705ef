//! `trove objects` and `trove streams`: content-addressed blobs and chunk
//! streams, through the client's `ObjectStore` implementation.

use base64::Engine as _;
use futures::StreamExt;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use trove_client::trove_proto::objects::{ObjectInfo, StreamChunk, MAX_FIND_MISSING};
use trove_client::trove_proto::types::{ListPage, Name, Namespace};
use trove_client::trove_proto::{Error, ObjectStore};
use trove_client::TroveClient;

use crate::args::{ObjectsCommand, StreamsCommand};
use crate::report::out;
use crate::report::{human_bytes, human_time, print_json, Failure, Outcome};
use crate::transfer::{hash_file, is_regular_file, is_stdio, progress_bar, write_download, Source};

/// Page size used to walk listings.
pub const LIST_PAGE: u32 = 1000;

/// Runs one `trove objects` command.
pub async fn run(client: &TroveClient, ns: &Namespace, json: bool, cmd: ObjectsCommand) -> Outcome {
    match cmd {
        ObjectsCommand::Put { file, hash } => put(client, ns, json, &file, hash).await,
        ObjectsCommand::Get { hash, file } => {
            let hash = Name::new("hash", hash)?;
            let (info, body) = client.get_object(ns, &hash).await?;
            let progress = progress_bar(Some(info.size), format!("get {hash}"));
            // Every object carries its SHA-256, verified hash or not.
            write_download(body, file.as_deref(), &progress, Some(&info.sha256)).await?;
            progress.finish();
            if json && !is_stdio(file.as_deref()) {
                print_json(&info_json(&info))?;
            }
            Ok(())
        }
        ObjectsCommand::Stat { hash } => {
            let info = client.stat_object(ns, &Name::new("hash", hash)?).await?;
            if json {
                print_json(&info_json(&info))?;
            } else {
                out!("hash:     {}", info.hash);
                out!("size:     {} ({})", info.size, human_bytes(info.size));
                out!("sha256:   {}", info.sha256);
                out!("verified: {}", info.verified);
                out!("created:  {}", human_time(info.created_at));
            }
            Ok(())
        }
        ObjectsCommand::Ls { prefix } => {
            let mut page = ListPage::new(&prefix, LIST_PAGE, "")?;
            loop {
                let listed = client.list_objects(ns, &page).await?;
                for item in &listed.items {
                    if json {
                        print_json(&json!({
                            "hash": item.hash,
                            "size": item.size,
                            "has_object": item.has_object,
                            "has_stream": item.has_stream,
                        }))?;
                    } else {
                        let kinds = match (item.has_object, item.has_stream) {
                            (true, true) => "object+stream",
                            (true, false) => "object",
                            _ => "stream",
                        };
                        out!("{:>12}  {kinds:<13}  {}", human_bytes(item.size), item.hash);
                    }
                }
                match listed.next_page_token {
                    Some(token) => page = ListPage::new(&prefix, LIST_PAGE, &token)?,
                    None => return Ok(()),
                }
            }
        }
        ObjectsCommand::Rm { hash } => {
            let hash = Name::new("hash", hash)?;
            let existed = client.delete_object(ns, &hash).await?;
            report_delete(json, "hash", hash.as_str(), existed)
        }
        ObjectsCommand::Missing { hashes } => missing(client, ns, json, hashes).await,
    }
}

async fn put(
    client: &TroveClient,
    ns: &Namespace,
    json: bool,
    file: &std::path::Path,
    name: Option<String>,
) -> Outcome {
    // The hash travels in the first message, so it must be known before the
    // first byte is sent: a regular file is read twice; standard input, a
    // pipe or a device is spooled to a temporary file while hashing.
    let (source, hash) = match name {
        Some(name) => (Source::open(Some(file)).await?, Name::new("hash", name)?),
        None if is_regular_file(file) => {
            let digest = hash_file(file).await?;
            (Source::open(Some(file)).await?, Name::new("hash", digest)?)
        }
        None => {
            let (spooled, digest) = Source::open(Some(file)).await?.spool().await?;
            (spooled, Name::new("hash", digest)?)
        }
    };
    let progress = progress_bar(source.len, format!("put {hash}"));
    let len = source.len;
    let info = client
        .put_object(ns, &hash, len, source.into_stream(progress.clone()))
        .await?;
    progress.finish();
    if json {
        print_json(&info_json(&info))?;
    } else {
        out!("{}", info.hash);
    }
    Ok(())
}

async fn missing(client: &TroveClient, ns: &Namespace, json: bool, hashes: Vec<String>) -> Outcome {
    let hashes = if hashes.is_empty() {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut read = Vec::new();
        while let Some(line) = lines
            .next_line()
            .await
            .map_err(|e| Failure::io("standard input", &e))?
        {
            let line = line.trim();
            if !line.is_empty() {
                read.push(line.to_owned());
            }
        }
        read
    } else {
        hashes
    };
    let names = hashes
        .into_iter()
        .map(|h| Name::new("hash", h))
        .collect::<Result<Vec<_>, _>>()?;
    let mut missing = Vec::new();
    for batch in names.chunks(MAX_FIND_MISSING) {
        missing.extend(client.find_missing(ns, batch).await?);
    }
    if json {
        let missing: Vec<&str> = missing.iter().map(Name::as_str).collect();
        print_json(&json!({ "missing": missing }))?;
    } else {
        for name in &missing {
            out!("{name}");
        }
    }
    Ok(())
}

/// Runs one `trove streams` command.
pub async fn run_streams(
    client: &TroveClient,
    ns: &Namespace,
    json: bool,
    cmd: StreamsCommand,
) -> Outcome {
    match cmd {
        StreamsCommand::Put { hash, file } => {
            let hash = Name::new("hash", hash)?;
            let lines = crate::cassettes::json_lines(Some(&file)).await?;
            let chunks = lines
                .map(|line| line.and_then(|(number, text)| parse_chunk(number, text)))
                .boxed();
            let info = client.put_stream(ns, &hash, chunks).await?;
            if json {
                return print_json(&json!({
                    "hash": info.hash,
                    "chunk_count": info.chunk_count,
                    "total_bytes": info.total_bytes,
                    "created_at": info.created_at,
                }));
            }
            out!(
                "stored {} chunks ({}) under {}",
                info.chunk_count,
                human_bytes(info.total_bytes),
                info.hash
            );
            Ok(())
        }
        StreamsCommand::Get { hash } => {
            let hash = Name::new("hash", hash)?;
            let (_, mut chunks) = client.get_stream(ns, &hash).await?;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                let mut line = json!({
                    "data": base64::engine::general_purpose::STANDARD.encode(&chunk.data),
                });
                if let Some(ts) = chunk.timestamp {
                    line["timestamp"] = json!(ts);
                }
                print_json(&line)?;
            }
            Ok(())
        }
    }
}

/// One stream chunk from a JSON line: `data` (base64) or `text`, and an
/// optional integer `timestamp`.
fn parse_chunk(number: u64, line: String) -> Result<StreamChunk, Error> {
    let field = format!("line {number}");
    let value: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| Error::invalid(&field, format!("is not valid JSON ({e})")))?;
    let object = value
        .as_object()
        .ok_or_else(|| Error::invalid(&field, "must be a JSON object"))?;
    let data = match (object.get("data"), object.get("text")) {
        (Some(serde_json::Value::String(b64)), None) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| Error::invalid(&field, format!("\"data\" is not base64: {e}")))?,
        (None, Some(serde_json::Value::String(text))) => text.clone().into_bytes(),
        (None, None) => Vec::new(),
        _ => {
            return Err(Error::invalid(
                &field,
                "needs a string \"data\" (base64) or \"text\", not both",
            ))
        }
    };
    let timestamp = match object.get("timestamp") {
        None | Some(serde_json::Value::Null) => None,
        Some(ts) => Some(
            ts.as_i64()
                .ok_or_else(|| Error::invalid(&field, "\"timestamp\" must be an integer"))?,
        ),
    };
    Ok(StreamChunk {
        data: data.into(),
        timestamp,
    })
}

fn info_json(info: &ObjectInfo) -> serde_json::Value {
    json!({
        "hash": info.hash,
        "size": info.size,
        "sha256": info.sha256,
        "verified": info.verified,
        "created_at": info.created_at,
    })
}

/// Reports an idempotent delete: what was named and whether it was there.
pub fn report_delete(json: bool, field: &str, name: &str, existed: bool) -> Outcome {
    if json {
        return print_json(&json!({ field: name, "existed": existed }));
    }
    if existed {
        out!("deleted {name}");
    } else {
        out!("{name} was not there (nothing to delete)");
    }
    Ok(())
}
