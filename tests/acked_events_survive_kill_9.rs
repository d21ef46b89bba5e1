//! The durability contract: every event acknowledged before a `kill -9` is in the
//! file sink after restart, exactly once — even when clients then resend everything
//! they had sent, acknowledged or not.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const WRITERS: usize = 8;
const EVENTS_PER_REQUEST: usize = 50;

/// What one round of load saw: the acknowledged ids, every batch attempted, and
/// every answer that was not a 200 (or the error), which the writer then resent.
struct Round {
    acked: HashSet<String>,
    attempted: Vec<Value>,
    refused: Vec<String>,
}

/// Acknowledged events each round waits for before the kill: one request per writer.
const ACKED_BEFORE_KILL: usize = WRITERS * EVENTS_PER_REQUEST;

/// Sends batches from several threads, as SDKs do: a batch that is not answered 200
/// is sent again, same body, after a short pause. The server is killed once
/// `run_for` has passed and at least `ACKED_BEFORE_KILL` events were acknowledged
/// (so a slow start after a restart cannot leave a round with nothing to check).
fn load_until_killed(server: &mut Server, run_for: Duration, round: usize) -> Round {
    let acked = Mutex::new(HashSet::new());
    let attempted = Mutex::new(Vec::new());
    let refused = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for writer in 0..WRITERS {
            let (acked, attempted, refused, stop, url) = (&acked, &attempted, &refused, &stop, server.url("/v1/batch"));
            scope.spawn(move || {
                let client = client();
                let mut request = 0;
                while !stop.load(Ordering::Relaxed) {
                    let batch = json!({ "batch": (0..EVENTS_PER_REQUEST)
                        .map(|i| track(&format!("k{round}-w{writer}-r{request}-e{i}")))
                        .collect::<Vec<_>>() });
                    request += 1;
                    attempted.lock().unwrap().push(batch.clone());
                    while !stop.load(Ordering::Relaxed) {
                        let answer = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(batch.to_string())
                            .send();
                        let not_ok = match answer {
                            Ok(response) if response.status().as_u16() == 200 => {
                                let mut acked = acked.lock().unwrap();
                                for event in batch["batch"].as_array().unwrap() {
                                    acked.insert(event["messageId"].as_str().unwrap().to_string());
                                }
                                break;
                            }
                            Ok(response) => format!("{} {}", response.status(), response.text().unwrap_or_default()),
                            Err(error) => error.to_string(),
                        };
                        refused.lock().unwrap().push(format!(
                            "writer {writer}, request {request}, at {:?}: {not_ok}",
                            started.elapsed()
                        ));
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            });
        }
        std::thread::sleep(run_for);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < ACKED_BEFORE_KILL && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        server.kill9();
        stop.store(true, Ordering::Relaxed);
    });
    Round {
        acked: acked.into_inner().unwrap(),
        attempted: attempted.into_inner().unwrap(),
        refused: refused.into_inner().unwrap(),
    }
}

#[test]
fn acknowledged_events_survive_kill_9_exactly_once() {
    let mut server = Server::start();
    let mut all_acked = HashSet::new();
    let mut all_attempted = Vec::new();
    for (round, run_ms) in [700u64, 1100, 1500].into_iter().enumerate() {
        let Round {
            acked,
            attempted,
            refused,
        } = load_until_killed(&mut server, Duration::from_millis(run_ms), round);
        assert!(
            acked.len() >= ACKED_BEFORE_KILL,
            "round {round}: only {} events acknowledged in 60 s; answers other than 200 (last 20):\n{}\nserver log:\n{}",
            acked.len(),
            refused[refused.len().saturating_sub(20)..].join("\n"),
            server.log()
        );
        all_acked.extend(acked);
        all_attempted.extend(attempted);
        server = server.restart();

        let counts = id_counts(&server.sink_events());
        let missing: Vec<_> = all_acked.iter().filter(|id| !counts.contains_key(*id)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} acknowledged events lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
        let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(doubled.is_empty(), "round {round}: duplicates {doubled:?}");
    }

    // Clients resend every batch they ever tried (acked or not): nothing doubles.
    for batch in &all_attempted {
        let (status, _) = post_json(&server, "/v1/batch", batch);
        assert_eq!(status, 200);
    }
    let counts = id_counts(&server.sink_events());
    let attempted_ids: usize = all_attempted.len() * EVENTS_PER_REQUEST;
    assert_eq!(
        counts.len(),
        attempted_ids,
        "every attempted event present after the resend"
    );
    assert!(counts.values().all(|n| *n == 1), "no event written twice");
    eprintln!(
        "acknowledged before kills: {}, attempted: {attempted_ids}, all present exactly once",
        all_acked.len()
    );
}
