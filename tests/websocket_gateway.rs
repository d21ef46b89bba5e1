//! The WebSocket gateway with a real client (tokio-tungstenite): acks only for
//! durable events, exactly once in the sink; every auth style; bad frames answered
//! without harm to others; flow control against a client that never reads; 10,000
//! connections opened and closed leave nothing behind; limits; idle timeout; acks
//! during a ClickHouse outage; graceful shutdown with 1001.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::backends::free_port;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(server: &Server, query: &str) -> Socket {
    try_connect(server, query, None).await.expect("websocket upgrade")
}

async fn try_connect(server: &Server, query: &str, basic_key: Option<&str>) -> Result<Socket, String> {
    let mut request = format!("ws://{}/v1/ws{query}", server.addr)
        .into_client_request()
        .unwrap();
    if let Some(key) = basic_key {
        use base64::Engine;
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
        );
        request.headers_mut().insert("authorization", value.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
        .map_err(|e| e.to_string())
}

/// Next JSON answer (skipping pings), or the close code.
async fn next_answer(socket: &mut Socket) -> Result<Value, Option<u16>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Ok(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Message::Close(frame)))) => return Err(frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return Err(None),
            Err(_) => panic!("no answer within 30 s"),
        }
    }
}

fn frame(id: u64, events: Vec<Value>) -> Message {
    Message::text(json!({ "id": id, "batch": events }).to_string())
}

#[test]
fn a_hundred_thousand_events_over_many_connections_land_exactly_once() {
    let server = Server::start();
    let runtime = runtime();
    let acked: HashSet<String> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for connection in 0..20 {
            let mut socket = connect(&server, "").await;
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                // Up to 8 frames in flight per connection.
                let (mut sent, mut answered) = (0u64, 0u64);
                while answered < 50 {
                    while sent < 50 && sent - answered < 8 {
                        let events = (0..100)
                            .map(|i| track(&format!("ws{connection}-f{sent}-e{i}")))
                            .collect();
                        socket.send(frame(sent, events)).await.unwrap();
                        sent += 1;
                    }
                    let answer = next_answer(&mut socket).await.expect("answer");
                    assert_eq!(answer["type"], "ack", "{answer}");
                    acked.extend(
                        answer["messageIds"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_str().unwrap().to_string()),
                    );
                    answered += 1;
                }
                // The same frame again: acknowledged as duplicates.
                let events = (0..100).map(|i| track(&format!("ws{connection}-f0-e{i}"))).collect();
                socket.send(frame(99, events)).await.unwrap();
                let answer = next_answer(&mut socket).await.unwrap();
                assert_eq!(answer["duplicates"], 100, "{answer}");
                socket.close(None).await.unwrap();
                acked
            }));
        }
        let mut all = HashSet::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    });
    assert_eq!(acked.len(), 100_000);
    let counts = id_counts(&server.sink_events());
    assert_eq!(counts.len(), 100_000, "every acknowledged event is in the sink");
    assert!(counts.values().all(|n| *n == 1), "no event twice");
    assert!(acked.iter().all(|id| counts.contains_key(id)));
    assert_eq!(
        server.metric("breakwater_events_total{source=\"default\",transport=\"websocket\",outcome=\"accepted\"}"),
        100_000.0
    );
}

