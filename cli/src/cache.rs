//! `trove cache`: the remote test cache (archives per ref, a main tier and PR
//! tiers, branch ref maps, retention), through the client's `CacheStore`
//! implementation.

use std::collections::BTreeMap;

use serde_json::json;
use tokio::io::AsyncReadExt;
use trove_client::trove_proto::cache::{
    check_optional, BranchRefsKey, BranchRefsWrite, CacheScope, CachedRef, PruneOptions, Tier,
    UploadOptions,
};
use trove_client::trove_proto::types::{Name, Namespace};
use trove_client::trove_proto::CacheStore;
use trove_client::TroveClient;

use crate::args::{CacheArgs, CacheCommand, ScopeArgs};
use crate::objects::LIST_PAGE;
use crate::report::out;
use crate::report::{human_bytes, human_time, print_json, Exit, Failure, Outcome};
use crate::transfer::{is_stdio, progress_bar, write_download, Source};

/// Largest branch-ref map file read, in bytes: far above any real map, and
/// the server's message limit would refuse more anyway.
const MAX_BRANCH_REFS_BYTES: u64 = 16 * 1024 * 1024;

/// Runs one `trove cache` command.
pub async fn run(client: &TroveClient, ns: &Namespace, json: bool, args: CacheArgs) -> Outcome {
    let scope = scope(ns, &args.scope)?;
    match args.command {
        CacheCommand::Ls => {
            let mut token = String::new();
            loop {
                let page = client.list_refs(&scope, LIST_PAGE, &token).await?;
                for cached in &page.items {
                    if json {
                        print_json(&ref_json(cached))?;
                    } else {
                        out!(
                            "{}  {:>12}  {:<20}  {}",
                            human_time(cached.uploaded_at),
                            human_bytes(cached.size),
                            tier_label(cached),
                            cached.r#ref,
                        );
                    }
                }
                match page.next_page_token {
                    Some(next) => token = next,
                    None => return Ok(()),
                }
            }
        }
        CacheCommand::Upload {
            reference,
            file,
            tree_sha,
            uploaded_at,
        } => {
            let reference = Name::new("ref", reference)?;
            let source = Source::open(Some(&file)).await?;
            let options = UploadOptions {
                tree_sha: tree_sha.map(|t| Name::new("tree_sha", t)).transpose()?,
                uploaded_at,
                expected_size: source.len,
            };
            let progress = progress_bar(source.len, format!("upload {reference}"));
            let cached = client
                .upload(
                    &scope,
                    &reference,
                    options,
                    source.into_stream(progress.clone()),
                )
                .await?;
            progress.finish();
            if json {
                print_json(&ref_json(&cached))?;
            } else {
                out!(
                    "uploaded {} ({}) to {}",
                    cached.r#ref,
                    human_bytes(cached.size),
                    tier_label(&cached)
                );
            }
            Ok(())
        }
        CacheCommand::Download {
            reference,
            file,
            tree_sha,
        } => {
            let tree_sha = tree_sha.map(|t| Name::new("tree_sha", t)).transpose()?;
            let Some((cached, body)) = client
                .download(&scope, &reference, tree_sha.as_ref())
                .await?
            else {
                return Err(Failure::new(
                    Exit::NotFound,
                    format!("cache miss: no archive for ref {reference:?} in this scope"),
                ));
            };
            let progress = progress_bar(Some(cached.size), format!("download {}", cached.r#ref));
            write_download(body, file.as_deref(), &progress, Some(&cached.sha256)).await?;
            progress.finish();
            if json && !is_stdio(file.as_deref()) {
                print_json(&ref_json(&cached))?;
            } else if !is_stdio(file.as_deref()) {
                out!("downloaded {} from {}", cached.r#ref, tier_label(&cached));
            }
            Ok(())
        }
        CacheCommand::Prune {
            count,
            older_than_secs,
            pr_branch_ttl_secs,
            all,
        } => {
            let removed = if all {
                client
                    .prune_all(ns, &scope.prefix, pr_branch_ttl_secs)
                    .await?
            } else {
                let options = PruneOptions {
                    count,
                    duration_seconds: older_than_secs,
                    pr_branch_ttl_seconds: pr_branch_ttl_secs,
                };
                client.prune(&scope, options).await?
            };
            if json {
                print_json(&json!({ "removed": removed }))?;
            } else {
                out!("removed {removed} refs");
            }
            Ok(())
        }
        CacheCommand::BranchRefs { branch, write } => {
            let branch = branch.unwrap_or_else(|| args.scope.branch.clone());
            match write {
                None => {
                    let key = BranchRefsKey::new(ns.clone(), &scope.prefix, &branch)?;
                    let refs = client.branch_refs(&key).await?;
                    print_json(&json!(refs))?;
                }
                Some(path) => {
                    let refs = read_refs(&path).await?;
                    let write = BranchRefsWrite::new(
                        ns.clone(),
                        &scope.prefix,
                        &branch,
                        scope.default_branch.as_str(),
                        refs,
                    )?;
                    let written = client.write_branch_refs(&write).await?;
                    if json {
                        print_json(&json!({ "branch": branch, "written": written }))?;
                    } else if written {
                        out!("wrote the ref map of {branch}");
                    } else {
                        out!(
                            "nothing written: {branch:?} is blank or the default branch, or the map is empty"
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

/// The scope the flags describe, validated like the server validates it.
fn scope(ns: &Namespace, args: &ScopeArgs) -> Outcome<CacheScope> {
    check_optional("prefix", &args.prefix)?;
    check_optional("suite", &args.suite)?;
    Ok(CacheScope {
        namespace: ns.clone(),
        prefix: args.prefix.clone(),
        branch: Name::new("branch", args.branch.clone())?,
        default_branch: Name::new("default-branch", args.default_branch.clone())?,
        test_suite_id: args.suite.clone(),
    })
}

/// A branch ref map from a JSON object of sha -> epoch seconds.
async fn read_refs(path: &std::path::Path) -> Outcome<BTreeMap<String, i64>> {
    let source = Source::open(Some(path)).await?;
    let label = source.label.clone();
    let mut text = String::new();
    source
        .into_reader()
        .take(MAX_BRANCH_REFS_BYTES + 1)
        .read_to_string(&mut text)
        .await
        .map_err(|e| Failure::io(&label, &e))?;
    if text.len() as u64 > MAX_BRANCH_REFS_BYTES {
        return Err(Failure::new(
            Exit::Invalid,
            format!("{label}: a branch ref map is at most {MAX_BRANCH_REFS_BYTES} bytes"),
        ));
    }
    serde_json::from_str(&text).map_err(|e| {
        Failure::new(
            Exit::Invalid,
            format!("{label}: expected a JSON object of sha -> epoch seconds: {e}"),
        )
    })
}

fn tier_label(cached: &CachedRef) -> String {
    match cached.tier() {
        Tier::Pr => format!("pr:{}", cached.branch),
        Tier::Main | Tier::Unspecified => "main".into(),
    }
}

fn ref_json(cached: &CachedRef) -> serde_json::Value {
    json!({
        "ref": cached.r#ref,
        "test_suite_id": cached.test_suite_id,
        "uploaded_at": cached.uploaded_at,
        "size": cached.size,
        "sha256": cached.sha256,
        "tier": if cached.tier() == Tier::Pr { "pr" } else { "main" },
        "branch": cached.branch,
    })
}
