//! Trove from other languages: Python stubs generated from proto/ at test time
//! and Node loading proto/ dynamically both exercise the real server; the
//! README's snippets run; the protos pass a real linter, and a renumbered
//! field is caught by the breaking-change check.
//!
//! The tools come from the package registries and are installed by `.ci/run`
//! into `target/ci-tools` (or named by `TROVE_PYTHON`, `TROVE_NODE_MODULES`,
//! `TROVE_BUF`). Without them these tests skip with a message, except under
//! CI, where a missing tool is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use trove_tests::harness::ServerProcess;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn tools() -> PathBuf {
    workspace().join("target").join("ci-tools")
}

fn proto_root() -> PathBuf {
    workspace().join("proto").join("proto")
}

/// Returns the tool, or None after printing why the test is skipped (a panic under CI).
fn tool(env: &str, default: PathBuf, probe: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or(default);
    let works = Command::new(&path)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Some(path);
    }
    let message = format!(
        "{} not usable (set {env} or run .ci/run to install it)",
        path.display()
    );
    trove_tests::skip(&message);
    None
}

fn python() -> Option<PathBuf> {
    tool(
        "TROVE_PYTHON",
        tools().join("venv").join("bin").join("python"),
        &[
            "-c",
            "import grpc, grpc_tools, grpc_health, grpc_reflection",
        ],
    )
}

fn node() -> Option<(PathBuf, PathBuf)> {
    let modules = std::env::var_os("TROVE_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools().join("node").join("node_modules"));
    let node = tool("TROVE_NODE", PathBuf::from("node"), &["--version"])?;
    if modules.join("@grpc").join("grpc-js").exists()
        && modules.join("@grpc").join("proto-loader").exists()
    {
        return Some((node, modules));
    }
    let message = format!(
        "@grpc/grpc-js and @grpc/proto-loader not found in {}",
        modules.display()
    );
    trove_tests::skip(&message);
    None
}

/// The breaking rules of the checked-in proto/buf.yaml, for scratch copies
/// that do not have the repository layout.
fn breaking_config() -> String {
    let config = std::fs::read_to_string(workspace().join("proto/buf.yaml")).expect("buf.yaml");
    assert!(
        config.contains("- WIRE_JSON"),
        "the scratch check must use the checked-in rules"
    );
    r#"{"version":"v2","breaking":{"use":["WIRE_JSON"]}}"#.to_owned()
}

fn buf() -> Option<PathBuf> {
    tool(
        "TROVE_BUF",
        tools().join("venv").join("bin").join("buf"),
        &["--version"],
    )
}

#[track_caller]
fn assert_ran(output: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("run"))
        .await
        .expect("join")
}

/// The README shows this file's content verbatim.
#[track_caller]
fn assert_in_readme(snippet: &Path) {
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README");
    let code = std::fs::read_to_string(snippet).expect("snippet");
    assert!(
        readme.contains(code.trim()),
        "README.md must contain {} verbatim",
        snippet.display()
    );
}

/// Python stubs generated from proto/ exercise every service: streaming both ways, errors, health, reflection.
#[tokio::test]
async fn python_client_exercises_every_service() {
    let Some(python) = python() else { return };
    let server = ServerProcess::start().await;
    let mut command = Command::new(python);
    command
        .arg(workspace().join("tests/python/trove_check.py"))
        .arg(proto_root())
        .arg(server.addr.to_string());
    let stdout = assert_ran(&run(command).await, "the Python checks");
    assert!(stdout.contains("7 passed, 0 failed"), "{stdout}");
}

/// Python stubs for the four services, generated from proto/.
async fn python_stubs(python: &Path) -> tempfile::TempDir {
    let stubs = tempfile::tempdir().expect("dir");
    let mut protoc = Command::new(python);
    protoc
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_root().display()));
    protoc.arg(format!("--python_out={}", stubs.path().display()));
    protoc.arg(format!("--grpc_python_out={}", stubs.path().display()));
    for file in ["objects", "artifacts", "entries", "cache"] {
        protoc.arg(proto_root().join(format!("trove/v1/{file}.proto")));
    }
    assert_ran(&run(protoc).await, "grpc_tools.protoc");
    stubs
}

