//! `distlock bench` reports its figures, and the safety workload finds no
//! violations on stores that keep their promise.

use std::process::Command;

fn bench_json(url: &str, workload: &str) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args([
            "bench",
            "--url",
            url,
            "--workload",
            workload,
            "--clients",
            "4",
            "--duration",
            "1s",
            "--json",
        ])
        .output()
        .expect("run distlock bench");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("bench --json prints JSON")
}

#[test]
fn every_workload_reports_its_figures() {
    for workload in ["uncontended", "contended", "safety"] {
        let report = bench_json("memory://", workload);
        assert!(
            report["acquisitions"].as_u64().expect("acquisitions") > 0,
            "{report}"
        );
        for field in ["p50", "p99", "p999", "max"] {
            assert!(
                report["latency_ms"][field].is_f64(),
                "{field} missing: {report}"
            );
        }
        let jain = report["fairness"]["jain_index"]
            .as_f64()
            .expect("jain index");
        assert!(jain > 0.0 && jain <= 1.0, "{report}");
    }
}

#[test]
fn safety_finds_no_violations_on_memory_and_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    for url in [
        "memory://bench-safety".to_owned(),
        format!("file://{}", dir.path().display()),
    ] {
        let report = bench_json(&url, "safety");
        assert!(
            report["acquisitions"].as_u64().expect("acquisitions") > 0,
            "{report}"
        );
        assert_eq!(report["violations"], 0, "{url}: {report}");
        assert_eq!(report["token_violations"], 0, "{url}: {report}");
    }
}
