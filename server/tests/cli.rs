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
    // Every setting the server has, from its own effective configuration.
    // Optional settings are printed only when set: set them all.
    let config = server()
        .args(["--print-config", "--s3-endpoint", "http://s3.invalid"])
        .args([
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
        ])
        .args(["--auth-tokens", "grants.toml"])
        .output()
        .expect("run --print-config");
    assert!(config.status.success());
    let settings: Vec<String> = String::from_utf8_lossy(&config.stdout)
        .lines()
        .filter_map(|line| line.split_once(" = ").map(|(key, _)| key.trim().to_owned()))
        .collect();
    assert!(
        settings.len() >= 27,
        "too few settings printed: {settings:?}"
    );
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    for key in &settings {
        let flag = format!("--{}", key.replace('_', "-"));
        let env = format!("TROVE_{}", key.to_uppercase());
        assert!(help.contains(&flag), "{flag} missing from --help:\n{help}");
        assert!(help.contains(&env), "{env} missing from --help:\n{help}");
        assert!(
            readme.contains(&format!("`{flag}`")),
            "{flag} missing from the README's settings table"
        );
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
