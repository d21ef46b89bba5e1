//! What web pages need and what browsers lose: CORS on the intake routes (a
//! preflight answered for the origins a source allows, the headers on every answer
//! so a page can read a 401, a 429 or a 503), a page's `Origin` checked against its
//! source, and the client's IP (from the peer, or a trusted proxy's
//! `X-Forwarded-For`) and User-Agent set in `context` where the event has none —
//! each switchable per source.

mod support;

use reqwest::blocking::RequestBuilder;
use serde_json::{json, Value};
use support::{client, status_and_json, track, Server};

const PAGE: &str = "http://127.0.0.1:9999";

const CONFIG: &str = r#"
[browser]
cors_max_age_seconds = 300

[[sources]]
name = "web"
write_key = "key-web"
allowed_origins = ["http://127.0.0.1:9999"]

[[sources]]
name = "backend"
write_key = "key-backend"

[[sources]]
name = "private"
write_key = "key-private"
allowed_origins = ["*"]
record_client_ip = false
record_user_agent = false
"#;

/// A track event for source `web` with an `X-Forwarded-For` header.
fn track_forwarded_for(server: &Server, forwarded_for: &str, message_id: &str) -> reqwest::blocking::Response {
    client()
        .post(server.url("/v1/track"))
        .basic_auth("key-web", Some(""))
        .header("x-forwarded-for", forwarded_for)
        .json(&track(message_id))
        .send()
        .unwrap()
}

fn post(server: &Server, key: &str, origin: Option<&str>, body: &Value) -> reqwest::blocking::Response {
    let mut request: RequestBuilder = client()
        .post(server.url("/v1/batch"))
        .basic_auth(key, Some(""))
        .header("content-type", "text/plain")
        .header("user-agent", "test-agent/1")
        .body(body.to_string());
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    request.send().unwrap()
}

fn by_id(events: &[Value], id: &str) -> Value {
    events
        .iter()
        .find(|event| event["messageId"] == id)
        .unwrap_or_else(|| panic!("{id} not stored"))
        .clone()
}

#[test]
fn preflights_are_answered_for_allowed_origins_only() {
    let server = Server::start_with(CONFIG, &[]);
    let preflight = |origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, server.url("/v1/batch"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, content-encoding",
            )
            .send()
            .unwrap()
    };
    // "private" allows every origin, so every page may ask; the source decides later.
    let answer = preflight(PAGE);
    assert_eq!(answer.status(), 204);
    let headers = answer.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for needed in ["authorization", "content-type", "content-encoding"] {
        assert!(allowed.contains(needed), "{allowed}");
    }
    assert!(headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    assert_eq!(headers["access-control-max-age"], "300");
    assert!(headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("X-RateLimit-Reset"));
}

#[test]
fn a_page_is_refused_unless_its_source_allows_its_origin() {
    let server = Server::start_with(CONFIG, &[]);
    let (status, body) = status_and_json(post(
        &server,
        "key-web",
        Some(PAGE),
        &json!({ "batch": [track("from-page")] }),
    ));
    assert_eq!(status, 200, "{body}");

    for (key, origin) in [("key-web", "https://evil.example.com"), ("key-backend", PAGE)] {
        let response = post(&server, key, Some(origin), &json!({ "batch": [track("refused")] }));
        assert!(
            response.headers().contains_key("access-control-allow-origin"),
            "readable by the page"
        );
        let (status, body) = status_and_json(response);
        assert_eq!(status, 403, "{key} from {origin}: {body}");
        assert_eq!(body["error"]["code"], "origin_not_allowed");
        assert!(body["error"]["message"].as_str().unwrap().contains("allowed_origins"));
    }
    // A 401 is readable by the page too (it can tell the key is wrong).
    let response = post(&server, "wrong", Some(PAGE), &json!({ "batch": [track("x")] }));
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("access-control-allow-origin"));
    // Servers send no Origin: unaffected.
    let (status, _) = status_and_json(post(
        &server,
        "key-backend",
        None,
        &json!({ "batch": [track("server")] }),
    ));
    assert_eq!(status, 200);

    let events = server.sink_events();
    assert!(events.iter().all(|event| event["messageId"] != "refused"));
    assert_eq!(events.len(), 2);
}

