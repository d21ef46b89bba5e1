//! The chaos matrix, short: every scenario in chaos/scenarios at 0.4× its durations
//! (the long soak is one documented command, docs/chaos.md). Each scenario starts
//! real backends and breakwater, applies its faults and checks the oracle: every
//! acknowledged event exactly once in ClickHouse and Kafka, nothing unsent.

use std::process::Command;

#[test]
fn every_chaos_scenario_passes_its_oracle() {
    let scenarios: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/chaos/scenarios"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    assert!(scenarios.len() >= 10, "the matrix has its scenarios");
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_breakwater-chaos"))
        .args(["--scale", "0.4", "--out"])
        .arg(out.path())
        .args(&scenarios)
        .output()
        .expect("run breakwater-chaos");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stderr}");
    assert!(output.status.success(), "chaos matrix failed:\n{stderr}\n{stdout}");
    assert!(
        stdout.contains(&format!("{} passed, 0 failed", scenarios.len())),
        "{stdout}"
    );
    // Every scenario left its report.
    for scenario in &scenarios {
        let name = scenario.file_stem().unwrap();
        for file in ["result.json", "report.md", "timeline.svg"] {
            assert!(out.path().join(name).join(file).is_file(), "{name:?}/{file} missing");
        }
    }
}