/// The README's Python snippet runs as shown.
#[tokio::test]
async fn python_readme_snippet_runs() {
    let Some(python) = python() else { return };
    let snippet = workspace().join("tests/python/readme_snippet.py");
    assert_in_readme(&snippet);
    let stubs = python_stubs(&python).await;
    let server = ServerProcess::start().await;
    let mut command = Command::new(python);
    command
        .arg(&snippet)
        .arg(server.addr.to_string())
        .env("PYTHONPATH", stubs.path());
    let stdout = assert_ran(&run(command).await, "the Python snippet");
    assert_eq!(stdout.trim(), "hello from Python");
}

/// Node with @grpc/grpc-js and proto-loader: a round trip per service and a streamed 5 MB value.
#[tokio::test]
async fn node_client_round_trips() {
    let Some((node, modules)) = node() else {
        return;
    };
    let server = ServerProcess::start().await;
    let mut command = Command::new(node);
    command
        .arg(workspace().join("tests/node/trove_check.js"))
        .arg(proto_root())
        .arg(server.addr.to_string())
        .env("NODE_PATH", modules);
    let stdout = assert_ran(&run(command).await, "the Node checks");
    assert!(stdout.contains("4 passed, 0 failed"), "{stdout}");
}

/// The README's Node snippet runs as shown.
#[tokio::test]
async fn node_readme_snippet_runs() {
    let Some((node, modules)) = node() else {
        return;
    };
    let snippet = workspace().join("tests/node/readme_snippet.js");
    assert_in_readme(&snippet);
    let server = ServerProcess::start().await;
    let mut command = Command::new(node);
    command
        .arg(&snippet)
        .arg(proto_root())
        .arg(server.addr.to_string())
        .env("NODE_PATH", modules);
    let stdout = assert_ran(&run(command).await, "the Node snippet");
    assert_eq!(stdout.trim(), "hello from Node");
}

/// The protos pass buf lint (STANDARD + COMMENTS, with the checked-in exceptions).
#[test]
fn protos_pass_lint() {
    let Some(buf) = buf() else { return };
    let output = Command::new(buf)
        .arg("lint")
        .current_dir(workspace().join("proto"))
        .output()
        .expect("buf lint");
    assert_ran(&output, "buf lint");
}

/// Renumbering a field in a scratch copy makes the breaking-change check fail; an unchanged copy passes.
#[test]
fn renumbered_field_is_a_breaking_change() {
    let Some(buf) = buf() else { return };
    let config = breaking_config();
    let scratch = tempfile::tempdir().expect("dir");
    let (before, after) = (scratch.path().join("before"), scratch.path().join("after"));
    for dir in [&before, &after] {
        std::fs::create_dir_all(dir.join("trove/v1")).expect("dir");
        for file in ["objects", "artifacts", "entries", "cache"] {
            let name = format!("trove/v1/{file}.proto");
            std::fs::copy(proto_root().join(&name), dir.join(&name)).expect("copy");
        }
    }
    let unchanged = Command::new(&buf)
        .arg("breaking")
        .arg(&after)
        .arg("--against")
        .arg(&before)
        .args(["--config", &config])
        .output()
        .expect("buf");
    assert_ran(&unchanged, "buf breaking on identical protos");
    let path = after.join("trove/v1/objects.proto");
    let text = std::fs::read_to_string(&path).expect("read");
    let renumbered = text.replacen(
        "  string hash = 2;\n  // Expected content length.",
        "  string hash = 9;\n  // Expected content length.",
        1,
    );
    assert_ne!(text, renumbered, "the scratch edit must apply");
    std::fs::write(&path, renumbered).expect("write");
    let broken = Command::new(&buf)
        .arg("breaking")
        .arg(&after)
        .arg("--against")
        .arg(&before)
        .args(["--config", &config])
        .output()
        .expect("buf");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&broken.stdout),
        String::from_utf8_lossy(&broken.stderr)
    );
    assert!(
        !broken.status.success(),
        "renumbering must be reported:\n{report}"
    );
    assert!(report.contains("PutObjectHeader"), "{report}");
    println!("buf breaking output for the renumbered field:\n{report}");
}

