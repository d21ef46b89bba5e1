//! breakwater: a resilience-first ingestion server for analytics events.
//!
//! Modules in layer order, bottom to top. A module imports only from layers below
//! its own (`tests/modules_import_only_downward.rs` checks every `use crate::`):
//!
//! 1. shared types: `event` (the event model, `SinkKind`), `clock`, `threads`
//!    (blocking calls stay off runtime workers), `config`,
//!    `telemetry`, `policy`;
//! 2. generic machinery: `resilience` (tower stacks for any dependency),
//!    `batcher` (group commit, generic over its error);
//! 3. stages: `sinks`, `spool`, `dedup` (none imports another);
//! 4. `pipeline`: dedup → every sink through its stack, else its spool, else the
//!    dead-letter table; the replayer; assembly from config and policy;
//! 5. `intake`: HTTP and WebSocket, holding only its own part of the state;
//! 6. `server`: the composition root (nothing but `cli` imports it);
//! 7. `cli`: the command line and the offline operator tools.
//!
//! See ARCHITECTURE.md for the map.

pub mod event;
pub mod clock;
pub mod threads;
pub mod config;
pub mod telemetry;
pub mod policy;
pub mod resilience;
pub mod batcher;
pub mod sinks;
pub mod spool;
pub mod dedup;
pub mod pipeline;
pub mod intake;
pub mod server;
pub mod cli;
