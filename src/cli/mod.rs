//! Command line: `breakwater serve`, `config check`, `policy check`, and the
//! offline operator tools in `admin.rs` (`spool …`, `dlq …`). Flags override
//! `BREAKWATER_*` environment variables, which override the config file.
//!
//! Invariant: the top layer; nothing imports `cli` but `main.rs`.

pub mod admin;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{redact_url, Config, LogFormat, Source, WRITE_KEYS_ENV};
use crate::event::SinkKind;
use crate::pipeline::assemble::{check_timings, resolve_timings};
use crate::policy::LoadedPolicy;

#[derive(Parser)]
#[command(
    name = "breakwater",
    version,
    about = "Resilience-first ingestion server for analytics events (Segment/RudderStack-compatible HTTP API).",
    long_about = "Resilience-first ingestion server for analytics events.\n\n\
        Producers send events with the Segment HTTP Tracking API (existing SDKs work by changing \
        the host). A 200 means every event of the request is durable.\n\n\
        Configuration comes from a TOML file (--config), overridden by environment variables \
        BREAKWATER_<SECTION>__<KEY> (e.g. BREAKWATER_LIMITS__MAX_EVENT_BYTES=65536), overridden \
        by flags. Write keys can also be given as BREAKWATER_WRITE_KEYS=name=key,name2=key2."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server. With no configuration: 127.0.0.1:8080, data under ./data,
    /// local dedup, events in rotating NDJSON files under ./data/events.
    Serve(ServeArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Resilience policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The local spool of events waiting for a sink (offline: stop the server first;
    /// a running server shows it at GET /admin/spool and replays on its own).
    #[command(subcommand)]
    Spool(SpoolCommand),
    /// Dead letters: batches a sink rejected for good, with its error (offline).
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file, or every *.toml in a directory, and print the
    /// effective policy; errors name the file, the key and why.
    Check {
        /// File or directory [default: policies].
        #[arg(default_value = "policies")]
        target: PathBuf,
        /// Also check each policy's timings against this server config, as a
        /// policy edit on a server started with it would be (Redis claims vs the
        /// longest request, ClickHouse's INSERT vs one attempt).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Events, records, bytes and oldest age per sink; dead letters; quarantine.
    Stats(DataArgs),
    /// Deliver everything spooled now, through the configured sinks and policy.
    Replay(DataArgs),
    /// Delete spooled events (they will never be delivered).
    Purge {
        #[command(flatten)]
        data: DataArgs,
        /// Only this sink's queue (file, clickhouse, kafka).
        #[arg(long)]
        sink: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters, a page at a time, oldest first: key, sink, events, when, error.
    List {
        #[command(flatten)]
        data: DataArgs,
        /// Start after this key (the last page's `next`).
        #[arg(long)]
        after: Option<u64>,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter's error and events.
    Show {
        #[command(flatten)]
        data: DataArgs,
        key: u64,
    },
    /// Move dead letters (all, or the given keys) back into their sink's spool.
    Replay {
        #[command(flatten)]
        data: DataArgs,
        keys: Vec<u64>,
        #[arg(long)]
        yes: bool,
    },
    /// Delete dead letters (all, or the given keys).
    Purge {
        #[command(flatten)]
        data: DataArgs,
        keys: Vec<u64>,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct DataArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Data directory [default: from the config, else ./data].
    #[arg(long, env = "BREAKWATER_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Policy file (for spool sizes and replay batch size).
    #[arg(long, env = "BREAKWATER_POLICY", value_name = "FILE")]
    policy: Option<PathBuf>,
}

impl DataArgs {
    fn load(&self) -> Result<Config, String> {
        let mut config = load_config(&self.config)?;
        if let Some(dir) = &self.data_dir {
            config.server.data_dir = dir.clone();
        }
        if let Some(policy) = &self.policy {
            config.server.policy_file = Some(policy.clone());
        }
        Ok(config)
    }
}

fn run_admin(data: &DataArgs, command: impl FnOnce(&Config) -> admin::AdminResult) -> ExitCode {
    let result = data.load().and_then(|config| {
        crate::telemetry::init_logging(config.log.format);
        command(&config)
    });
    finish(result)
}

fn finish(result: admin::AdminResult) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration (file + environment) without starting; print a summary.
    Check(ConfigArgs),
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file; every key is optional.
    #[arg(long, env = "BREAKWATER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Address to listen on [default: 127.0.0.1:8080]. A non-loopback address needs
    /// write keys. Port 0 picks a free port (logged at start).
    #[arg(long, env = "BREAKWATER_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory for the file sink, the rejected store and the lock file [default: ./data].
    #[arg(long, env = "BREAKWATER_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Resilience policy file, reloaded when it changes [default: the embedded
    /// default, identical to policies/default.toml].
    #[arg(long, env = "BREAKWATER_POLICY", value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Log format on stderr [default: text]. Level: BREAKWATER_LOG or RUST_LOG (e.g. debug).
    #[arg(long, env = "BREAKWATER_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

/// The one runtime builder: the server and the offline admin commands alike.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Only workers park: blocking stores check they are not called on one.
        .on_thread_park(crate::threads::mark_runtime_worker)
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn load_config(args: &ConfigArgs) -> Result<Config, String> {
    Config::load(args.config.as_deref(), std::env::vars()).map_err(|e| e.to_string())
}

pub fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Config(ConfigCommand::Check(args)) => check(args),
        Command::Policy(PolicyCommand::Check { target, config }) => finish(policy_check(&target, config)),
        Command::Spool(SpoolCommand::Stats(data)) => run_admin(&data, admin::spool_stats),
        Command::Spool(SpoolCommand::Replay(data)) => run_admin(&data, admin::spool_replay),
        Command::Spool(SpoolCommand::Purge { data, sink, yes }) => {
            run_admin(&data, |config| admin::spool_purge(config, sink.as_deref(), yes))
        }
        Command::Dlq(DlqCommand::List { data, after, limit }) => {
            run_admin(&data, |config| admin::dlq_list(config, after, limit))
        }
        Command::Dlq(DlqCommand::Show { data, key }) => run_admin(&data, |config| admin::dlq_show(config, key)),
        Command::Dlq(DlqCommand::Replay { data, keys, yes }) => run_admin(&data, |config| {
            admin::dlq_apply(config, &keys, admin::DeadLetterAction::Requeue, yes)
        }),
        Command::Dlq(DlqCommand::Purge { data, keys, yes }) => run_admin(&data, |config| {
            admin::dlq_apply(config, &keys, admin::DeadLetterAction::Purge, yes)
        }),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut config = match load_config(&args.config) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(data_dir) = args.data_dir {
        config.server.data_dir = data_dir;
    }
    if let Some(policy) = args.policy {
        config.server.policy_file = Some(policy);
    }
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    crate::telemetry::init_logging(config.log.format);
    // A file-size limit (ulimit -f) then fails the write like a full disk, which
    // the spool survives, instead of killing the process.
    // SAFETY: setting a signal to be ignored, before any thread is started.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::server::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::from(2)
        }
    }
}

/// `policy check`: every policy valid, and, with `--config`, its timings hold for a
/// server started with that config (its own policy resolving what config leaves unset).
fn policy_check(target: &Path, config: Option<PathBuf>) -> Result<(), String> {
    let server = match config {
        None => None,
        Some(path) => {
            let mut config = Config::load(Some(&path), std::env::vars()).map_err(|e| e.to_string())?;
            let started_with = match &config.server.policy_file {
                Some(path) => LoadedPolicy::from_file(path).map_err(|e| e.to_string())?,
                None => LoadedPolicy::embedded(),
            };
            resolve_timings(&mut config, &started_with.policy);
            Some(config)
        }
    };
    admin::policy_check(target, server.as_ref())
}

fn check(args: ConfigArgs) -> ExitCode {
    let result = load_config(&args).and_then(|mut config| {
        let sources = config
            .resolve_sources(std::env::var(WRITE_KEYS_ENV).ok().as_deref())
            .map_err(|e| e.to_string())?;
        let policy = match &config.server.policy_file {
            Some(path) => LoadedPolicy::from_file(path).map_err(|e| e.to_string())?,
            None => LoadedPolicy::embedded(),
        };
        resolve_timings(&mut config, &policy.policy);
        check_timings(&config, &policy.policy).map_err(|e| e.to_string())?;
        config.admin.resolve_token().map_err(|e| e.to_string())?;
        Ok((config, sources))
    });
    match result {
        Ok((config, sources)) => {
            print_summary(&config, &sources);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// What `config check` prints for a valid configuration.
fn print_summary(config: &Config, sources: &[Source]) {
    println!("configuration is valid");
    println!("  listen:            {}", config.server.listen);
    println!("  data_dir:          {}", config.server.data_dir.display());
    println!(
        "  limits:            event {} B, request {} B, batch {} events",
        config.limits.max_event_bytes, config.limits.max_request_bytes, config.limits.max_batch_events
    );
    println!(
        "  dedup:             window {} s, at most {} ids",
        config.dedup.window_seconds, config.dedup.max_entries
    );
    let mut sinks = Vec::new();
    if config.file_sink_enabled() {
        sinks.push(SinkKind::File.name().to_string());
    }
    if let Some(clickhouse) = &config.clickhouse {
        sinks.push(format!(
            "clickhouse ({} {}.{})",
            clickhouse.url, clickhouse.database, clickhouse.table
        ));
    }
    if let Some(kafka) = &config.kafka {
        sinks.push(format!("kafka ({} topic {})", kafka.brokers, kafka.topic));
    }
    println!("  sinks:             {}", sinks.join(", "));
    let admin = match config.admin.resolve_token() {
        Ok(Some(_)) => "/admin/* need the admin token",
        _ => "/admin/* closed (no admin.token)",
    };
    println!("  admin:             {admin}");
    match &config.redis {
        Some(redis) => println!("  shared dedup:      redis ({})", redact_url(&redis.url)),
        None => println!("  shared dedup:      none (in-process only)"),
    }
    let names: Vec<_> = sources.iter().map(|s| s.name.as_str()).collect();
    if names.is_empty() {
        println!("  sources:           none (open mode: loopback listener only)");
    } else {
        println!("  sources:           {}", names.join(", "));
    }
}
