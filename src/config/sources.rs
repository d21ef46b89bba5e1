//! Sources: the producers allowed to send, each with its write key (inline, from
//! an environment variable or from a file), plus those listed in
//! `BREAKWATER_WRITE_KEYS`.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, Config, ConfigError, WRITE_KEYS_ENV};

/// One producer. The key may be given inline, read from an environment variable,
/// or read from a file (so it need not sit in the config file).
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub name: String,
    pub write_key: Option<String>,
    pub write_key_env: Option<String>,
    pub write_key_file: Option<PathBuf>,
    /// This source's limit (events per second; 0 = unlimited), instead of
    /// `limits.source_events_per_second`.
    pub events_per_second: Option<u64>,
    /// This source's burst, instead of `limits.source_burst_events`.
    pub burst_events: Option<u64>,
    /// Web origins allowed to send for this source, instead of
    /// `browser.allowed_origins`.
    pub allowed_origins: Option<Vec<String>>,
    /// Instead of `browser.record_client_ip`.
    pub record_client_ip: Option<bool>,
    /// Instead of `browser.record_user_agent`.
    pub record_user_agent: Option<bool>,
}

impl std::fmt::Debug for SourceConfig {
    // Never print a key, even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("name", &self.name)
            .field("write_key", &self.write_key.as_ref().map(|_| "<redacted>"))
            .field("write_key_env", &self.write_key_env)
            .field("write_key_file", &self.write_key_file)
            .finish()
    }
}

/// A source with its key resolved.
#[derive(Clone)]
pub struct Source {
    pub name: String,
    pub write_key: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What can be checked before keys are resolved: a name, and exactly one origin
/// of the key. (Names and keys are checked for repeats once, when resolved.)
pub(super) fn validate(sources: &[SourceConfig]) -> Result<(), ConfigError> {
    for (index, source) in sources.iter().enumerate() {
        if source.name.trim().is_empty() {
            return Err(invalid(format!("sources[{index}].name"), "must not be empty"));
        }
        let given = [
            source.write_key.is_some(),
            source.write_key_env.is_some(),
            source.write_key_file.is_some(),
        ];
        if let Some(origins) = &source.allowed_origins {
            super::browser::validate_origins(&format!("sources[{index}].allowed_origins"), origins)?;
        }
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(invalid(
                format!("sources[{index}]"),
                "give exactly one of write_key, write_key_env, write_key_file",
            ));
        }
    }
    Ok(())
}

impl Config {
    /// Resolves every source's key (from the config, an env var or a file), adding
    /// the sources listed in `BREAKWATER_WRITE_KEYS`; refuses a name or a key used
    /// twice.
    pub fn resolve_sources(&self, write_keys_env: Option<&str>) -> Result<Vec<Source>, ConfigError> {
        let mut sources = Vec::new();
        for (index, source) in self.sources.iter().enumerate() {
            sources.push(Source {
                name: source.name.clone(),
                write_key: resolve_key(index, source)?,
            });
        }
        if let Some(list) = write_keys_env {
            sources.extend(parse_write_keys_env(list)?);
        }
        check_unique(&sources)?;
        Ok(sources)
    }
}

/// A configured source's key, from wherever it is given.
fn resolve_key(index: usize, source: &SourceConfig) -> Result<String, ConfigError> {
    if let Some(key) = &source.write_key {
        return Ok(key.clone());
    }
    if let Some(var) = &source.write_key_env {
        return std::env::var(var).map_err(|_| {
            invalid(
                format!("sources[{index}].write_key_env"),
                format!("environment variable {var} is not set"),
            )
        });
    }
    let Some(file) = &source.write_key_file else {
        unreachable!("validate() demands exactly one key origin")
    };
    std::fs::read_to_string(file)
        .map(|key| key.trim().to_string())
        .map_err(|e| {
            invalid(
                format!("sources[{index}].write_key_file"),
                format!("cannot read {}: {e}", file.display()),
            )
        })
}

/// `web=KEY1,ios=KEY2` as sources.
fn parse_write_keys_env(list: &str) -> Result<Vec<Source>, ConfigError> {
    let mut sources = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((name, key)) = entry.split_once('=') else {
            return Err(invalid(
                WRITE_KEYS_ENV,
                "expected comma-separated name=key pairs, e.g. web=KEY1,ios=KEY2",
            ));
        };
        sources.push(Source {
            name: name.trim().to_string(),
            write_key: key.trim().to_string(),
        });
    }
    Ok(sources)
}

/// The one check that names and keys are not empty and not used twice.
fn check_unique(sources: &[Source]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    for source in sources {
        if source.name.is_empty() || source.write_key.is_empty() {
            return Err(invalid(
                format!("source `{}`", source.name),
                "name and write key must not be empty",
            ));
        }
        if !names.insert(source.name.as_str()) {
            return Err(invalid(
                format!("source `{}`", source.name),
                "this source name is defined twice",
            ));
        }
        if !keys.insert(source.write_key.as_str()) {
            return Err(invalid(
                format!("source `{}`", source.name),
                "its write key is also used by another source",
            ));
        }
    }
    Ok(())
}
