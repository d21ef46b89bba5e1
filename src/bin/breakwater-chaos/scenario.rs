//! A chaos scenario file (`chaos/scenarios/*.toml`): which backends run, the load,
//! the fault timeline and what must hold at the end.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub backends: Backends,
    pub load: Load,
    #[serde(default)]
    pub faults: Vec<Fault>,
    pub expect: Expect,
    /// Policy edits applied to the default policy: `"section.key" = value`.
    #[serde(default)]
    pub policy: std::collections::BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    #[serde(default)]
    pub redis: bool,
    #[serde(default)]
    pub clickhouse: bool,
    #[serde(default)]
    pub kafka: bool,
    /// Put a TCP fault proxy between breakwater and ClickHouse (for slow, reset,
    /// blackhole faults).
    #[serde(default)]
    pub clickhouse_proxy: bool,
    /// The file sink on beside the others (its NDJSON files are checked too).
    #[serde(default)]
    pub file: bool,
    /// `acknowledge` for ClickHouse and Kafka: "on_delivery" (default) or "on_spool".
    #[serde(default)]
    pub acknowledge: Option<String>,
    /// breakwater instances sharing the backends (default 1). Each writer sends to
    /// one and resends a failed request to the next, as a balancer would; faults
    /// aimed at `breakwater` hit the first.
    #[serde(default = "one_instance")]
    pub instances: usize,
}

fn one_instance() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Requests (HTTP batches or WebSocket frames) per second, over all writers.
    pub requests_per_second: u32,
    pub batch_size: usize,
    /// Share of requests sent as WebSocket frames (0.0 to 1.0).
    pub websocket_share: f64,
    pub duration_seconds: f64,
    #[serde(default = "default_writers")]
    pub writers: usize,
    /// Random hex added to each event (`properties.padding`): bytes that spool
    /// compression cannot shrink, for scenarios that must fill a spool.
    #[serde(default)]
    pub event_padding_bytes: usize,
}

fn default_writers() -> usize {
    4
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Redis,
    Clickhouse,
    Kafka,
    Breakwater,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// SIGSTOP for `duration_seconds`, then SIGCONT.
    Freeze,
    /// SIGKILL; restarted after `duration_seconds` (if given).
    Kill,
    /// ClickHouse only: the table is renamed away for `duration_seconds` (server errors), then back.
    Error,
    /// Through the fault proxy: every answer delayed (~700 ms).
    Slow,
    /// Through the fault proxy: no data flows; connections hang.
    Blackhole,
    /// Through the fault proxy: every connection closed as soon as data flows.
    Reset,
    /// breakwater only: SIGTERM (a graceful stop); restarted after `duration_seconds`.
    Terminate,
    /// breakwater only: its disk is full for `duration_seconds` (RLIMIT_FSIZE at the
    /// spool file's size: writes that would grow a file fail, as on a full disk).
    DiskFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub at_seconds: f64,
    pub action: Action,
    pub target: Target,
    #[serde(default)]
    pub duration_seconds: Option<f64>,
    /// Repeat the fault this many times, `every_seconds` apart (a flapping backend).
    #[serde(default)]
    pub repeat: Option<u32>,
    #[serde(default)]
    pub every_seconds: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Every acknowledged event exactly once in each configured sink.
    pub exactly_once: bool,
    /// Most refused requests (503/429 or nack) allowed; None: any number.
    #[serde(default)]
    pub max_refused: Option<u64>,
    /// At least this many refused requests (e.g. a spool-full scenario must push back).
    #[serde(default)]
    pub min_refused: Option<u64>,
    /// Most breaker outages (closed → open … → closed again): a flapping backend
    /// must not make a breaker thrash. Reopenings after failed half-open probes
    /// within one outage are paced by `open_ms` and not counted here.
    #[serde(default)]
    pub max_breaker_outages: Option<u64>,
}

impl Scenario {
    pub fn load(path: &std::path::Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Scales every time in the scenario (for the short CI run).
    pub fn scaled(mut self, factor: f64) -> Scenario {
        self.load.duration_seconds *= factor;
        for fault in &mut self.faults {
            fault.at_seconds *= factor;
            fault.duration_seconds = fault.duration_seconds.map(|d| d * factor);
            fault.every_seconds = fault.every_seconds.map(|d| d * factor);
        }
        self
    }
}
