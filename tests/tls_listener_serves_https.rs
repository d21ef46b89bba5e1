//! TLS on the listener (`[server.tls]`): HTTPS works with the configured
//! certificate, a plain-HTTP client is refused at the handshake (and counted), a
//! client that never finishes its handshake is closed after the header timeout, and
//! an unusable key stops start-up with a message naming the setting. Uses the
//! openssl and curl command-line tools (scripts/test.sh installs them).

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn self_signed_certificate(dir: &Path) {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl must be installed (scripts/test.sh installs it)");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
}

/// `curl` over HTTPS trusting only our certificate; (status, body).
fn curl(dir: &Path, url: &str, body: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", "--cacert"])
        .arg(dir.join("cert.pem"))
        .arg(url);
    if let Some(body) = body {
        command.args(["-H", "content-type: application/json", "--data-binary", body]);
    }
    let output = command
        .output()
        .expect("curl must be installed (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn https_with_the_configured_certificate_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    self_signed_certificate(dir.path());
    let config = format!(
        "[server]\nheader_read_timeout_ms = 1000\n\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    let server = Server::start_with(&config, &[]);
    let base = format!("https://127.0.0.1:{}", server.addr.port());

    let (status, body) = curl(
        dir.path(),
        &format!("{base}/v1/track"),
        Some(r#"{"userId":"u-1","event":"Over TLS","messageId":"tls-1"}"#),
    );
    assert_eq!((status, body.as_str()), (200, r#"{"success":true}"#));
    assert!(
        server.log().contains("\"tls\":true"),
        "the start-up line says TLS is on"
    );

    // Plain HTTP to the TLS port: no answer, the connection is dropped.
    let plain = client().get(format!("http://{}/health/live", server.addr)).send();
    assert!(plain.is_err(), "plain HTTP must not be served: {plain:?}");

    // A client that opens a connection and never starts its handshake is closed.
    let mut silent = TcpStream::connect(server.addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 16];
    let read = silent.read(&mut buffer);
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "held {:?}",
        started.elapsed()
    );

    let (status, metrics) = curl(dir.path(), &format!("{base}/metrics"), None);
    assert_eq!(status, 200);
    let failures: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("breakwater_tls_handshake_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(failures >= 2.0, "plain and silent clients counted: {failures}");
    assert_eq!(
        server
            .sink_events()
            .iter()
            .filter(|e| e["messageId"] == "tls-1")
            .count(),
        1
    );
}

#[test]
fn an_unusable_key_stops_start_up_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    self_signed_certificate(dir.path());
    std::fs::write(dir.path().join("key.pem"), "not a key\n").unwrap();
    let config_path = dir.path().join("breakwater.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            dir.path().join("cert.pem").display(),
            dir.path().join("key.pem").display()
        ),
    )
    .unwrap();
    let output = breakwater_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("server.tls.key_file"), "{stderr}");
}
