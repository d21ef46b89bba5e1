//! The composition root: start-up, the shared `AppState`, the router, the listener
//! and graceful shutdown. Builds every long-lived part once (dedup, sinks, spool,
//! stores, metrics) and wires them together; holds no request logic of its own.
//! `state.rs` is the state and router, `ops.rs` the operator endpoints,
//! `connections.rs` the accept loop, `shutdown.rs` the stop order, `series.rs`
//! the metric series registered at start-up, `data_dir.rs` the data directory lock.
//!
//! Invariant: nothing but `cli` imports `server`; nothing below it names `AppState`.

mod admin;
mod connections;
mod data_dir;
mod ops;
mod series;
mod shutdown;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{redact_url, Config, ConfigError, Source, WRITE_KEYS_ENV};
use crate::dedup::redis::RedisDedup;
use crate::dedup::{DedupKey, LocalDedup};
use crate::intake::auth::WriteKeys;
use crate::intake::browser::BrowserPolicy;
use crate::intake::rate_limit::SourceRateLimits;
use crate::intake::rejected_store::RejectedStore;
use crate::intake::websocket::ConnectionRegistry;
use crate::intake::{InFlightLimit, IntakeState};
use crate::pipeline::assemble::{
    build_delivery, check_timings, resolve_timings, AssembleError, Delivery, PolicyApplier,
};
use crate::pipeline::budget::{default_budget_bytes, MemoryBudget};
use crate::pipeline::replay::Replayer;
use crate::pipeline::{Pipeline, SinkRoute};
use crate::policy::{reload, LoadedPolicy, Policy, PolicyError};
use crate::resilience;
use crate::sinks::file::RecoveredEvent;
use crate::spool::Spool;
use crate::telemetry::{self, metric};
use admin::AdminToken;
use connections::ListenerSettings;
pub use data_dir::lock_data_dir;
use shutdown::Shutdown;
pub use state::{router, AppState};

/// Why the server could not start. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "refusing to listen on {0} without write keys: anyone who can reach it could send events. \
         Configure [[sources]] with a write_key in the config file, or set {WRITE_KEYS_ENV}=name=key, \
         or listen on a loopback address such as 127.0.0.1:8080"
    )]
    OpenOnNonLoopback(SocketAddr),
    #[error("cannot use data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("data directory {0} is in use by another breakwater process (lock file held); give each instance its own --data-dir")]
    DataDirLocked(PathBuf),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
    #[error("{0}")]
    Backend(String),
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// Runs the server until SIGINT/SIGTERM, then drains and returns.
pub async fn serve(config: Config) -> Result<(), StartupError> {
    Server::start(config).await?.run().await
}

/// A started server: every part built, the listener bound.
struct Server {
    /// Everything handlers share.
    state: Arc<AppState>,
    listener: TcpListener,
    listener_settings: ListenerSettings,
    /// Replayers and the policy applier: they run until shutdown, then stop.
    maintenance: Vec<JoinHandle<()>>,
    /// Tells them to stop (replayers between rounds).
    stop_maintenance: CancellationToken,
    /// The sinks' own tasks (batchers, Kafka watchers), awaited last.
    sink_tasks: Vec<JoinHandle<()>>,
    /// How long each shutdown step may take.
    shutdown_timeout: Duration,
    /// `<data_dir>/breakwater.lock`, held for the process's life.
    _lock: std::fs::File,
}

/// The resilience policy in force and its change feed.
type PolicyFeed = watch::Receiver<Arc<LoadedPolicy>>;

