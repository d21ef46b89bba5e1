//! The HTTP listener's accept loop, in place of `axum::serve`, which sets no timer
//! (so hyper's header timeout never fires) and accepts connections without limit:
//!
//! - at most `max_connections` open at once; one more is answered `503
//!   too_many_connections` and closed, so a connection flood cannot take every file
//!   descriptor and everyone else's chance to connect;
//! - `header_read_timeout` for each request's headers, counted by hyper from when a
//!   connection waits for its next request: a slow-header (slowloris) client and an
//!   idle keep-alive connection both give their slot back;
//! - on shutdown: stop accepting, then let every connection finish the request it
//!   is serving (hyper's graceful shutdown) before returning;
//! - TLS when configured: the handshake must finish within the header timeout too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::intake::error::IntakeError;
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

/// The listener's settings: what a client may hold of it, and whether it speaks TLS.
#[derive(Clone)]
pub struct ListenerSettings {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub tls: Option<TlsAcceptor>,
}

/// Reads the certificate chain and key (PEM) for the listener.
pub fn load_tls(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls.cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls.cert_file {}: no certificate in it",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("server.tls.key_file {}: {e}", key_file.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls: the key does not fit the certificate, or is unusable: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Connections over the limit answered `503` at once (each waits up to a second
/// for the request head, then up to a second to write); the others are closed
/// without an answer, so a flood holds at most this many tasks and descriptors.
const MAX_ANSWERED_REFUSALS: usize = 64;

/// The answer to a connection over the limit (it is closed right after).
static TOO_MANY_CONNECTIONS: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = IntakeError::TooManyConnections.json_body();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Serves `router` on `listener` until `stop` turns true, then waits for the
/// connections' in-flight requests (the caller bounds that wait).
pub async fn serve(listener: TcpListener, router: Router, settings: ListenerSettings, stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let answering = Arc::new(Semaphore::new(MAX_ANSWERED_REFUSALS));
    let connections = TaskTracker::new();
    let (closing, close) = watch::channel(false);
    metrics::gauge!(metric::HTTP_CONNECTIONS).set(0.0);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before accept:
                    // wait a little rather than spin; the next accept may succeed.
                    static ACCEPT_FAILED: Throttle = Throttle::new(WARN_EVERY);
                    if let Some(suppressed) = ACCEPT_FAILED.allow() {
                        tracing::warn!(%error, suppressed_since_last = suppressed, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = turned_true(stop.clone()) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(metric::HTTP_CONNECTIONS_REFUSED).increment(1);
            // Answered (503) by at most `MAX_ANSWERED_REFUSALS` tasks at once; past
            // that, and always with TLS (no handshake for it), just closed.
            match (settings.tls.is_none(), answering.clone().try_acquire_owned()) {
                (true, Ok(permit)) => {
                    connections.spawn(async move {
                        refuse(stream).await;
                        drop(permit);
                    });
                }
                _ => drop(stream),
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = router.clone();
        let close = close.clone();
        let settings = settings.clone();
        connections.spawn(async move {
            metrics::gauge!(metric::HTTP_CONNECTIONS).increment(1.0);
            match &settings.tls {
                None => serve_http(stream, peer, service, settings.header_read_timeout, close).await,
                Some(acceptor) => {
                    match tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_http(tls, peer, service, settings.header_read_timeout, close).await,
                        Ok(Err(_)) | Err(_) => {
                            metrics::counter!(metric::TLS_HANDSHAKE_FAILURES).increment(1);
                        }
                    }
                }
            }
            metrics::gauge!(metric::HTTP_CONNECTIONS).decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    let _ = closing.send(true);
    connections.close();
    connections.wait().await;
}

/// Serves HTTP/1.1 (with upgrades, for WebSocket) on one connection until it
/// ends, or until `close` turns true and its current request is done.
async fn serve_http<IO>(
    io: IO,
    peer: SocketAddr,
    router: Router,
    header_read_timeout: Duration,
    close: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The peer's address goes with each request (client IP, trusted proxies).
    let service = TowerToHyperService::new(router.map_request(move |request: axum::http::Request<Incoming>| {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    }));
    // HTTP/1.1 only (as axum is built here). hyper-util's auto builder would first
    // sniff for HTTP/2 with no timeout, so a connection that never sends a byte
    // would hold its slot forever; this one's header timer starts at once.
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = turned_true(close) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Resolves once the flag is true (or its sender is gone). The guard `wait_for`
/// returns is dropped here, so callers stay `Send`.
async fn turned_true(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|on| *on).await;
}

/// Tells a connection over the limit why, and closes it. Its request head is read
/// first (at most 16 KiB, for at most 1 s), so an HTTP client gets a proper 503 it
/// can retry rather than an answer to a request it has not sent yet.
async fn refuse(mut stream: TcpStream) {
    let read_head = async {
        let mut head = Vec::with_capacity(1024);
        let mut buffer = [0u8; 1024];
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read_head).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&TOO_MANY_CONNECTIONS)).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_well_formed_json_of_the_declared_length() {
        let text = std::str::from_utf8(&TOO_MANY_CONNECTIONS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
        assert_eq!(json["code"], "too_many_connections");
    }
}
