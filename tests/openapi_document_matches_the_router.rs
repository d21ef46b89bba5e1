//! `openapi.json` (served at `/openapi.json`) describes every HTTP route and only
//! those: its paths are the router's (read from the source's `.route(…)` calls and
//! the Segment route table), every method it names answers (never 404 or 405), a
//! method it does not name gets 405, the document passes a real validator
//! (`openapi-spec-validator` from PyPI), and real answers match its schemas.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use support::{client, get_json, track, Server, ADMIN_TOKEN};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn document() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("openapi.json")).unwrap()).unwrap()
}

/// Every path the router serves, read from the source: each `.route("…"` and each
/// entry of a route table (`("/v1/…", RouteKind::…)`, `("/pixel/…", EventType::…)`).
fn router_paths() -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    let mut files = vec![root().join("src")];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        paths.extend(literal_after(&text, ".route("));
        // Route tables: `("/path", Kind::Variant)` entries.
        for (at, _) in text.match_indices("(\"/") {
            let rest = &text[at + 2..];
            let Some(end) = rest.find('"') else { continue };
            let after = rest[end + 1..].trim_start_matches([',', ' ']);
            let kind: String = after.chars().take_while(|c| c.is_alphanumeric()).collect();
            if kind.starts_with(char::is_uppercase) && after[kind.len()..].starts_with("::") {
                paths.insert(rest[..end].to_string());
            }
        }
    }
    paths
}

/// The string literal that opens each call `marker` starts (whitespace allowed).
fn literal_after(text: &str, marker: &str) -> Vec<String> {
    text.match_indices(marker)
        .filter_map(|(at, _)| {
            let rest = text[at + marker.len()..].trim_start();
            let rest = rest.strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

#[test]
fn the_document_names_every_route_of_the_router_and_no_other() {
    let documented: BTreeSet<String> = document()["paths"].as_object().unwrap().keys().cloned().collect();
    let routed = router_paths();
    let missing: Vec<_> = routed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(missing.is_empty(), "routes missing from openapi.json: {missing:?}");
    assert!(
        extra.is_empty(),
        "openapi.json names routes the router lacks: {extra:?}"
    );
    assert!(routed.len() >= 30, "the source scan found too few routes: {routed:?}");
}

#[test]
fn every_documented_method_answers_and_others_get_405() {
    let server = Server::start_with("[websocket]\nserve_example_page = true\n", &[]);
    let doc = document();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let url = server.url(&path.replace("{write_key}", "any-key"));
        let methods: Vec<&String> = item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "parameters")
            .collect();
        for method in &methods {
            let request = client()
                .request(method.to_uppercase().parse().unwrap(), &url)
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .body("{}");
            let status = request.send().unwrap().status().as_u16();
            assert!(
                status != 404 && status != 405,
                "{method} {path}: {status}, though documented"
            );
        }
        let undocumented = ["put", "delete", "patch"]
            .into_iter()
            .find(|m| !methods.iter().any(|d| d == m))
            .unwrap();
        let status = client()
            .request(undocumented.to_uppercase().parse().unwrap(), &url)
            .send()
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(status, 405, "{undocumented} {path}: not documented, so not served");
    }
    let served = get_json(&server, "/openapi.json");
    assert_eq!(served, doc, "/openapi.json serves the checked-in document");
}

fn venv_python() -> PathBuf {
    let python = root().join("target/test-venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: scripts/test.sh creates it and installs openapi-spec-validator",
        python.display()
    );
    python
}

#[test]
fn the_document_passes_a_real_validator() {
    let output = Command::new(venv_python())
        .args(["-m", "openapi_spec_validator"])
        .arg(root().join("openapi.json"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Validates `instance` against `#/components/schemas/<schema>` with `jsonschema`
/// (installed with the validator).
fn check_against(schema: &str, instance: &Value, dir: &Path) {
    let file = dir.join(format!("{schema}.json"));
    std::fs::write(&file, instance.to_string()).unwrap();
    let script = "import json, sys, jsonschema\n\
                  doc = json.load(open(sys.argv[1]))\n\
                  root = {'$ref': '#/components/schemas/' + sys.argv[2], 'components': doc['components']}\n\
                  jsonschema.Draft202012Validator(root).validate(json.load(open(sys.argv[3])))\n";
    let output = Command::new(venv_python())
        .args(["-c", script])
        .arg(root().join("openapi.json"))
        .arg(schema)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{instance} does not match {schema}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn real_answers_match_the_documented_schemas() {
    let server = Server::start_with("[[sources]]\nname = \"web\"\nwrite_key = \"key-web\"\n", &[]);
    let dir = tempfile::tempdir().unwrap();
    let post = |body: Value, key: &str| {
        client()
            .post(server.url("/v1/batch"))
            .basic_auth(key, Some(""))
            .json(&body)
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap()
    };
    let mut bad = track("bad");
    bad.as_object_mut().unwrap().remove("userId");
    check_against(
        "Accepted",
        &post(json!({ "batch": [track("ok"), bad.clone()] }), "key-web"),
        dir.path(),
    );
    check_against("Error", &post(json!({ "batch": [bad] }), "key-web"), dir.path());
    check_against("Error", &post(json!({ "batch": [track("x")] }), "wrong"), dir.path());
    let settings = get_json(&server, "/v1/projects/key-web/settings");
    check_against("SegmentSettings", &settings, dir.path());
    let config = get_json(&server, "/sourceConfig/?writeKey=key-web");
    check_against("RudderSourceConfig", &config, dir.path());
}
