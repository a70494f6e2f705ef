//! The binary's command line: documented settings and clear start-up errors.
//! (Having integration tests here also makes `cargo test --workspace` build a
//! fresh `trove-server` binary for the end-to-end tests in `trove-tests`.)

use std::process::Command;

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trove-server"))
}

/// `--help` documents every setting with its environment variable.
#[test]
fn help_documents_every_setting() {
    let out = server().arg("--help").output().expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--listen", "TROVE_LISTEN"),
        ("--data-dir", "TROVE_DATA_DIR"),
        ("--max-message-bytes", "TROVE_MAX_MESSAGE_BYTES"),
        ("--chunk-bytes", "TROVE_CHUNK_BYTES"),
        ("--durability", "TROVE_DURABILITY"),
        ("--log-format", "TROVE_LOG_FORMAT"),
        ("--reflection", "TROVE_REFLECTION"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
        assert!(help.contains(env), "{env} missing from --help:\n{help}");
    }
}

/// An invalid setting stops the server at once with a message naming it.
#[test]
fn invalid_settings_fail_with_their_name() {
    for (args, env, needle) in [
        (vec!["--listen", "not-an-address"], None, "--listen"),
        (vec!["--durability", "sometimes"], None, "--durability"),
        (
            vec!["--max-message-bytes", "10"],
            None,
            "--max-message-bytes",
        ),
        (vec![], Some(("TROVE_CHUNK_BYTES", "zero")), "--chunk-bytes"),
    ] {
        let mut cmd = server();
        cmd.args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run");
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(needle),
            "{args:?}: message does not name {needle}:\n{stderr}"
        );
    }
}
