//! What intake does for web pages and records of the client: CORS (which origins
//! may send, per source; preflights answered; headers on every answer), the
//! client's IP (from the peer, or from `X-Forwarded-For` / `Forwarded` only when the
//! peer is a trusted proxy) and User-Agent, set in `context` where the event has
//! none, each switchable per source.
//!
//! A request's `Origin` is checked against its source once the source is known (a
//! page of another site using a leaked write key is refused, `403
//! origin_not_allowed`); the CORS headers on the answer are those of any source,
//! because an answer must be readable before its source is known (a 401, a 503).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::IntakeError;
use super::IntakeState;
use crate::config::{Config, IpRange};

/// Which origins may send.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origins {
    Any,
    /// Exact origins, lower-cased; empty: none.
    Only(HashSet<String>),
}

impl Origins {
    fn from_list(list: &[String]) -> Origins {
        if list.iter().any(|origin| origin == "*") {
            Origins::Any
        } else {
            Origins::Only(list.iter().map(|origin| origin.to_ascii_lowercase()).collect())
        }
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Any => true,
            Origins::Only(list) => list.contains(&origin.to_ascii_lowercase()),
        }
    }
}

/// One source's browser settings.
#[derive(Debug, Clone)]
struct SourceBrowser {
    origins: Origins,
    record_client_ip: bool,
    record_user_agent: bool,
}

/// What intake knows of the client besides the body.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// The `Origin` header of a request from a web page on another origin (a page
    /// breakwater serves itself, such as the WebSocket example, counts as none).
    pub origin: Option<String>,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

/// The `[browser]` section and each source's overrides, resolved.
pub struct BrowserPolicy {
    defaults: SourceBrowser,
    by_source: HashMap<String, SourceBrowser>,
    /// Origins any source allows: the CORS headers of every answer.
    any_source: Origins,
    max_age: HeaderValue,
    trusted_proxies: Vec<IpRange>,
    /// `https` when the listener has TLS.
    scheme: &'static str,
}

/// Headers a page may send when its preflight names none: the write key (Basic or
/// `X-Write-Key`), a JSON or compressed body. A preflight that names headers gets
/// them allowed (SDKs add their own, such as analytics-next's `X-Retry-Count`;
/// none of them is trusted for anything but the key).
const ALLOWED_HEADERS: &str = "Authorization, Content-Type, Content-Encoding, X-Write-Key";
/// Headers a page may read on the answer: when to retry.
const EXPOSED_HEADERS: &str = "Retry-After, X-RateLimit-Reset";

impl BrowserPolicy {
    pub fn new(config: &Config) -> BrowserPolicy {
        let browser = &config.browser;
        let defaults = SourceBrowser {
            origins: Origins::from_list(&browser.allowed_origins),
            record_client_ip: browser.record_client_ip,
            record_user_agent: browser.record_user_agent,
        };
        let by_source: HashMap<String, SourceBrowser> = config
            .sources
            .iter()
            .map(|source| {
                let settings = SourceBrowser {
                    origins: source
                        .allowed_origins
                        .as_deref()
                        .map_or_else(|| defaults.origins.clone(), Origins::from_list),
                    record_client_ip: source.record_client_ip.unwrap_or(defaults.record_client_ip),
                    record_user_agent: source.record_user_agent.unwrap_or(defaults.record_user_agent),
                };
                (source.name.clone(), settings)
            })
            .collect();
        let mut every = std::iter::once(&defaults).chain(by_source.values());
        let any_source = if every.clone().any(|s| s.origins == Origins::Any) {
            Origins::Any
        } else {
            Origins::Only(
                every
                    .by_ref()
                    .flat_map(|s| match &s.origins {
                        Origins::Only(list) => list.iter().cloned().collect::<Vec<_>>(),
                        Origins::Any => Vec::new(),
                    })
                    .collect(),
            )
        };
        BrowserPolicy {
            defaults,
            by_source,
            any_source,
            max_age: HeaderValue::from(browser.cors_max_age_seconds),
            trusted_proxies: browser.trusted_proxy_ranges(),
            scheme: if config.server.tls.is_some() { "https" } else { "http" },
        }
    }

    fn for_source(&self, source: &str) -> &SourceBrowser {
        self.by_source.get(source).unwrap_or(&self.defaults)
    }

    /// A request from a web page (it has an `Origin`) whose source does not allow
    /// that origin is refused; requests without one (servers, apps) pass.
    pub fn check_origin(&self, source: &str, client: &Client) -> Result<(), IntakeError> {
        match &client.origin {
            Some(origin) if !self.for_source(source).origins.allows(origin) => {
                Err(IntakeError::origin_not_allowed(origin))
            }
            _ => Ok(()),
        }
    }