impl Server {
    /// Builds every part in order; any failure is a clear `StartupError`.
    async fn start(mut config: Config) -> Result<Server, StartupError> {
        let sources = check_sources(&config)?;
        let lock = prepare_data_dir(&config)?;
        let metrics = telemetry::install_metrics().map_err(StartupError::Metrics)?;
        let dedup = Arc::new(local_dedup(&config));
        let policy = load_policy(&config)?;
        let current = policy.borrow().clone();
        resolve_timings(&mut config, &current.policy);
        check_timings(&config, &current.policy)?;
        let delivery = build_sinks(&config, &current.policy, &dedup)?;
        let shared_dedup = connect_shared_dedup(&config, &current.policy).await?;
        let Delivery {
            routes,
            spool,
            background: sink_tasks,
            batch_limits,
        } = delivery;
        let applier = PolicyApplier {
            config: config.clone(),
            policy: policy.clone(),
            routes: routes.clone(),
            spool: spool.clone(),
            redis: shared_dedup.clone(),
            batch_limits,
        };
        let stop_maintenance = CancellationToken::new();
        let budget = memory_budget(&config);
        let maintenance = start_maintenance(&routes, &spool, &policy, applier, &budget, &stop_maintenance);
        metrics::gauge!(metric::DEDUP_ENTRIES).set(dedup.len() as f64);
        tracing::info!(
            sinks = routes.iter().map(|r| r.kind.name()).collect::<Vec<_>>().join(","),
            shared_dedup = shared_dedup.is_some(),
            spool = %spool.path().display(),
            "pipeline built"
        );
        let write_keys = WriteKeys::new(&sources);
        series::preregister(&routes, shared_dedup.is_some(), &write_keys.source_names());
        let pipeline = Pipeline::new(dedup, shared_dedup.clone(), routes, spool);
        let intake = build_intake(&config, write_keys, pipeline, budget)?;
        let state = Arc::new(AppState {
            intake,
            redis_health: shared_dedup.as_ref().map(|redis| redis.health()),
            redis_breaker: shared_dedup.map(|redis| Arc::new(move || redis.breaker()) as resilience::BreakerState),
            policy,
            metrics,
            admin_token: config.admin.resolve_token()?.as_deref().map(AdminToken::new),
        });
        let (listener, listener_settings) = bind(&config, sources.len()).await?;
        Ok(Server {
            state,
            listener,
            listener_settings,
            maintenance,
            stop_maintenance,
            sink_tasks,
            shutdown_timeout: Duration::from_millis(config.server.shutdown_timeout_ms),
            _lock: lock,
        })
    }

    /// Serves until a stop signal, then shuts down in order (`shutdown.rs`).
    async fn run(self) -> Result<(), StartupError> {
        let shutdown = Shutdown::listen(self.state.intake.clone(), self.shutdown_timeout);
        let serving = connections::serve(
            self.listener,
            router(self.state.clone()),
            self.listener_settings,
            shutdown.stop_signal(),
        );
        shutdown.finish_serving(serving).await;
        let intake = self.state.intake.clone();
        // Handlers hold the state; once it is gone only the sinks' tasks remain.
        drop(self.state);
        shutdown
            .drain(intake, self.maintenance, self.stop_maintenance, self.sink_tasks)
            .await;
        tracing::info!("breakwater stopped");
        Ok(())
    }
}

/// Background work that runs until shutdown: a replayer per sink, and the policy
/// applier.
fn start_maintenance(
    routes: &[SinkRoute],
    spool: &Arc<Spool>,
    policy: &PolicyFeed,
    applier: PolicyApplier,
    budget: &MemoryBudget,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let mut maintenance: Vec<JoinHandle<()>> = routes
        .iter()
        .map(|route| {
            let replayer = Replayer::new(spool.clone(), route, policy.clone(), budget.clone(), stop.clone());
            tokio::spawn(replayer.run())
        })
        .collect();
    let stop = stop.clone();
    maintenance.push(tokio::spawn(async move {
        stop.run_until_cancelled(applier.run()).await;
    }));
    maintenance
}

/// The sinks, spool and stacks; the file sink's recent ids refill `dedup` (see
/// `build_delivery` for when).
fn build_sinks(config: &Config, policy: &Policy, dedup: &LocalDedup) -> Result<Delivery, StartupError> {
    let mut refill = |event: RecoveredEvent<'_>| {
        dedup.restore(
            DedupKey::new(event.source, event.message_id),
            event.received_at_unix_seconds,
        )
    };
    Ok(build_delivery(
        config,
        policy,
        &config.server.data_dir,
        Some(&mut refill),
    )?)
}

/// Dedup shared through Redis, when configured (it connects in the background).
/// Connects shared dedup; a Redis that answers at start-up and is too old for it
/// is refused (one that does not answer is not waited for).
async fn connect_shared_dedup(config: &Config, policy: &Policy) -> Result<Option<Arc<RedisDedup>>, StartupError> {
    let Some(redis) = &config.redis else {
        return Ok(None);
    };
    let dedup = RedisDedup::connect(redis, &policy.redis).map_err(StartupError::Backend)?;
    let wait = Duration::from_millis(redis.connect_timeout_ms).min(Duration::from_secs(2));
    dedup
        .check_server(wait)
        .await
        .map_err(|why| StartupError::Backend(format!("redis.url {}: {why}", redact_url(&redis.url))))?;
    Ok(Some(Arc::new(dedup)))
}

/// The sources with their keys; an open server only on loopback.
fn check_sources(config: &Config) -> Result<Vec<Source>, StartupError> {
    let sources = config.resolve_sources(std::env::var(WRITE_KEYS_ENV).ok().as_deref())?;
    let listen = config.server.listen;
    if sources.is_empty() && !listen.ip().is_loopback() {
        return Err(StartupError::OpenOnNonLoopback(listen));
    }
    Ok(sources)
}

