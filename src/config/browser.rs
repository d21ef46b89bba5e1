//! What browsers need from intake: which web origins may send (CORS), what is
//! recorded of the client (its IP, its User-Agent), and which proxies are trusted
//! to name the client. `[browser]` holds the defaults; each `[[sources]]` may set
//! its own `allowed_origins`, `record_client_ip` and `record_user_agent`.

use std::net::IpAddr;

use serde::Deserialize;

use super::{invalid, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrowserConfig {
    /// Web page origins allowed to send (CORS) for sources without their own list:
    /// `"https://shop.example.com"` (scheme, host and port, no path) or `"*"`.
    /// Empty: none — a request from a web page on another origin gets `403
    /// origin_not_allowed`; clients that send no `Origin` (servers) are unaffected.
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer (`Access-Control-Max-Age`).
    pub cors_max_age_seconds: u64,
    /// Set `context.ip` from the client's address when the event carries none.
    pub record_client_ip: bool,
    /// Set `context.userAgent` from the request's `User-Agent` when the event
    /// carries none.
    pub record_user_agent: bool,
    /// Peers whose `X-Forwarded-For` / `Forwarded` header names the client (load
    /// balancers, reverse proxies): addresses or CIDR ranges. Others' headers are
    /// ignored (a client could name any address).
    pub trusted_proxies: Vec<String>,
}

impl Default for BrowserConfig {
    fn default() -> Self {
        BrowserConfig {
            allowed_origins: Vec::new(),
            cors_max_age_seconds: 600,
            record_client_ip: true,
            record_user_agent: true,
            trusted_proxies: Vec::new(),
        }
    }
}

/// An address range: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    pub address: IpAddr,
    pub prefix: u8,
}

impl IpRange {
    /// `10.0.0.0/8`, `::1`, `192.168.1.7`.
    pub fn parse(text: &str) -> Option<IpRange> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address.parse::<IpAddr>().ok()?, Some(prefix.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(IpRange { address, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.address, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        let (range, ip, bits) = match (self.address, ip) {
            (IpAddr::V4(range), IpAddr::V4(ip)) => (u128::from(range.to_bits()), u128::from(ip.to_bits()), 32),
            (IpAddr::V6(range), IpAddr::V6(ip)) => (range.to_bits(), ip.to_bits(), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (range >> shift) == (ip >> shift)
    }
}

/// Checks one list of origins, naming `key` in the error.
pub(super) fn validate_origins(key: &str, origins: &[String]) -> Result<(), ConfigError> {
    for origin in origins {
        if origin == "*" {
            continue;
        }
        let well_formed = origin.split_once("://").is_some_and(|(scheme, rest)| {
            matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/')
        });
        if !well_formed {
            return Err(invalid(
                key,
                format!(
                    "`{origin}` is not an origin: give scheme://host[:port] (no path, no trailing slash), or \"*\""
                ),
            ));
        }
    }
    Ok(())
}

impl BrowserConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        validate_origins("browser.allowed_origins", &self.allowed_origins)?;
        for proxy in &self.trusted_proxies {
            if IpRange::parse(proxy).is_none() {
                return Err(invalid(
                    "browser.trusted_proxies",
                    format!("`{proxy}` is not an address or CIDR range (e.g. 10.0.0.0/8, ::1)"),
                ));
            }
        }
        Ok(())
    }

    pub fn trusted_proxy_ranges(&self) -> Vec<IpRange> {
        self.trusted_proxies.iter().filter_map(|p| IpRange::parse(p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_their_addresses_only() {
        let range = IpRange::parse("10.1.0.0/16").unwrap();
        assert!(range.contains("10.1.200.3".parse().unwrap()));
        assert!(!range.contains("10.2.0.1".parse().unwrap()));
        assert!(range.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped");
        let one = IpRange::parse("::1").unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        assert!(IpRange::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(IpRange::parse("10.0.0.0/33").is_none());
        assert!(IpRange::parse("not an address").is_none());
    }

    #[test]
    fn origins_are_checked() {
        let ok = [
            "*".to_string(),
            "https://shop.example.com".into(),
            "http://127.0.0.1:3000".into(),
        ];
        assert!(validate_origins("k", &ok).is_ok());
        for bad in ["shop.example.com", "https://shop.example.com/", "ftp://x", "https://"] {
            let error = validate_origins("browser.allowed_origins", &[bad.to_string()]).unwrap_err();
            assert!(error.to_string().contains("browser.allowed_origins"), "{error}");
        }
    }
}