    /// The `context` keys the client gives each event of the request that lacks
    /// them (and whose batch context lacks them): `ip` and `userAgent`, where the
    /// source records them, each with its value as JSON text.
    pub fn client_fields(&self, source: &str, client: &Client) -> Vec<(&'static str, Vec<u8>)> {
        let settings = self.for_source(source);
        let mut fields = Vec::new();
        if let Some(ip) = client.ip.filter(|_| settings.record_client_ip) {
            fields.push(("ip", json_text(&ip.to_string())));
        }
        if let Some(user_agent) = client.user_agent.as_ref().filter(|_| settings.record_user_agent) {
            fields.push(("userAgent", json_text(user_agent)));
        }
        fields
    }

    /// The client as the request shows it: its address is the peer's, unless the
    /// peer is a trusted proxy, which names it in `X-Forwarded-For` (the last
    /// address not itself a trusted proxy) or `Forwarded` (`for=`).
    pub fn client(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Client {
        let text = |name| header_text(headers, name);
        let peer_ip = peer.map(|peer| peer.ip());
        let ip = match peer_ip {
            Some(ip) if self.is_trusted(ip) => self.forwarded_client(headers).or(Some(ip)),
            other => other,
        };
        let host = text(header::HOST);
        let cross_origin = |origin: &String| {
            let origin_host = origin.split_once("://").map_or(origin.as_str(), |(_, rest)| rest);
            host.as_deref()
                .is_none_or(|host| !origin_host.eq_ignore_ascii_case(host))
        };
        Client {
            origin: text(header::ORIGIN).filter(cross_origin),
            ip,
            user_agent: text(header::USER_AGENT).map(|ua| ua.chars().take(512).collect()),
        }
    }

    /// The scheme and host clients reach breakwater at, for the settings documents:
    /// the request's `Host`, and `https` when the listener has TLS; behind a trusted
    /// proxy, its `X-Forwarded-Proto` and `X-Forwarded-Host`.
    pub fn public_address(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> (String, String) {
        // A proxy chain's headers list hops: the first is the client's.
        let text = |name| {
            header_text(headers, name)
                .map(|value| value.split(',').next().unwrap_or("").trim().to_string())
                .filter(|value| !value.is_empty())
        };
        let proxied = peer.is_some_and(|peer| self.is_trusted(peer.ip()));
        let forwarded = |name| if proxied { text(name) } else { None };
        let scheme = forwarded("x-forwarded-proto").unwrap_or_else(|| self.scheme.to_string());
        let host = forwarded("x-forwarded-host")
            .or_else(|| text("host"))
            .unwrap_or_else(|| "localhost".into());
        (scheme, host)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|range| range.contains(ip))
    }

    /// From the right of the proxies' chain, the first address that is not a
    /// trusted proxy: what the left of it says could be made up by the client.
    fn forwarded_client(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let mut hops: Vec<IpAddr> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(value) = value.to_str() else { continue };
            hops.extend(value.split(',').filter_map(|hop| parse_hop(hop.trim())));
        }
        if hops.is_empty() {
            for value in headers.get_all(header::FORWARDED) {
                let Ok(value) = value.to_str() else { continue };
                for element in value.split(',') {
                    for pair in element.split(';') {
                        if let Some((key, hop)) = pair.trim().split_once('=') {
                            if key.trim().eq_ignore_ascii_case("for") {
                                hops.extend(parse_hop(hop.trim().trim_matches('"')));
                            }
                        }
                    }
                }
            }
        }
        hops.iter().rev().find(|ip| !self.is_trusted(**ip)).copied()
    }

    /// CORS headers for an answer to `origin`, when any source allows it.
    fn cors_headers(&self, origin: &str, headers: &mut HeaderMap) {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
        if !self.any_source.allows(origin) {
            return;
        }
        let allowed = match &self.any_source {
            Origins::Any => HeaderValue::from_static("*"),
            Origins::Only(_) => match HeaderValue::from_str(origin) {
                Ok(value) => value,
                Err(_) => return,
            },
        };
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED_HEADERS),
        );
    }
}

/// The connection's peer address, as the listener recorded it (`ConnectInfo`);
/// `None` when the router is served some other way.
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|info| info.0),
        ))
    }
}

/// A header's value, trimmed; `None` when absent, empty or not text.
fn header_text(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .map(str::to_string)
}