/// Creates the data directory and takes its lock.
fn prepare_data_dir(config: &Config) -> Result<std::fs::File, StartupError> {
    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| StartupError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    lock_data_dir(data_dir)
}

/// The in-process seen-set: the only dedup on the embedded default, the local
/// cache in front of Redis otherwise.
fn local_dedup(config: &Config) -> LocalDedup {
    let window = Duration::from_secs(config.dedup.window_seconds);
    let entries = match &config.redis {
        Some(redis) => redis.local_cache_entries,
        None => config.dedup.max_entries,
    };
    LocalDedup::new(window, entries)
}

/// The policy in force, reloaded on change when it comes from a file.
fn load_policy(config: &Config) -> Result<PolicyFeed, StartupError> {
    let loaded = match &config.server.policy_file {
        Some(path) => LoadedPolicy::from_file(path)?,
        None => LoadedPolicy::embedded(),
    };
    tracing::info!(
        version = loaded.policy.version,
        hash = loaded.hash,
        file = loaded
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<embedded default>".into()),
        "policy loaded"
    );
    Ok(match &config.server.policy_file {
        Some(path) => reload::watch_file(path.clone(), loaded),
        None => watch::channel(Arc::new(loaded)).1,
    })
}

/// Intake's own state: keys, rate limits, the rejected store, limits.
/// The memory budget: from config, or derived from the machine; said at start-up.
fn memory_budget(config: &Config) -> MemoryBudget {
    let (bytes, from) = match config.server.memory_budget_bytes {
        Some(bytes) => (bytes, "server.memory_budget_bytes"),
        None => (
            default_budget_bytes(),
            "a quarter of the machine's memory, within 256 MiB-4 GiB",
        ),
    };
    tracing::info!(bytes, from, "memory budget for requests, frames and replay rounds");
    MemoryBudget::new(bytes)
}

fn build_intake(
    config: &Config,
    write_keys: WriteKeys,
    pipeline: Pipeline,
    budget: MemoryBudget,
) -> Result<Arc<IntakeState>, StartupError> {
    let data_dir = &config.server.data_dir;
    let rejected_store =
        RejectedStore::open(&data_dir.join("rejected"), config.rejected_store.max_bytes).map_err(|source| {
            StartupError::DataDir {
                path: data_dir.clone(),
                source,
            }
        })?;
    if write_keys.is_open() {
        tracing::warn!("no write keys configured: accepting unauthenticated events (loopback only)");
    }
    let source_names = write_keys.source_names();
    let source_rate_limits =
        SourceRateLimits::new(&config.limits, &config.sources, source_names.iter().map(|name| &**name));
    Ok(Arc::new(IntakeState {
        limits: config.limits.clone(),
        body_read_timeout: Duration::from_millis(config.server.body_read_timeout_ms),
        write_keys,
        source_rate_limits,
        pipeline,
        budget,
        rejected_store: Arc::new(rejected_store),
        in_flight: InFlightLimit::new(config.server.max_in_flight_requests),
        body_key_in_flight: InFlightLimit::unmetered(config.server.max_body_key_requests),
        websocket: config.websocket.clone(),
        browser: BrowserPolicy::new(config),
        websockets: ConnectionRegistry::new(config.websocket.max_connections),
        shutting_down: AtomicBool::new(false),
    }))
}

/// Binds the listener (with TLS when configured).
async fn bind(config: &Config, sources: usize) -> Result<(TcpListener, ListenerSettings), StartupError> {
    let tls = match &config.server.tls {
        Some(tls) => Some(connections::load_tls(&tls.cert_file, &tls.key_file).map_err(StartupError::Tls)?),
        None => None,
    };
    let listen = config.server.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartupError::Bind { addr: listen, source })?;
    let bound = listener.local_addr().map_err(StartupError::Serve)?;
    tracing::info!(
        addr = %bound,
        tls = tls.is_some(),
        data_dir = %config.server.data_dir.display(),
        sources,
        version = env!("CARGO_PKG_VERSION"),
        "breakwater listening"
    );
    let settings = ListenerSettings {
        max_connections: config.server.max_connections,
        header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
        tls,
    };
    warn_if_file_descriptors_are_short(settings.max_connections);
    Ok((listener, settings))
}

/// Each connection takes a file descriptor, and so do the data files and backend
/// connections: below the limit, accept fails for everyone instead of a clear 503.
fn warn_if_file_descriptors_are_short(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let needed = max_connections as u64 + 256;
    if limit.rlim_cur < needed {
        tracing::warn!(
            open_files_limit = limit.rlim_cur,
            max_connections,
            "the open-files limit (ulimit -n) is below server.max_connections + 256: raise it, or lower max_connections"
        );
    }
}
