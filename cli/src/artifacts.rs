//! `trove artifacts`: mutable values under keys, through the client's
//! `ArtifactStore` implementation.

use serde_json::json;
use trove_client::trove_proto::artifacts::{ArtifactInfo, PutOptions};
use trove_client::trove_proto::types::{ListPage, Name, Namespace};
use trove_client::trove_proto::ArtifactStore;
use trove_client::TroveClient;

use crate::args::ArtifactsCommand;
use crate::objects::{report_delete, LIST_PAGE};
use crate::report::out;
use crate::report::{human_bytes, human_time, print_json, Outcome};
use crate::transfer::{is_stdio, progress_bar, write_download, Source};

/// Runs one `trove artifacts` command.
pub async fn run(
    client: &TroveClient,
    ns: &Namespace,
    json: bool,
    cmd: ArtifactsCommand,
) -> Outcome {
    match cmd {
        ArtifactsCommand::Put {
            key,
            file,
            content_type,
        } => {
            let key = Name::new("key", key)?;
            let source = Source::open(file.as_deref()).await?;
            let options = PutOptions::new(&content_type, source.len)?;
            let progress = progress_bar(source.len, format!("put {key}"));
            let info = client
                .put_artifact(ns, &key, options, source.into_stream(progress.clone()))
                .await?;
            progress.finish();
            if json {
                print_json(&info_json(&info))?;
            } else {
                out!(
                    "{} {} sha256:{}",
                    info.key,
                    human_bytes(info.size),
                    info.sha256
                );
            }
            Ok(())
        }
        ArtifactsCommand::Get { key, file } => {
            let key = Name::new("key", key)?;
            let (info, body) = client.get_artifact(ns, &key).await?;
            let progress = progress_bar(Some(info.size), format!("get {key}"));
            write_download(body, file.as_deref(), &progress, Some(&info.sha256)).await?;
            progress.finish();
            if json && !is_stdio(file.as_deref()) {
                print_json(&info_json(&info))?;
            }
            Ok(())
        }
        ArtifactsCommand::Stat { key } => {
            let info = client.stat_artifact(ns, &Name::new("key", key)?).await?;
            if json {
                print_json(&info_json(&info))?;
            } else {
                out!("key:          {}", info.key);
                out!("size:         {} ({})", info.size, human_bytes(info.size));
                out!("sha256:       {}", info.sha256);
                out!("content type: {}", info.content_type);
                out!("created:      {}", human_time(info.created_at));
                out!("updated:      {}", human_time(info.updated_at));
            }
            Ok(())
        }
        ArtifactsCommand::Ls { prefix } => {
            let mut page = ListPage::new(&prefix, LIST_PAGE, "")?;
            loop {
                let listed = client.list_artifacts(ns, &page, false).await?;
                for item in listed.items.iter().filter_map(|item| item.info.as_ref()) {
                    if json {
                        print_json(&info_json(item))?;
                    } else {
                        out!(
                            "{}  {:>12}  {}",
                            human_time(item.updated_at),
                            human_bytes(item.size),
                            item.key
                        );
                    }
                }
                match listed.next_page_token {
                    Some(token) => page = ListPage::new(&prefix, LIST_PAGE, &token)?,
                    None => return Ok(()),
                }
            }
        }
        ArtifactsCommand::Rm { key } => {
            let key = Name::new("key", key)?;
            let existed = client.delete_artifact(ns, &key).await?;
            report_delete(json, "key", key.as_str(), existed)
        }
    }
}

fn info_json(info: &ArtifactInfo) -> serde_json::Value {
    json!({
        "key": info.key,
        "size": info.size,
        "sha256": info.sha256,
        "content_type": info.content_type,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
    })
}
