//! Against a real ClickHouse: data the table cannot take is a permanent rejection;
//! a missing table or an unreachable server is retryable. Also: the layout is
//! detected from the server version and the table created on first use.

mod support;

use std::sync::Arc;

use breakwater::config::ClickHouseConfig;
use breakwater::event::EventType;
use breakwater::event::SinkBatch;
use breakwater::intake::segment::{normalize, ReceivedEvent, RequestContext};
use breakwater::sinks::clickhouse::schema::Layout;
use breakwater::sinks::clickhouse::Inserter;
use breakwater::sinks::SinkError;
use serde_json::json;
use support::backends::ClickHouse;

fn batch() -> Vec<Arc<SinkBatch>> {
    let request = RequestContext {
        route_type: Some(EventType::Track),
        sent_at: None,
        context: None,
        received_at: chrono::Utc::now(),
        source: "web",
        client_fields: &[],
    };
    let event = json!({"messageId":"m-1","userId":"u","event":"e"}).to_string();
    vec![Arc::new(SinkBatch::new(
        Arc::from("web"),
        vec![normalize(ReceivedEvent::parse(&event).unwrap(), &request).unwrap()],
    ))]
}

fn inserter(url: String, database: &str, create_table: bool) -> Inserter {
    Inserter::new(&ClickHouseConfig {
        url,
        database: database.into(),
        create_table,
        insert_timeout_ms: Some(3_000),
        ..ClickHouseConfig::default()
    })
    .unwrap()
}

#[test]
fn errors_are_sorted_into_permanent_and_retryable() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clickhouse = ClickHouse::start();

    // First use: the layout follows the server (18.16 here: legacy) and the table appears.
    let fresh = inserter(clickhouse.url(), "created", true);
    assert_eq!(runtime.block_on(fresh.prepare()).unwrap(), Layout::Legacy);
    runtime.block_on(fresh.insert(&batch())).unwrap();
    assert_eq!(clickhouse.count("created.events"), 1);

    // A table whose columns do not match the rows: the data can never go in.
    clickhouse.query("CREATE DATABASE mismatch");
    clickhouse.query(
        "CREATE TABLE mismatch.events (message_id UInt64, source_name UInt64, type UInt64, event UInt64, \
         user_id UInt64, anonymous_id UInt64, timestamp UInt64, received_at UInt64, payload UInt64) ENGINE = Memory",
    );
    let error = runtime
        .block_on(inserter(clickhouse.url(), "mismatch", false).insert(&batch()))
        .map_err(SinkError::from)
        .unwrap_err();
    assert!(!error.is_retryable(), "schema mismatch must be permanent, got {error}");
    assert_eq!(error.kind(), "rejected");

    // A missing table is an operator's fix away: retryable.
    let error = runtime
        .block_on(inserter(clickhouse.url(), "absent", false).insert(&batch()))
        .map_err(SinkError::from)
        .unwrap_err();
    assert!(error.is_retryable(), "missing table must be retryable, got {error}");

    // Nobody listening: retryable.
    let port = support::backends::free_port();
    let error = runtime
        .block_on(inserter(format!("http://127.0.0.1:{port}"), "x", true).insert(&batch()))
        .map_err(SinkError::from)
        .unwrap_err();
    assert!(
        error.is_retryable(),
        "unreachable server must be retryable, got {error}"
    );
    assert_eq!(error.kind(), "unavailable");
}
