//! TLS on the listener (`[server.tls]`): HTTPS works with the configured
//! certificate, a plain-HTTP client is refused at the handshake (and counted), a
//! client that never finishes its handshake is closed after the header timeout, and
//! an unusable key stops start-up with a message naming the setting; WebSocket
//! frames are acknowledged over TLS (wss). Uses the openssl and curl command-line
//! tools (scripts/test.sh installs them).

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
        // A server certificate, not a CA: rustls clients refuse a CA as end entity.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl must be installed (scripts/test.sh installs it)");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
}

/// `[server.tls]` with the certificate and key in `dir`, after `server_lines`.
fn tls_config(dir: &Path, server_lines: &str) -> String {
    format!(
        "[server]\n{server_lines}\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    )
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
    let server = Server::start_with(&tls_config(dir.path(), "header_read_timeout_ms = 1000"), &[]);
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
    std::fs::write(&config_path, tls_config(dir.path(), "")).unwrap();
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

#[test]
fn websocket_frames_are_acknowledged_over_tls() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    self_signed_certificate(dir.path());
    let server = Server::start_with(&tls_config(dir.path(), ""), &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answer = runtime.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(dir.path().join("cert.pem")).unwrap() {
            roots.add(certificate.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake with the configured certificate");
        let url = format!("wss://localhost:{}/v1/ws", server.addr.port());
        let (mut socket, _) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("WebSocket upgrade over TLS");
        let frame = r#"{"id":7,"batch":[{"type":"track","userId":"u-1","event":"Over WSS","messageId":"wss-1"}]}"#;
        socket.send(Message::text(frame)).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("an answer within 10 s");
        let _ = socket.close(None).await;
        match answer {
            Some(Ok(Message::Text(text))) => text.to_string(),
            other => panic!("no text answer: {other:?}"),
        }
    });
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        (answer["type"].as_str(), answer["id"].as_u64()),
        (Some("ack"), Some(7)),
        "{answer}"
    );
    assert_eq!(
        server
            .sink_events()
            .iter()
            .filter(|e| e["messageId"] == "wss-1")
            .count(),
        1
    );
}
