//! The settings documents browser SDKs fetch before they send anything, generated
//! from breakwater's own source config: Segment's `analytics-next` reads
//! `<cdnURL>/v1/projects/<writeKey>/settings`, RudderStack's `analytics-js` reads
//! `<configUrl>/sourceConfig/?writeKey=<writeKey>…`. Each names only what breakwater
//! delivers to: the Segment API on this server (`Segment.io`, which is breakwater)
//! and no device-mode destinations. An unknown write key gets the same 401 as intake.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::auth;
use super::browser::Peer;
use super::IntakeState;

/// `GET /v1/projects/{write_key}/settings` (Segment's analytics-next).
pub async fn segment(
    State(app): State<Arc<IntakeState>>,
    Peer(peer): Peer,
    Path(write_key): Path<String>,
    headers: HeaderMap,
) -> Response {
    let source = match app.write_keys.authenticate(Some(&write_key)) {
        Ok(source) => source,
        Err(error) => return error.into_response(),
    };
    let (scheme, host) = app.browser.public_address(&headers, peer);
    let settings = json!({
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "apiHost": format!("{host}/v1"),
                "protocol": scheme,
                "unbundledIntegrations": [],
                "addBundledMetadata": true,
                "maybeBundledConfigIds": {},
            }
        },
        "plan": {
            "track": { "__default": { "enabled": true, "integrations": {} } },
            "identify": { "__default": { "enabled": true } },
            "group": { "__default": { "enabled": true } },
        },
        "edgeFunction": {},
        "analyticsNextEnabled": true,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": { "sampleRate": 0 },
        "legacyVideoPluginsEnabled": false,
        "remotePlugins": [],
        "sourceName": &*source,
    });
    cached(Json(settings).into_response())
}

/// `GET /sourceConfig/?writeKey=…` (RudderStack's analytics-js; the key may also
/// come as HTTP Basic).
pub async fn rudderstack(
    State(app): State<Arc<IntakeState>>,
    Query(query): Query<auth::WriteKeyQuery>,
    headers: HeaderMap,
) -> Response {
    let presented = query.write_key.or_else(|| auth::write_key_from_headers(&headers));
    let source = match app.write_keys.authenticate(presented.as_deref()) {
        Ok(source) => source,
        Err(error) => return error.into_response(),
    };
    let config: Value = json!({
        "isHosted": false,
        "source": {
            "id": &*source,
            "name": &*source,
            "writeKey": presented.unwrap_or_default(),
            "enabled": true,
            "workspaceId": "breakwater",
            "config": {
                "statsCollection": {
                    "errors": { "enabled": false },
                    "metrics": { "enabled": false },
                }
            },
            "destinations": [],
        }
    });
    cached(Json(config).into_response())
}

/// Settings change only with the config: a browser may keep them a few minutes.
fn cached(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=300"),
    );
    response
}
