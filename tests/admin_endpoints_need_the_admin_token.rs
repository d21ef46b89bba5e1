//! `/admin/*` (the policy, the spool, dead letters with their events) answers only
//! to the admin token; a write key is not one, and without a token configured the
//! endpoints are closed. `/metrics` and `/health/*` stay open.

mod support;

use support::*;

const CONFIG: &str = r#"
[[sources]]
name = "web"
write_key = "wk-web-secret-0123456789"
"#;

fn get(server: &Server, path: &str, bearer: Option<&str>) -> (u16, serde_json::Value, Option<String>) {
    let mut request = client().get(server.url(path));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().unwrap();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|value| value.to_str().unwrap().to_string());
    let (status, body) = status_and_json(response);
    (status, body, challenge)
}

#[test]
fn admin_endpoints_answer_only_to_the_admin_token() {
    let server = Server::start_with(CONFIG, &[]);
    for path in ["/admin/spool", "/admin/policy", "/admin/dead-letters"] {
        let (status, body, challenge) = get(&server, path, None);
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(body["error"]["code"], "admin_token_required", "{path}: {body}");
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"breakwater-admin\""));

        let (status, body, _) = get(&server, path, Some("wk-web-secret-0123456789"));
        assert_eq!(status, 401, "a write key is not an admin token: {path}: {body}");
        assert_eq!(body["error"]["code"], "admin_token_invalid");

        let (status, body, _) = get(&server, path, Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "{path}: {body}");
    }
    // A write key in Basic, as producers send it, does not open them either.
    let response = client()
        .get(server.url("/admin/spool"))
        .basic_auth("wk-web-secret-0123456789", Some(""))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    for path in ["/metrics", "/health/live", "/health/ready"] {
        let status = client().get(server.url(path)).send().unwrap().status().as_u16();
        assert_eq!(status, 200, "{path} stays open");
    }
}

#[test]
fn without_a_configured_token_admin_endpoints_are_closed() {
    let server = Server::start_with(&format!("{CONFIG}\n[admin]\n"), &[]);
    let (status, body, _) = get(&server, "/admin/spool", Some(ADMIN_TOKEN));
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "admin_disabled");
    assert!(body["message"].as_str().unwrap().contains("admin.token"), "{body}");
}

#[test]
fn a_short_admin_token_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("breakwater.toml");
    std::fs::write(&config, "[admin]\ntoken = \"short\"\n").unwrap();
    let output = breakwater_command()
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr).to_string() + &String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("admin.token") && text.contains("16"), "{text}");
}
