//! Keeps `trove-bench` working: runs it with tiny sizes against the real
//! server binary and checks that every workload produced its figures. The
//! numbers themselves are not judged; speed is never asserted in a test.

use std::process::Command;

use serde_json::Value;

#[test]
fn tiny_run_reports_every_ratio_and_chart() {
    let out = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_trove-bench"))
        .arg("--tiny")
        .arg("--out")
        .arg(out.path())
        .env_remove("TROVE_BENCH_REDIS")
        .output()
        .expect("run trove-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "trove-bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );

    let report: Value = serde_json::from_slice(
        &std::fs::read(out.path().join("report.json")).expect("report.json written"),
    )
    .expect("report.json is JSON");
    let comparisons = report["comparisons"].as_array().expect("comparisons");
    let figures: Vec<&str> = comparisons
        .iter()
        .map(|c| c["figure"].as_str().unwrap_or_default())
        .collect();
    for expected in [
        "small put throughput",
        "small get throughput",
        "small get p99 at half of peak",
        "find-missing (20 hashes) calls",
        "durable append throughput",
        "durable append p99 at half of peak",
        "cassette read",
        "bulk put object 2 MiB",
        "bulk get object 2 MiB",
        "cache upload",
        "cache download with fallback",
        "get p99 with 300 items stored",
        "small get over TLS with a token",
        "bulk get 2 MiB over TLS with a token",
    ] {
        assert!(
            figures.contains(&expected),
            "figure {expected:?} missing from {figures:?}"
        );
    }
    for comparison in comparisons {
        let ratio = comparison["ratio"].as_f64().expect("ratio is a number");
        assert!(
            ratio.is_finite() && ratio > 0.0,
            "comparison without a usable ratio: {comparison}"
        );
        let figure = comparison["figure"].as_str().unwrap_or_default();
        assert!(
            stdout.contains(figure),
            "terminal table lacks {figure:?}:\n{stdout}"
        );
    }
    let baselines: Vec<&str> = comparisons
        .iter()
        .map(|c| c["baseline"].as_str().unwrap_or_default())
        .collect();
    for expected in ["null gRPC", "in-process store", "raw loopback tcp"] {
        assert!(baselines.contains(&expected), "no {expected} baseline");
    }
    let facts: Vec<&str> = report["facts"]
        .as_array()
        .expect("facts")
        .iter()
        .map(|f| f["name"].as_str().unwrap_or_default())
        .collect();
    assert!(facts.iter().any(|f| f.starts_with("space amplification")));
    assert!(facts.iter().any(|f| f.starts_with("server peak RSS")));
    for chart in [
        "scaling-concurrency",
        "scaling-payload",
        "scaling-store-size",
    ] {
        let svg = std::fs::read_to_string(out.path().join(format!("{chart}.svg")))
            .unwrap_or_else(|e| panic!("{chart}.svg not written: {e}"));
        assert!(
            svg.contains("<svg") && svg.contains("polyline"),
            "{chart}.svg has no curve"
        );
    }
}