#[test]
fn write_keys_by_header_query_or_hello_frame() {
    let server = Server::start_with("[[sources]]\nname = \"app\"\nwrite_key = \"ws-key\"\n", &[]);
    let runtime = runtime();
    runtime.block_on(async {
        for (query, basic) in [("?writeKey=ws-key", None), ("", Some("ws-key"))] {
            let mut socket = try_connect(&server, query, basic).await.unwrap();
            socket
                .send(Message::text(track(&format!("k{query}{basic:?}")).to_string()))
                .await
                .unwrap();
            assert_eq!(next_answer(&mut socket).await.unwrap()["type"], "ack");
        }
        // A wrong key in the query or header is refused before the upgrade (401).
        let refused = try_connect(&server, "?writeKey=nope", None).await.unwrap_err();
        assert!(refused.contains("401"), "{refused}");
        // No key at upgrade: a hello frame carries it.
        let mut socket = connect(&server, "").await;
        socket
            .send(Message::text(r#"{"type":"hello","writeKey":"ws-key"}"#))
            .await
            .unwrap();
        let ready = next_answer(&mut socket).await.unwrap();
        assert_eq!(
            (ready["type"].as_str(), ready["source"].as_str()),
            (Some("ready"), Some("app"))
        );
        socket.send(Message::text(track("hello-1").to_string())).await.unwrap();
        assert_eq!(next_answer(&mut socket).await.unwrap()["type"], "ack");
        // A wrong hello closes with 1008.
        let mut socket = connect(&server, "").await;
        socket
            .send(Message::text(r#"{"type":"hello","writeKey":"bad"}"#))
            .await
            .unwrap();
        assert_eq!(next_answer(&mut socket).await.unwrap_err(), Some(1008));
    });
    let sources: HashSet<_> = server.sink_events().iter().map(|e| e["sourceName"].clone()).collect();
    assert_eq!(sources, HashSet::from([json!("app")]));
}

/// A connection that did not authenticate at the upgrade must send its `hello` in
/// time; answering the server's pings does not keep it open (issue 20).
#[test]
fn a_connection_that_never_says_hello_is_closed_though_it_answers_pings() {
    let server = Server::start_with(
        "[websocket]\nhello_timeout_ms = 600\nping_interval_ms = 100\n\n[[sources]]\nname = \"app\"\nwrite_key = \"ws-key\"\n",
        &[],
    );
    let runtime = runtime();
    runtime.block_on(async {
        let started = std::time::Instant::now();
        let mut socket = connect(&server, "").await;
        // Reading answers the pings (tungstenite sends the pongs) until the close.
        assert_eq!(next_answer(&mut socket).await.unwrap_err(), Some(1008));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(500), "closed after {waited:?}");
        assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
        // A connection that says hello in time is served past the deadline.
        let mut socket = connect(&server, "").await;
        socket
            .send(Message::text(r#"{"type":"hello","writeKey":"ws-key"}"#))
            .await
            .unwrap();
        assert_eq!(next_answer(&mut socket).await.unwrap()["type"], "ready");
        tokio::time::sleep(Duration::from_millis(900)).await;
        socket
            .send(Message::text(track("after-hello").to_string()))
            .await
            .unwrap();
        assert_eq!(next_answer(&mut socket).await.unwrap()["type"], "ack");
    });
    assert_eq!(
        server.metric("breakwater_websocket_connections_closed_total{reason=\"hello_timeout\"}"),
        1.0
    );
}

#[test]
fn bad_frames_are_answered_and_harm_no_one_else() {
    let server = Server::start_with("[websocket]\nmax_frame_bytes = 20000\n", &[]);
    let runtime = runtime();
    runtime.block_on(async {
        let mut socket = connect(&server, "").await;
        socket.send(Message::text("{not json")).await.unwrap();
        let nack = next_answer(&mut socket).await.unwrap();
        assert_eq!(
            (nack["type"].as_str(), nack["retryable"].as_bool()),
            (Some("nack"), Some(false)),
            "{nack}"
        );
        assert_eq!(nack["error"]["code"], "invalid_json");
        socket
            .send(Message::text(
                json!({"id": 2, "type": "track", "userId": "u"}).to_string(),
            ))
            .await
            .unwrap();
        let nack = next_answer(&mut socket).await.unwrap();
        assert_eq!(
            (nack["id"].as_u64(), nack["rejected"][0]["code"].as_str()),
            (Some(2), Some("missing_event")),
            "{nack}"
        );
        socket
            .send(frame(3, vec![track("good"), json!({"type": "track", "userId": "u"})]))
            .await
            .unwrap();
        let ack = next_answer(&mut socket).await.unwrap();
        assert_eq!(ack["type"], "ack");
        assert_eq!(ack["messageIds"], json!(["good"]));
        assert_eq!(ack["rejected"][0]["index"], 1);

        // Another client is served throughout.
        let mut other = connect(&server, "").await;
        // Oversized frame: 1009 for that connection only.
        let mut big = track("big");
        big["properties"]["blob"] = json!("x".repeat(30_000));
        socket.send(Message::text(big.to_string())).await.unwrap();
        assert_eq!(next_answer(&mut socket).await.unwrap_err(), Some(1009));
        // Binary frame: 1003.
        let mut binary = connect(&server, "").await;
        binary.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        assert_eq!(next_answer(&mut binary).await.unwrap_err(), Some(1003));
        other.send(Message::text(track("other").to_string())).await.unwrap();
        assert_eq!(next_answer(&mut other).await.unwrap()["type"], "ack");
    });
    assert_eq!(server.sink_events().len(), 2);
}

#[test]
fn a_client_that_never_reads_its_acks_is_held_back_alone() {
    let server = Server::start_with("[websocket]\nmax_unacked_frames = 4\nwrite_timeout_ms = 1000\n", &[]);
    let runtime = runtime();
    runtime.block_on(async {
        let mut greedy = connect(&server, "").await;
        // Keep sending without reading: the server stops reading, TCP fills up, and
        // our sends stall; give up after a second of stalling.
        let mut sent = 0;
        loop {
            let events = (0..50).map(|i| track(&format!("g{sent}-{i}"))).collect();
            match tokio::time::timeout(Duration::from_secs(1), greedy.send(frame(sent, events))).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
            assert!(sent < 100_000, "the server never pushed back");
        }
        // Meanwhile another connection is served normally.
        let mut polite = connect(&server, "").await;
        for i in 0..20 {
            polite
                .send(Message::text(track(&format!("polite-{i}")).to_string()))
                .await
                .unwrap();
            assert_eq!(next_answer(&mut polite).await.unwrap()["type"], "ack");
        }
        drop(greedy);
    });
    // The stalled connection is let go (write timeout) and nothing leaks.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.metric("breakwater_websocket_connections") > 0.0 {
        assert!(std::time::Instant::now() < deadline, "connections left open");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap())
        })
        .unwrap()
}

#[test]
fn ten_thousand_connections_opened_and_closed_leave_nothing_behind() {
    let server = Server::start();
    let runtime = runtime();
    let churn = |rounds: usize| {
        runtime.block_on(async {
            for round in 0..rounds {
                let mut sockets = Vec::new();
                for _ in 0..100 {
                    sockets.push(connect(&server, "").await);
                }
                for (i, mut socket) in sockets.into_iter().enumerate() {
                    if i % 2 == 0 {
                        socket.close(None).await.unwrap(); // orderly close
                    } else if i % 4 == 1 {
                        socket
                            .send(Message::text(track(&format!("c{round}-{i}")).to_string()))
                            .await
                            .unwrap();
                        drop(socket); // gone with a frame in flight
                    } else {
                        drop(socket); // abrupt: TCP closed, no close frame
                    }
                }
            }
        })
    };
    let wait_for_zero = || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while server.metric("breakwater_websocket_connections") > 0.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the connection gauge did not return to 0"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    churn(10); // warm-up: 1,000 connections
    wait_for_zero();
    let before = rss_kib(server.pid());
    churn(90); // 9,000 more
    wait_for_zero();
    let after = rss_kib(server.pid());
    assert!(
        after < before + 30 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 9,000 connections"
    );
    assert!(server.metric("breakwater_websocket_connections_closed_total{reason=\"client_closed\"}") >= 4000.0);
}

#[test]
fn the_connection_limit_refuses_with_503_and_only_silent_connections_time_out() {
    let server = Server::start_with(
        "[websocket]\nmax_connections = 2\nidle_timeout_ms = 400\nping_interval_ms = 100\n",
        &[],
    );
    let runtime = runtime();
    runtime.block_on(async {
        let mut silent = connect(&server, "").await;
        let mut alive = connect(&server, "").await;
        let refused = try_connect(&server, "", None).await.unwrap_err();
        assert!(refused.contains("503"), "{refused}");
        // `alive` keeps reading, so its client answers the server's pings;
        // `silent` does not read at all.
        let keepalive = tokio::spawn(async move {
            let until = tokio::time::Instant::now() + Duration::from_millis(1200);
            while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, alive.next()).await {}
            alive
        });
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut alive = keepalive.await.unwrap();
        alive
            .send(Message::text(track("still-alive").to_string()))
            .await
            .unwrap();
        assert_eq!(
            next_answer(&mut alive).await.unwrap()["type"],
            "ack",
            "pongs keep a connection alive"
        );
        assert!(
            next_answer(&mut silent).await.is_err(),
            "the silent connection must be closed"
        );
    });
    assert_eq!(
        server.metric("breakwater_websocket_connections_closed_total{reason=\"idle_timeout\"}"),
        1.0
    );
}

#[test]
fn a_per_connection_frame_rate_paces_reading() {
    let server = Server::start_with("[websocket]\nmax_frames_per_second = 10\n", &[]);
    let runtime = runtime();
    let elapsed = runtime.block_on(async {
        let mut socket = connect(&server, "").await;
        let started = std::time::Instant::now();
        for f in 0..21 {
            socket.send(frame(f, vec![track(&format!("rate-{f}"))])).await.unwrap();
        }
        for _ in 0..21 {
            assert_eq!(next_answer(&mut socket).await.unwrap()["type"], "ack");
        }
        started.elapsed()
    });
    // 21 frames at 10 per second cannot all be read in less than 2 s.
    assert!(
        elapsed >= Duration::from_millis(1900),
        "21 frames answered in {elapsed:?}: not paced"
    );
}

#[test]
fn acks_keep_arriving_while_clickhouse_is_down() {
    let server = Server::start_with(
        &format!(
            "[file_sink]\nenabled = true\n[clickhouse]\nurl = \"http://127.0.0.1:{}\"\n",
            free_port()
        ),
        &[],
    );
    let runtime = runtime();
    runtime.block_on(async {
        let mut socket = connect(&server, "").await;
        for f in 0..20 {
            socket
                .send(frame(f, (0..10).map(|i| track(&format!("o{f}-{i}"))).collect()))
                .await
                .unwrap();
            let answer = next_answer(&mut socket).await.unwrap();
            assert_eq!(answer["type"], "ack", "{answer}");
        }
    });
    assert_eq!(server.metric("breakwater_spool_events{sink=\"clickhouse\"}"), 200.0);
    assert_eq!(server.sink_events().len(), 200);
}

#[test]
fn shutdown_answers_in_flight_frames_and_closes_with_1001() {
    let mut server = Server::start();
    let runtime = runtime();
    let (acked, code) = runtime.block_on(async {
        let mut socket = connect(&server, "").await;
        for f in 0..5 {
            socket.send(frame(f, vec![track(&format!("s{f}"))])).await.unwrap();
        }
        unsafe {
            libc::kill(server.pid() as i32, libc::SIGTERM);
        }
        let mut acked = 0;
        loop {
            match next_answer(&mut socket).await {
                Ok(answer) => {
                    assert_eq!(answer["type"], "ack", "{answer}");
                    acked += 1;
                }
                Err(code) => return (acked, code),
            }
        }
    });
    assert_eq!(acked, 5, "every frame sent before the shutdown is answered");
    assert_eq!(code, Some(1001));
    assert!(server.terminate(Duration::from_secs(10)).success());
    assert_eq!(server.sink_events().len(), 5);
}