#[test]
fn the_client_ip_and_user_agent_fill_what_the_event_lacks() {
    let server = Server::start_with(CONFIG, &[]);
    let mut own = track("own-context");
    own["context"] = json!({ "ip": "192.0.2.1", "userAgent": "Own/2" });
    let batch = json!({ "batch": [track("bare"), own] });
    assert_eq!(post(&server, "key-web", None, &batch).status(), 200);
    assert_eq!(
        post(&server, "key-private", None, &json!({ "batch": [track("private")] })).status(),
        200
    );
    // Not a trusted proxy: its X-Forwarded-For is ignored.
    assert_eq!(track_forwarded_for(&server, "203.0.113.9", "forged").status(), 200);

    let events = server.sink_events();
    let bare = by_id(&events, "bare");
    assert_eq!(bare["context"]["ip"], "127.0.0.1");
    assert_eq!(bare["context"]["userAgent"], "test-agent/1");
    let own = by_id(&events, "own-context");
    assert_eq!(own["context"]["ip"], "192.0.2.1");
    assert_eq!(own["context"]["userAgent"], "Own/2");
    let private = by_id(&events, "private");
    assert!(
        private["context"].get("ip").is_none() && private["context"].get("userAgent").is_none(),
        "{private}"
    );
    assert_eq!(by_id(&events, "forged")["context"]["ip"], "127.0.0.1");
}

#[test]
fn a_trusted_proxy_names_the_client() {
    let server = Server::start_with(
        "[browser]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n[[sources]]\nname = \"web\"\nwrite_key = \"key-web\"\n",
        &[],
    );
    let response = track_forwarded_for(&server, "198.51.100.7, 203.0.113.9, 127.0.0.5", "proxied");
    assert_eq!(response.status(), 200);
    let events = server.sink_events();
    assert_eq!(
        by_id(&events, "proxied")["context"]["ip"],
        "203.0.113.9",
        "the last address the trusted proxies did not add"
    );
}

#[test]
fn the_sdks_settings_come_from_the_source_config() {
    let server = Server::start_with(CONFIG, &[]);
    let get = |path: &str| client().get(server.url(path)).header("origin", PAGE).send().unwrap();
    let response = get("/v1/projects/key-web/settings");
    assert!(response.headers().contains_key("access-control-allow-origin"));
    let (status, settings) = status_and_json(response);
    assert_eq!(status, 200, "{settings}");
    let segment = &settings["integrations"]["Segment.io"];
    assert_eq!(segment["apiHost"], format!("{}/v1", server.addr));
    assert_eq!(segment["protocol"], "http");
    assert_eq!(segment["apiKey"], "key-web");
    assert_eq!(
        settings["integrations"].as_object().unwrap().len(),
        1,
        "only what breakwater delivers to"
    );

    let (status, config) = status_and_json(get(
        "/sourceConfig/?p=npm&v=3&writeKey=key-web&lockIntegrationsVersion=false",
    ));
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["source"]["id"], "web");
    assert_eq!(config["source"]["destinations"], json!([]));
    assert!(config["source"]["config"].is_object());
    let by_header = client()
        .get(server.url("/sourceConfig"))
        .basic_auth("key-backend", Some(""))
        .send()
        .unwrap();
    assert_eq!(status_and_json(by_header).1["source"]["id"], "backend");

    // An unknown key: the same 401 as on intake.
    for path in ["/v1/projects/nope/settings", "/sourceConfig/?writeKey=nope"] {
        let (status, body) = status_and_json(get(path));
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("invalid_write_key")),
            "{path}"
        );
    }
}