fn json_text(text: &str) -> Vec<u8> {
    serde_json::to_vec(text).expect("a string always serializes")
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`, `::1`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[')?.split(']').next()?.parse().ok()
}

/// The CORS layer on the intake routes: answers preflights (`OPTIONS` with an
/// `Origin`), and adds the CORS headers to every answer to a web page.
pub async fn cors(State(app): State<Arc<IntakeState>>, request: Request, next: Next) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let Some(origin) = origin else {
        return next.run(request).await;
    };
    let policy = &app.browser;
    if request.method() == Method::OPTIONS {
        // Header names only (tokens and commas): echoed as allowed.
        let requested_headers = request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .filter(|value| {
                value
                    .as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b',' | b' '))
            })
            .filter(|value| value.len() <= 1024)
            .cloned();
        if !policy.any_source.allows(&origin) {
            let mut response = IntakeError::origin_not_allowed(&origin).into_response();
            response
                .headers_mut()
                .append(header::VARY, HeaderValue::from_static("Origin"));
            return response;
        }
        let mut response = (StatusCode::NO_CONTENT, Body::empty()).into_response();
        let headers = response.headers_mut();
        policy.cors_headers(&origin, headers);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        let allowed = requested_headers.unwrap_or(HeaderValue::from_static(ALLOWED_HEADERS));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, policy.max_age.clone());
        return response;
    }
    let mut response = next.run(request).await;
    policy.cors_headers(&origin, response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BrowserConfig, SourceConfig};

    fn policy(browser: BrowserConfig, sources: Vec<SourceConfig>) -> BrowserPolicy {
        BrowserPolicy::new(&Config {
            browser,
            sources,
            ..Config::default()
        })
    }

    fn source(name: &str, origins: Option<&[&str]>) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            write_key: Some(format!("key-{name}")),
            allowed_origins: origins.map(|list| list.iter().map(|o| o.to_string()).collect()),
            ..SourceConfig::default()
        }
    }

    fn from(origin: &str) -> Client {
        Client {
            origin: Some(origin.into()),
            ..Client::default()
        }
    }

    #[test]
    fn origins_are_checked_per_source() {
        let policy = policy(
            BrowserConfig::default(),
            vec![
                source("web", Some(&["https://shop.example.com"])),
                source("open", Some(&["*"])),
                source("server", None),
            ],
        );
        assert!(policy.check_origin("web", &from("https://SHOP.example.com")).is_ok());
        assert!(policy.check_origin("web", &from("https://evil.example.com")).is_err());
        assert!(policy.check_origin("open", &from("https://evil.example.com")).is_ok());
        assert!(policy
            .check_origin("server", &from("https://shop.example.com"))
            .is_err());
        assert!(
            policy.check_origin("server", &Client::default()).is_ok(),
            "no Origin: not a page"
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        headers.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        let same_origin = policy.client(&headers, None);
        assert!(
            policy.check_origin("server", &same_origin).is_ok(),
            "a page breakwater serves"
        );
    }

    #[test]
    fn a_forwarded_address_counts_only_from_a_trusted_proxy() {
        let policy = policy(
            BrowserConfig {
                trusted_proxies: vec!["10.0.0.0/8".into()],
                ..BrowserConfig::default()
            },
            Vec::new(),
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.2".parse().unwrap());
        let via_proxy = policy.client(&headers, Some("10.0.0.1:4000".parse().unwrap()));
        assert_eq!(
            via_proxy.ip,
            Some("203.0.113.9".parse().unwrap()),
            "the last untrusted hop"
        );
        let direct = policy.client(&headers, Some("198.51.100.4:4000".parse().unwrap()));
        assert_eq!(
            direct.ip,
            Some("198.51.100.4".parse().unwrap()),
            "a client's own header is ignored"
        );

        let mut headers = HeaderMap::new();
        headers.insert(
            header::FORWARDED,
            "for=\"[2001:db8::1]:443\";proto=https".parse().unwrap(),
        );
        let via_proxy = policy.client(&headers, Some("10.9.9.9:4000".parse().unwrap()));
        assert_eq!(via_proxy.ip, Some("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn the_client_gives_its_fields_only_where_recorded() {
        let quiet = SourceConfig {
            record_client_ip: Some(false),
            record_user_agent: Some(false),
            ..source("quiet", None)
        };
        let policy = policy(BrowserConfig::default(), vec![source("web", None), quiet]);
        let client = Client {
            origin: None,
            ip: Some("203.0.113.9".parse().unwrap()),
            user_agent: Some("Mozilla/5.0".into()),
        };
        let fields = policy.client_fields("web", &client);
        assert_eq!(
            fields,
            vec![
                ("ip", b"\"203.0.113.9\"".to_vec()),
                ("userAgent", b"\"Mozilla/5.0\"".to_vec())
            ]
        );
        assert!(policy.client_fields("quiet", &client).is_empty());
    }
}