/// A server with TLS and a token for the TLS snippets: its address, the CA
/// file, and the token.
struct SecureServer {
    server: ServerProcess,
    ca: PathBuf,
    token: &'static str,
    _dir: tempfile::TempDir,
}

async fn secure_server() -> SecureServer {
    use sha2::Digest;
    let dir = tempfile::tempdir().expect("dir");
    let ca = trove_tests::pki::TestCa::new("polyglot test CA");
    let (cert, key) = ca
        .server(&["127.0.0.1", "localhost"], false)
        .write(dir.path(), "server");
    let ca_file = ca.write(dir.path(), "ca");
    let token = "polyglot-token";
    let grants = dir.path().join("grants.toml");
    std::fs::write(
        &grants,
        format!(
            "[[token]]\nname = \"polyglot\"\nsha256 = \"{}\"\nnamespaces = [\"demo\"]\npermissions = [\"read\", \"write\"]\n",
            hex::encode(sha2::Sha256::digest(token.as_bytes()))
        ),
    )
    .expect("grants");
    let connect = trove_client::ClientOptions {
        ca_pem: Some(ca.pem.clone().into_bytes()),
        token: Some(token.to_owned()),
        ..Default::default()
    };
    let server = ServerProcess::start_secure(
        &[
            "--tls-cert",
            &cert.to_string_lossy(),
            "--tls-key",
            &key.to_string_lossy(),
            "--auth-tokens",
            &grants.to_string_lossy(),
        ],
        connect,
    )
    .await;
    SecureServer {
        server,
        ca: ca_file,
        token,
        _dir: dir,
    }
}

/// The README's Python snippet for TLS with a token runs as shown; with a
/// wrong token the server answers UNAUTHENTICATED.
#[tokio::test]
async fn python_tls_token_snippet_runs() {
    let Some(python) = python() else { return };
    let snippet = workspace().join("tests/python/readme_snippet_tls.py");
    assert_in_readme(&snippet);
    let stubs = python_stubs(&python).await;
    let secure = secure_server().await;
    let command = |token: &str| {
        let mut command = Command::new(&python);
        command
            .arg(&snippet)
            .arg(secure.server.addr.to_string())
            .env("PYTHONPATH", stubs.path())
            .env("TROVE_CA", &secure.ca)
            .env("TROVE_TOKEN", token);
        command
    };
    let stdout = assert_ran(&run(command(secure.token)).await, "the Python TLS snippet");
    assert_eq!(stdout.trim(), "hello over TLS from Python");
    let refused = run(command("wrong-token")).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("UNAUTHENTICATED"));
}

/// The README's Node snippet for TLS with a token runs as shown; with a
/// wrong token the server answers UNAUTHENTICATED.
#[tokio::test]
async fn node_tls_token_snippet_runs() {
    let Some((node, modules)) = node() else {
        return;
    };
    let snippet = workspace().join("tests/node/readme_snippet_tls.js");
    assert_in_readme(&snippet);
    let secure = secure_server().await;
    let command = |token: &str| {
        let mut command = Command::new(&node);
        command
            .arg(&snippet)
            .arg(proto_root())
            .arg(secure.server.addr.to_string())
            .env("NODE_PATH", &modules)
            .env("TROVE_CA", &secure.ca)
            .env("TROVE_TOKEN", token);
        command
    };
    let stdout = assert_ran(&run(command(secure.token)).await, "the Node TLS snippet");
    assert_eq!(stdout.trim(), "hello over TLS from Node");
    let refused = run(command("wrong-token")).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("UNAUTHENTICATED"));
}
