//! `--help`, `serve --help`, `--version` and `config check` tell an operator what
//! they need without reading the source.

mod support;

use support::breakwater_command;

fn run(args: &[&str]) -> (i32, String) {
    let output = breakwater_command().args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap(), text)
}

#[test]
fn help_and_version() {
    let (code, help) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(help.contains("serve") && help.contains("BREAKWATER_"), "{help}");
    let (code, serve_help) = run(&["serve", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--listen",
        "--data-dir",
        "--config",
        "--log-format",
        "BREAKWATER_LISTEN",
    ] {
        assert!(serve_help.contains(flag), "{flag} missing from:\n{serve_help}");
    }
    let (code, version) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(version.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn config_check_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[limits]\nmax_event_bytes = 900000\n").unwrap();
    let (code, text) = run(&["config", "check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(text.contains("limits.max_request_bytes"), "{text}");

    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:9999\"\n").unwrap();
    let (code, text) = run(&["config", "check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("127.0.0.1:9999"));
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/breakwater.example.toml");
    let (code, text) = run(&["config", "check", "--config", example]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn the_shipped_backends_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/breakwater.backends.example.toml");
    let (code, text) = run(&["config", "check", "--config", example]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("redis") && text.contains("clickhouse") && text.contains("kafka"),
        "{text}"
    );
}
