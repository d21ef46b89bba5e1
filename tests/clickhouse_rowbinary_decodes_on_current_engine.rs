//! The exact RowBinary bytes breakwater sends for the modern schema decode, field
//! for field, on the current ClickHouse engine (chdb-core, installed by the test
//! command into target/test-venv), and the modern DDL is valid there.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use breakwater::event::{EventType, NormalizedEvent};
use breakwater::intake::segment::{normalize, ReceivedEvent, RequestContext};
use breakwater::sinks::clickhouse::row_binary::encode_row;
use breakwater::sinks::clickhouse::schema::{self, Layout};
use serde_json::{json, Value};

fn python() -> PathBuf {
    let python = std::env::var_os("BREAKWATER_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv/bin/python")));
    assert!(
        python.is_file(),
        "{} not found: run ./scripts/test.sh once (it creates target/test-venv with chdb-core)",
        python.display()
    );
    python
}

fn events() -> Vec<NormalizedEvent> {
    let received_at = chrono::DateTime::parse_from_rfc3339("2026-03-04T05:06:07.089Z")
        .unwrap()
        .to_utc();
    let request = |route_type| RequestContext {
        route_type,
        sent_at: None,
        context: None,
        received_at,
        source: "web",
        client_fields: &[],
    };
    let long_text = "x".repeat(20_000); // length needs a 3-byte LEB128
    [
        (Some(EventType::Track), json!({"messageId":"a-track","userId":"u-1","event":"Order Completed","timestamp":"2026-03-04T05:06:00.123Z","properties":{"total":12.5}})),
        (Some(EventType::Identify), json!({"messageId":"b-unicode","anonymousId":"anon-ü","traits":{"name":"Zoë \"quoted\" \\ back\nline 😀"}})),
        (Some(EventType::Page), json!({"messageId":"c-long","userId":"u-2","properties":{"blob":long_text}})),
        (Some(EventType::Alias), json!({"messageId":"d-alias","userId":"u-3","previousId":"anon-9","timestamp":"1969-12-31T23:59:59.500Z"})),
    ]
    .into_iter()
    .map(|(route_type, event)| {
        let text = event.to_string();
        normalize(ReceivedEvent::parse(&text).unwrap(), &request(route_type)).unwrap()
    })
    .collect()
}

#[test]
fn rowbinary_decodes_field_by_field_on_the_current_engine() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let events = events();
    let mut bytes = Vec::new();
    for event in &events {
        encode_row(Layout::Modern, "web", event, &mut bytes);
    }
    let data = dir.path().join("batch.bin");
    std::fs::write(&data, &bytes).unwrap();
    let ddl = dir.path().join("ddl.sql");
    std::fs::write(&ddl, schema::create_table(Layout::Modern, "bw", "events")).unwrap();

    let output = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chdb/decode_rowbinary.py"))
        .arg(&ddl)
        .arg(&data)
        .arg(schema::columns(Layout::Modern))
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "chdb failed (is chdb-core installed in target/test-venv?):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(rows.len(), events.len(), "rows decoded");
    let events: Vec<Arc<NormalizedEvent>> = events.into_iter().map(Arc::new).collect();
    for (row, event) in rows.iter().zip(&events) {
        let id = &event.message_id;
        assert_eq!(row["message_id"], *id);
        assert_eq!(row["source_name"], "web", "{id}: source_name");
        assert_eq!(
            row["source_type"], "LowCardinality(String)",
            "{id}: modern schema types"
        );
        assert_eq!(row["type"], event.event_type.as_str(), "{id}: type");
        assert_eq!(row["event"], event.event_name, "{id}: event");
        assert_eq!(
            row["user_id"],
            event.user_id.clone().unwrap_or_default(),
            "{id}: user_id"
        );
        assert_eq!(
            row["anonymous_id"],
            event.anonymous_id.clone().unwrap_or_default(),
            "{id}: anonymous_id"
        );
        assert_eq!(
            row["timestamp_ms"].as_i64(),
            Some(event.timestamp_ms),
            "{id}: timestamp"
        );
        assert_eq!(
            row["received_at_ms"].as_i64(),
            Some(event.received_at_ms),
            "{id}: received_at"
        );
        assert_eq!(
            row["payload"].as_str().unwrap().as_bytes(),
            &event.json[..],
            "{id}: payload bytes"
        );
    }
    assert_eq!(rows[3]["timestamp_ms"], -500, "times before 1970 survive");
}
