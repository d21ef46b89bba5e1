//! breakwater: a resilience-first ingestion server for analytics events.
//!
//! Data flow, one module per stage: `intake` (HTTP, decode, auth, validate) →
//! `dedup` → `pipeline` → `sinks`. `server` wires them at start-up; `config` and
//! `telemetry` serve all of them. See ARCHITECTURE.md for the map.

pub mod admin;
pub mod cli;
pub mod config;
pub mod dedup;
pub mod intake;
pub mod pipeline;
pub mod policy;
pub mod resilience;
pub mod server;
pub mod sinks;
pub mod spool;
pub mod telemetry;
