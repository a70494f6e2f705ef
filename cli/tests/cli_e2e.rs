//! End-to-end tests of the `trove` command line: the real binary against the
//! real `trove-server` on 127.0.0.1 with an ephemeral port and a temporary
//! data folder. Every operation group is driven through files and through
//! pipes, `--json` output is parsed, exit codes are checked, a 256 MiB value
//! passes through in bounded client memory, and the progress bar is shown on a
//! terminal and nowhere else.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use sha2::{Digest, Sha256};
use trove_tests::harness::ServerProcess;

/// Runs `trove` against `server` with `args`, feeding `stdin`.
fn trove(server: &ServerProcess, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = command(server, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn trove");
    let mut input = child.stdin.take().expect("stdin piped");
    let stdin = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        // The command may exit before reading everything (a failure): fine.
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().expect("wait for trove");
    feeder.join().expect("stdin feeder");
    output
}

fn command(server: &ServerProcess, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trove"));
    command
        .arg("--addr")
        .arg(server.addr.to_string())
        .args(args)
        .env_remove("TROVE_NAMESPACE")
        .env_remove("TROVE_ADDR")
        .env_remove("TROVE_TOKEN")
        .env_remove("TROVE_CA")
        .env_remove("TROVE_CLIENT_CERT")
        .env_remove("TROVE_CLIENT_KEY")
        .env_remove("TROVE_TLS_DOMAIN");
    command
}

/// Runs `trove` and asserts it succeeded; returns its standard output.
#[track_caller]
fn ok(server: &ServerProcess, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let output = trove(server, args, stdin);
    assert!(
        output.status.success(),
        "trove {args:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

#[track_caller]
fn ok_text(server: &ServerProcess, args: &[&str], stdin: &[u8]) -> String {
    String::from_utf8(ok(server, args, stdin)).expect("UTF-8 output")
}

#[track_caller]
fn json(server: &ServerProcess, args: &[&str], stdin: &[u8]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = ok_text(server, &all, stdin);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"))
}

#[track_caller]
fn json_lines(server: &ServerProcess, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    ok_text(server, &all, b"")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

/// Asserts that `trove args` exits with `code` and says something on stderr.
#[track_caller]
fn fails_with(server: &ServerProcess, args: &[&str], stdin: &[u8], code: i32) -> String {
    let output = trove(server, args, stdin);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "trove {args:?}: expected exit {code}; stderr: {stderr}"
    );
    stderr
}

fn sha256_hex(data: &[u8]) -> String {
    hex_string(&Sha256::digest(data))
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// Objects: put from a file prints the SHA-256; get to a file and to a pipe
/// returns the same bytes; stdin uploads are hashed too; stat, ls, missing
/// and rm report what is stored.
#[tokio::test]
async fn objects_round_trip_through_files_and_pipes() {
    let server = ServerProcess::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let file = dir.path().join("in.bin");
    std::fs::write(&file, &data).expect("write input");
    let hash = sha256_hex(&data);

    assert_eq!(
        ok_text(&server, &["objects", "put", path_str(&file)], b"").trim(),
        hash
    );
    let out = dir.path().join("out.bin");
    ok(&server, &["objects", "get", &hash, path_str(&out)], b"");
    assert_eq!(std::fs::read(&out).expect("read output"), data);
    assert_eq!(ok(&server, &["objects", "get", &hash], b""), data);
    assert_eq!(ok(&server, &["objects", "get", &hash, "-"], b""), data);

    let piped = b"through a pipe".to_vec();
    let piped_hash = sha256_hex(&piped);
    let put = json(&server, &["objects", "put", "-"], &piped);
    assert_eq!(put["hash"], piped_hash.as_str());
    assert_eq!(put["size"], piped.len());
    assert_eq!(put["verified"], true);

    let stat = json(&server, &["objects", "stat", &hash], b"");
    assert_eq!(stat["size"], data.len());
    assert_eq!(stat["sha256"], hash.as_str());

    let listed = json_lines(&server, &["objects", "ls"]);
    let hashes: Vec<&str> = listed.iter().filter_map(|v| v["hash"].as_str()).collect();
    let mut expected = vec![hash.as_str(), piped_hash.as_str()];
    expected.sort_unstable();
    assert_eq!(hashes, expected);
    assert!(ok_text(&server, &["objects", "ls"], b"").contains(&hash));

    let absent = "0".repeat(64);
    let missing = ok_text(&server, &["objects", "missing", &hash, &absent], b"");
    assert_eq!(missing.lines().collect::<Vec<_>>(), vec![absent.as_str()]);
    let from_stdin = json(
        &server,
        &["objects", "missing"],
        format!("{hash}\n{absent}\n\n").as_bytes(),
    );
    assert_eq!(from_stdin["missing"], serde_json::json!([absent]));

    let removed = json(&server, &["objects", "rm", &hash], b"");
    assert_eq!(removed["existed"], true);
    assert_eq!(
        json(&server, &["objects", "rm", &hash], b"")["existed"],
        false
    );
    fails_with(&server, &["objects", "get", &hash, path_str(&out)], b"", 3);
    // A failed download leaves the earlier file untouched, never truncated.
    assert_eq!(std::fs::read(&out).expect("read output"), data);

    // A named (non-SHA-256) object through --hash, and a wrong digest refused.
    ok(
        &server,
        &["objects", "put", "-", "--hash", "legacy-name"],
        b"abc",
    );
    assert_eq!(ok(&server, &["objects", "get", "legacy-name"], b""), b"abc");
    let stderr = fails_with(
        &server,
        &["objects", "put", "-", "--hash", &absent],
        b"abc",
        4,
    );
    assert!(stderr.contains("hash"), "{stderr}");
}

/// Artifacts: put from a file and from a pipe, get both ways, stat with the
/// content type, ls by prefix, rm; a missing key is exit 3.
#[tokio::test]
async fn artifacts_round_trip_and_listing() {
    let server = ServerProcess::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("report.html");
    std::fs::write(&file, b"<html>ok</html>").expect("write input");

    let put = json(
        &server,
        &[
            "artifacts",
            "put",
            "runs/1/report.html",
            path_str(&file),
            "--content-type",
            "text/html",
        ],
        b"",
    );
    assert_eq!(put["size"], 15);
    ok(
        &server,
        &["artifacts", "put", "runs/1/log.txt"],
        b"line one\n",
    );
    ok(&server, &["artifacts", "put", "other", "-"], b"x");

    assert_eq!(
        ok(&server, &["artifacts", "get", "runs/1/log.txt"], b""),
        b"line one\n"
    );
    let out = dir.path().join("copy.html");
    ok(
        &server,
        &["artifacts", "get", "runs/1/report.html", path_str(&out)],
        b"",
    );
    assert_eq!(std::fs::read(&out).expect("read"), b"<html>ok</html>");

    let stat = json(&server, &["artifacts", "stat", "runs/1/report.html"], b"");
    assert_eq!(stat["content_type"], "text/html");
    assert_eq!(stat["sha256"], sha256_hex(b"<html>ok</html>").as_str());

    let keys: Vec<String> = json_lines(&server, &["artifacts", "ls", "runs/"])
        .iter()
        .map(|v| v["key"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(keys, vec!["runs/1/log.txt", "runs/1/report.html"]);

    assert_eq!(
        json(&server, &["artifacts", "rm", "other"], b"")["existed"],
        true
    );
    fails_with(&server, &["artifacts", "get", "other"], b"", 3);
    fails_with(&server, &["artifacts", "stat", "other"], b"", 3);
}

/// Cassettes: JSON lines appended out of order read back in recorded-time
/// order; `--with-meta` round-trips timestamps; replace swaps everything; a
/// bad line changes nothing; exists and rm report through output and code.
#[tokio::test]
async fn cassettes_round_trip_json_lines() {
    let server = ServerProcess::start().await;
    let lines = "{\"recorded_at\": 30, \"n\": 3}\n\n{\"recorded_at\": 10, \"n\": 1}\n{\"recorded_at\": 20, \"n\": 2}\n";
    let appended = json(
        &server,
        &["cassettes", "append", "suite/a", "--batch", "2"],
        lines.as_bytes(),
    );
    assert_eq!(appended["appended"], 3);
    let read = ok_text(&server, &["cassettes", "read", "suite/a"], b"");
    let order: Vec<i64> = read
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON line")["n"]
                .as_i64()
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(order, vec![1, 2, 3]);

    // With --batch 2, a bad fourth line stops the command after the first
    // batch (lines 1-2) was appended and before the second was sent.
    let stderr = fails_with(
        &server,
        &["cassettes", "append", "suite/batched", "--batch", "2"],
        b"{\"n\": 1}\n{\"n\": 2}\n{\"n\": 3}\n[4]\n",
        4,
    );
    assert!(
        stderr.contains("line 4") && stderr.contains("2 entries"),
        "{stderr}"
    );
    let batched = ok_text(&server, &["cassettes", "read", "suite/batched"], b"");
    assert_eq!(batched.lines().count(), 2, "{batched}");
    ok(&server, &["cassettes", "rm", "suite/batched"], b"");

    // Envelopes carry the timestamp separately from the entry.
    let meta = ok(
        &server,
        &["cassettes", "read", "suite/a", "--with-meta"],
        b"",
    );
    ok(
        &server,
        &["cassettes", "append", "suite/copy", "--with-meta"],
        &meta,
    );
    assert_eq!(
        ok_text(&server, &["cassettes", "read", "suite/copy"], b""),
        read
    );
    let envelope: Value = serde_json::from_str(
        String::from_utf8_lossy(&meta)
            .lines()
            .next()
            .unwrap_or_default(),
    )
    .expect("envelope");
    assert_eq!(envelope["recorded_at"], 10);
    assert!(envelope["cursor"].is_string());

    // A bad line: exit 4 naming the line, and the cassette is unchanged.
    let stderr = fails_with(
        &server,
        &["cassettes", "replace", "suite/a"],
        b"{\"n\": 9}\n[1, 2]\n",
        4,
    );
    assert!(stderr.contains("line 2"), "{stderr}");
    assert_eq!(
        ok_text(&server, &["cassettes", "read", "suite/a"], b""),
        read
    );
    let stderr = fails_with(
        &server,
        &["cassettes", "append", "suite/a"],
        b"not json\n",
        4,
    );
    assert!(stderr.contains("line 1"), "{stderr}");
    assert_eq!(
        ok_text(&server, &["cassettes", "read", "suite/a"], b""),
        read
    );

    let replaced = json(
        &server,
        &["cassettes", "replace", "suite/a"],
        b"{\"n\": 9}\n",
    );
    assert_eq!(replaced["replaced"], 1);
    assert_eq!(
        ok_text(&server, &["cassettes", "read", "suite/a"], b"").trim(),
        "{\"n\": 9}"
    );

    let names = ok_text(&server, &["cassettes", "ls", "suite/"], b"");
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        vec!["suite/a", "suite/copy"]
    );
    assert_eq!(
        ok_text(&server, &["cassettes", "exists", "suite/a"], b"").trim(),
        "true"
    );
    ok(&server, &["cassettes", "rm", "suite/a"], b"");
    let output = trove(&server, &["cassettes", "exists", "suite/a"], b"");
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "false");
}

/// Streams: chunks given as JSON lines (base64 or text, timestamps or not)
/// come back in order with the same data and timestamps.
#[tokio::test]
async fn streams_round_trip_json_lines() {
    let server = ServerProcess::start().await;
    let input = "{\"text\": \"hello \", \"timestamp\": 5}\n{\"data\": \"AAEC\"}\n{\"data\": \"\", \"timestamp\": -1}\n";
    ok(&server, &["streams", "put", "s1"], input.as_bytes());
    let chunks: Vec<Value> = ok_text(&server, &["streams", "get", "s1"], b"")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(
        chunks,
        vec![
            serde_json::json!({"data": "aGVsbG8g", "timestamp": 5}),
            serde_json::json!({"data": "AAEC"}),
            serde_json::json!({"data": "", "timestamp": -1}),
        ]
    );
    fails_with(
        &server,
        &["streams", "put", "s2"],
        b"{\"data\": \"!!\"}\n",
        4,
    );
    fails_with(&server, &["streams", "get", "s2"], b"", 3);
}

/// Cache: an upload on main serves a PR branch through the fallback; a PR
/// upload stays in its tier; branch refs write and read back; prune keeps
/// the newest; a miss is exit 3.
#[tokio::test]
async fn cache_upload_download_prune_and_branch_refs() {
    let server = ServerProcess::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("a.tar");
    std::fs::write(&archive, vec![7u8; 70_000]).expect("write archive");

    let scope = ["--prefix", "repo"];
    let up = json(
        &server,
        &[
            &[
                "cache",
                "upload",
                "c1",
                path_str(&archive),
                "--uploaded-at",
                "1000",
            ][..],
            &scope[..],
        ]
        .concat(),
        b"",
    );
    assert_eq!(up["tier"], "main");
    ok(
        &server,
        &[
            &["cache", "upload", "c2", "-", "--uploaded-at", "2000"][..],
            &scope[..],
        ]
        .concat(),
        b"second",
    );

    // A PR branch falls back to main.
    let out = dir.path().join("got.tar");
    let got = json(
        &server,
        &[
            &[
                "cache",
                "--branch",
                "feature/x",
                "download",
                "c1",
                path_str(&out),
            ][..],
            &scope[..],
        ]
        .concat(),
        b"",
    );
    assert_eq!(got["tier"], "main");
    assert_eq!(std::fs::read(&out).expect("read"), vec![7u8; 70_000]);
    ok(
        &server,
        &[
            &["cache", "upload", "p1", "-", "--branch", "feature/x"][..],
            &scope[..],
        ]
        .concat(),
        b"pr",
    );
    let pr_refs = json_lines(
        &server,
        &[&["cache", "ls", "--branch", "feature/x"][..], &scope[..]].concat(),
    );
    assert_eq!(pr_refs.len(), 1);
    assert_eq!(pr_refs[0]["branch"], "feature/x");
    fails_with(
        &server,
        &[&["cache", "download", "p1"][..], &scope[..]].concat(),
        b"",
        3,
    );

    ok(
        &server,
        &[
            &["cache", "branch-refs", "feature/x", "--write", "-"][..],
            &scope[..],
        ]
        .concat(),
        b"{\"abc\": 12}",
    );
    assert_eq!(
        json(
            &server,
            &[&["cache", "branch-refs", "feature/x"][..], &scope[..]].concat(),
            b""
        ),
        serde_json::json!({"abc": 12})
    );

    let pruned = json(
        &server,
        &[&["cache", "prune", "--count", "1"][..], &scope[..]].concat(),
        b"",
    );
    assert_eq!(pruned["removed"], 1);
    let main_refs: Vec<String> = json_lines(&server, &[&["cache", "ls"][..], &scope[..]].concat())
        .iter()
        .map(|v| v["ref"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(main_refs, vec!["c2"]);
    assert_eq!(
        ok(
            &server,
            &[&["cache", "download", "c2"][..], &scope[..]].concat(),
            b""
        ),
        b"second"
    );
}

/// Exit codes tell failures apart: usage 2, not found 3, invalid input 4,
/// unavailable 6; health is 0 on a serving server.
#[tokio::test]
async fn exit_codes_and_health() {
    let server = ServerProcess::start().await;
    assert_eq!(ok_text(&server, &["health"], b"").trim(), "SERVING");
    assert_eq!(json(&server, &["health"], b"")["status"], "SERVING");

    fails_with(&server, &["objects"], b"", 2);
    fails_with(&server, &["artifacts", "get", "missing-key"], b"", 3);
    let long_key = "k".repeat(1025);
    let stderr = fails_with(&server, &["artifacts", "put", &long_key], b"x", 4);
    assert!(stderr.contains("1024"), "{stderr}");
    let long_namespace = "n".repeat(1025);
    let stderr = fails_with(&server, &["-n", &long_namespace, "artifacts", "ls"], b"", 4);
    assert!(stderr.contains("namespace"), "{stderr}");

    // A port bound but never listening refuses connections, and stays ours
    // (no other test's server can be handed it) for as long as we hold it.
    let reserved = tokio::net::TcpSocket::new_v4().expect("socket");
    reserved
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let addr = reserved.local_addr().expect("addr").to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_trove"))
        .args(["--addr", &addr, "health"])
        .output()
        .expect("run trove");
    assert_eq!(output.status.code(), Some(6), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains(&addr));
}

/// A 256 MiB file goes up from a file, from a pipe, and comes back down to a
/// file, each in a `trove` process whose peak RSS stays under 64 MiB.
#[tokio::test]
async fn large_file_streams_in_bounded_memory() {
    const SIZE: usize = 256 * 1024 * 1024;
    const LIMIT_KIB: u64 = 64 * 1024;
    let server = ServerProcess::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("big.bin");
    let hash = write_pattern(&file, SIZE);

    ok(&server, &["objects", "rm", &hash], b"");
    let spooled = peak_rss_kib(&server, &["objects", "put", "-"], Some(&file));
    let stat = json(&server, &["objects", "stat", &hash], b"");
    assert_eq!(stat["size"], SIZE, "stdin was spooled and hashed whole");
    let put = peak_rss_kib(&server, &["objects", "put", path_str(&file)], None);
    let piped = peak_rss_kib(&server, &["artifacts", "put", "big", "-"], Some(&file));
    let out = dir.path().join("back.bin");
    let get = peak_rss_kib(&server, &["objects", "get", &hash, path_str(&out)], None);
    let to_stdout = peak_rss_kib(&server, &["artifacts", "get", "big"], None);
    let peaks = [
        ("objects put from stdin (spooled)", spooled),
        ("objects put FILE", put),
        ("artifacts put from stdin", piped),
        ("objects get HASH FILE", get),
        ("artifacts get KEY to stdout", to_stdout),
    ];
    println!("peak RSS of trove, KiB: {peaks:?}");
    for (what, kib) in peaks {
        assert!(kib < LIMIT_KIB, "{what} peaked at {kib} KiB");
    }
    assert_eq!(std::fs::metadata(&out).expect("output").len(), SIZE as u64);
    assert_eq!(file_sha256(&out), hash);
    let stat = json(&server, &["artifacts", "stat", "big"], b"");
    assert_eq!(stat["sha256"], hash.as_str());
}

/// Writes `size` bytes of a non-repeating pattern; returns their SHA-256.
fn write_pattern(path: &Path, size: usize) -> String {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1024 * 1024];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..size / block.len() {
        for word in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        hasher.update(&block);
        file.write_all(&block).expect("write");
    }
    file.flush().expect("flush");
    hex_string(&hasher.finalize())
}

fn file_sha256(path: &Path) -> String {
    let mut file = std::fs::File::open(path).expect("open");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            return hex_string(&hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// Runs `trove args` (stdin from `stdin_file`) as the only child of a small
/// Python parent and returns the child's peak RSS in KiB, which the kernel
/// reports exactly through `getrusage(RUSAGE_CHILDREN)` once it was reaped.
fn peak_rss_kib(server: &ServerProcess, args: &[&str], stdin_file: Option<&Path>) -> u64 {
    const PARENT: &str = "import resource, subprocess, sys\n\
stdin = open(sys.argv[1], 'rb') if sys.argv[1] else subprocess.DEVNULL\n\
r = subprocess.run(sys.argv[2:], stdin=stdin, stdout=subprocess.DEVNULL)\n\
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n\
sys.exit(r.returncode)\n";
    let output = Command::new("python3")
        .arg("-c")
        .arg(PARENT)
        .arg(stdin_file.map(path_str).unwrap_or_default())
        .arg(env!("CARGO_BIN_EXE_trove"))
        .arg("--addr")
        .arg(server.addr.to_string())
        .args(args)
        .output()
        .expect("python3 runs (it measures the child's peak RSS)");
    assert!(
        output.status.success(),
        "trove {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("peak RSS in KiB")
}

/// On a terminal the transfer draws a progress bar on stderr; on a pipe,
/// stderr stays empty.
#[tokio::test]
async fn progress_bar_only_on_a_terminal() {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let server = ServerProcess::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("two-mib.bin");
    std::fs::write(&file, vec![1u8; 2 * 1024 * 1024]).expect("write");

    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .expect("open a pseudo-terminal");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    rustix::termios::tcsetwinsize(
        &master,
        rustix::termios::Winsize {
            ws_row: 24,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .expect("set the terminal size");
    let slave_path = PathBuf::from(
        ptsname(&master, Vec::new())
            .expect("ptsname")
            .into_string()
            .expect("UTF-8 pty name"),
    );
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&slave_path)
        .expect("open the terminal's other end");
    let mut reader = std::fs::File::from(master);
    let drawn = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Reading ends with EIO once every holder of the other end closed it.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let status = command(&server, &["artifacts", "put", "on-a-tty", path_str(&file)])
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave))
        .status()
        .expect("run trove");
    assert!(status.success());
    let drawn = String::from_utf8_lossy(&drawn.join().expect("reader")).into_owned();
    assert!(
        drawn.contains("put on-a-tty") && drawn.contains("2.00 MiB"),
        "no progress bar on the terminal: {drawn:?}"
    );

    let output = trove(
        &server,
        &["artifacts", "put", "on-a-pipe", path_str(&file)],
        b"",
    );
    assert!(output.status.success());
    assert!(
        output.stderr.is_empty(),
        "stderr on a pipe: {:?}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Completions and the man page come from the argument definitions.
#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(env!("CARGO_BIN_EXE_trove"))
            .args(["completions", shell])
            .output()
            .expect("run trove");
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{shell}");
        assert!(
            script.contains("artifacts") && script.contains("namespace"),
            "{shell}"
        );
    }
    let output = Command::new(env!("CARGO_BIN_EXE_trove"))
        .arg("man")
        .output()
        .expect("run trove");
    let page = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(page.contains(".TH trove 1"), "{page:.200}");
    for section in [".SH SYNOPSIS", ".SH ENVIRONMENT", ".SH \"EXIT STATUS\""] {
        assert!(page.contains(section), "{section} missing");
    }
    for env in ["TROVE_ADDR", "TROVE_NAMESPACE"] {
        assert!(page.contains(env), "{env} missing");
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let status = Command::new(env!("CARGO_BIN_EXE_trove"))
        .args(["man", "--dir"])
        .arg(dir.path())
        .status()
        .expect("run trove");
    assert!(status.success());
    for page in ["trove.1", "trove-objects-put.1", "trove-cache-download.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_default();
        assert!(text.contains(".TH"), "{page} not written");
    }
}

/// A reader that stops early (`trove objects ls | head -1`) ends the command
/// quietly with success, never with a panic about a broken pipe.
#[tokio::test]
async fn closed_stdout_stops_quietly() {
    let server = ServerProcess::start().await;
    for i in 0..3 {
        ok(
            &server,
            &["objects", "put", "-", "--hash", &format!("h{i}")],
            b"x",
        );
    }
    for args in [&["objects", "ls"][..], &["objects", "get", "h0"][..]] {
        let mut child = command(&server, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn trove");
        // Close the reading end before the command had time to connect.
        drop(child.stdout.take());
        let output = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// The README's quick start, as written, runs against a real server (the
/// install line aside: the binary under test is put on `PATH` instead).
#[tokio::test]
async fn readme_quick_start_runs() {
    let server = ServerProcess::start().await;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("read README.md");
    let section = readme
        .split("## Quick start with the `trove` command line")
        .nth(1)
        .expect("the README has a CLI quick start");
    let script: String = section
        .split("```sh\n")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .expect("a sh block in the quick start")
        .lines()
        .filter(|line| !line.starts_with("cargo "))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(script.contains("trove objects put"), "{script}");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_trove"))
        .parent()
        .expect("binary folder");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("TROVE_ADDR", server.addr.to_string())
        .env_remove("TROVE_NAMESPACE")
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "quick start failed:\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("hello trove"), "{stdout}");
    assert!(stdout.contains("\"key\":\"numbers.txt\""), "{stdout}");
}

/// A value damaged on disk is refused with exit 8 (data loss): a download
/// into an existing file leaves it untouched and no temporary file behind.
#[tokio::test]
async fn damaged_value_is_data_loss_and_leaves_files_untouched() {
    let server = ServerProcess::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Larger than the inline limit, so it lives in a blob file of its own.
    let value: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    ok(&server, &["artifacts", "put", "fragile"], &value);
    let blobs = blob_files(&server.data_dir.join("blobs"));
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    let mut damaged = std::fs::read(&blobs[0]).expect("read blob");
    damaged[100_000] ^= 0xFF;
    std::fs::write(&blobs[0], &damaged).expect("damage the blob");

    let out = dir.path().join("kept.bin");
    std::fs::write(&out, b"earlier content").expect("write");
    let stderr = fails_with(
        &server,
        &["artifacts", "get", "fragile", path_str(&out)],
        b"",
        8,
    );
    assert!(
        stderr.to_lowercase().contains("data loss") || stderr.contains("hash"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&out).expect("read"), b"earlier content");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|name| name != "kept.bin")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    fails_with(&server, &["artifacts", "get", "fragile"], b"", 8);
}

/// Every file under `dir`, recursively.
fn blob_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(blob_files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// A path that is not a regular file (here `/dev/stdin`) is read as a
/// stream: its reported size of 0 is not sent as the value's size, and
/// `objects put` spools it to hash it.
#[tokio::test]
async fn devices_and_pipes_named_as_files_upload_whole() {
    let server = ServerProcess::start().await;
    ok(
        &server,
        &["artifacts", "put", "dev-key", "/dev/stdin"],
        b"from a device",
    );
    assert_eq!(
        ok(&server, &["artifacts", "get", "dev-key"], b""),
        b"from a device"
    );
    let hash = ok_text(&server, &["objects", "put", "/dev/stdin"], b"spooled");
    assert_eq!(hash.trim(), sha256_hex(b"spooled"));
    let archive = json(
        &server,
        &["cache", "upload", "r1", "/dev/stdin"],
        b"archive",
    );
    assert_eq!(archive["size"], 7);
}

/// Against a server with TLS and tokens: `--ca` and `--token` (or their
/// variables) get in; a missing token is exit 5; an untrusted server is 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_token_flags() {
    use sha2::Digest;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = trove_tests::pki::TestCa::new("cli test CA");
    let (cert, key) = ca.server(&["127.0.0.1"], false).write(dir.path(), "server");
    let ca_file = ca.write(dir.path(), "ca");
    let grants = dir.path().join("grants.toml");
    let hash: String = Sha256::digest(b"cli-token")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        &grants,
        format!("[[token]]\nname = \"cli\"\nsha256 = \"{hash}\"\nnamespaces = [\"*\"]\npermissions = [\"read\", \"write\"]\n"),
    )
    .expect("grants");
    let connect = trove_client::ClientOptions {
        ca_pem: Some(ca.pem.clone().into_bytes()),
        token: Some("cli-token".into()),
        ..Default::default()
    };
    let server = ServerProcess::start_secure(
        &[
            "--tls-cert",
            path_str(&cert),
            "--tls-key",
            path_str(&key),
            "--auth-tokens",
            path_str(&grants),
        ],
        connect,
    )
    .await;
    let secure = |extra: &[&str], stdin: &[u8]| {
        let mut args = vec!["--ca", path_str(&ca_file)];
        args.extend_from_slice(extra);
        trove(&server, &args, stdin)
    };
    let put = secure(
        &["--token", "cli-token", "artifacts", "put", "k"],
        b"secret",
    );
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = command(
        &server,
        &["--ca", path_str(&ca_file), "artifacts", "get", "k"],
    )
    .env("TROVE_TOKEN", "cli-token")
    .output()
    .expect("run trove");
    assert_eq!(
        get.stdout,
        b"secret",
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let denied = secure(&["artifacts", "get", "k"], b"");
    assert_eq!(
        denied.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let other = trove_tests::pki::TestCa::new("not the server's CA").write(dir.path(), "other");
    let untrusted = trove(
        &server,
        &["--ca", path_str(&other), "--token", "cli-token", "health"],
        b"",
    );
    assert_eq!(
        untrusted.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
}
