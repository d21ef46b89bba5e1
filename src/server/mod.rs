//! Start-up, the shared `AppState`, the router and graceful shutdown. Builds every
//! long-lived part once (dedup, sinks, stores, metrics) and wires them together;
//! holds no request logic of its own.

mod connections;
mod ops;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::Uri;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::config::{Config, ConfigError, LimitsConfig, WebSocketConfig, WRITE_KEYS_ENV};
use crate::dedup::redis::RedisDedup;
use crate::dedup::{DedupKey, LocalDedup};
use crate::intake::auth::WriteKeys;
use crate::intake::error::IntakeError;
use crate::intake::rejected_store::RejectedStore;
use crate::intake::websocket::ConnectionRegistry;
use crate::pipeline::Pipeline;
use crate::pipeline::SinkRoute;
use crate::policy::{reload, BatchPolicy, CallPolicy, LoadedPolicy, Policy, PolicyError, SinkPolicy};
use crate::resilience::{self, ResilientSink};
use crate::sinks::batcher::BatchLimits;
use crate::sinks::clickhouse::ClickHouseSink;
use crate::sinks::file::{self, FileSink};
use crate::sinks::kafka::KafkaSink;
use crate::sinks::{DependencyHealth, NamedSink};
use crate::spool::{replay, Spool, SpoolError};
use crate::telemetry::{self, metric};

/// Everything handlers share, built once at start-up.
pub struct AppState {
    pub limits: LimitsConfig,
    pub body_read_timeout: Duration,
    pub write_keys: WriteKeys,
    pub source_rate_limits: crate::intake::rate_limit::SourceRateLimits,
    pub pipeline: Pipeline,
    /// Present when dedup is shared through Redis.
    pub redis_health: Option<Arc<DependencyHealth>>,
    /// Reads the Redis breaker's state, when dedup is shared through Redis.
    pub redis_breaker: Option<resilience::BreakerState>,
    /// The resilience policy in force.
    pub policy: watch::Receiver<Arc<LoadedPolicy>>,
    pub rejected_store: Arc<RejectedStore>,
    pub in_flight: InFlightLimit,
    pub websocket: WebSocketConfig,
    /// Live WebSocket connections.
    pub websockets: Arc<ConnectionRegistry>,
    pub metrics: PrometheusHandle,
    pub shutting_down: AtomicBool,
}

/// Caps requests processed at once; past the cap a request is refused with 503
/// straight away rather than queued (queues hide overload until memory runs out).
pub struct InFlightLimit {
    current: AtomicUsize,
    max: usize,
}

/// Held for the duration of one request.
pub struct InFlightGuard<'a>(&'a InFlightLimit);

impl InFlightLimit {
    pub fn new(max: usize) -> Self {
        Self {
            current: AtomicUsize::new(0),
            max,
        }
    }

    pub fn enter(&self) -> Result<InFlightGuard<'_>, IntakeError> {
        let previous = self.current.fetch_add(1, Ordering::AcqRel);
        let guard = InFlightGuard(self);
        if previous >= self.max {
            return Err(IntakeError::Overloaded);
        }
        metrics::gauge!(metric::REQUESTS_IN_FLIGHT).increment(1.0);
        Ok(guard)
    }

    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed).min(self.max)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let previous = self.0.current.fetch_sub(1, Ordering::AcqRel);
        if previous <= self.0.max {
            metrics::gauge!(metric::REQUESTS_IN_FLIGHT).decrement(1.0);
        }
    }
}

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
    #[error("cannot open the spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// Runs the server until SIGINT/SIGTERM, then drains and returns.
pub async fn serve(config: Config) -> Result<(), StartupError> {
    let sources = config.resolve_sources(std::env::var(WRITE_KEYS_ENV).ok().as_deref())?;
    let listen = config.server.listen;
    if sources.is_empty() && !listen.ip().is_loopback() {
        return Err(StartupError::OpenOnNonLoopback(listen));
    }
    let data_dir = config.server.data_dir.clone();
    let data_dir_error = |source| StartupError::DataDir {
        path: data_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&data_dir).map_err(data_dir_error)?;
    let _lock = lock_data_dir(&data_dir)?;
    let metrics = telemetry::install_metrics().map_err(StartupError::Metrics)?;

    let window = Duration::from_secs(config.dedup.window_seconds);
    let local_entries = match &config.redis {
        Some(redis) => redis.local_cache_entries,
        None => config.dedup.max_entries,
    };
    let dedup = Arc::new(LocalDedup::new(window, local_entries));

    // The policy in force, reloaded on change when it comes from a file.
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
    let policy = match &config.server.policy_file {
        Some(path) => reload::watch_file(path.clone(), loaded),
        None => watch::channel(Arc::new(loaded)).1,
    };
    let current = policy.borrow().clone();

    let Delivery {
        routes,
        spool,
        background,
        batch_limits,
    } = build_delivery(&config, &current.policy, &data_dir, |event| {
        dedup.restore(
            DedupKey::new(event.source, event.message_id),
            event.received_at_unix_seconds,
        )
    })?;
    // Background work that runs until shutdown: replayers and the policy applier.
    let mut maintenance = Vec::new();
    for route in &routes {
        maintenance.push(tokio::spawn(replay::run(
            spool.clone(),
            route.queue.clone(),
            route.sink.clone(),
            policy.clone(),
            replay::Pace::of(route.acknowledge),
        )));
    }

    let shared_dedup = match &config.redis {
        Some(redis) => Some(Arc::new(
            RedisDedup::connect(redis, &current.policy.redis).map_err(StartupError::Backend)?,
        )),
        None => None,
    };
    maintenance.push(tokio::spawn(apply_policy_changes(
        config.clone(),
        policy.clone(),
        routes.clone(),
        shared_dedup.clone(),
        batch_limits,
    )));
    metrics::gauge!(metric::DEDUP_ENTRIES).set(dedup.len() as f64);
    let write_keys = WriteKeys::new(&sources);
    let source_names = write_keys.source_names();
    preregister_series(&routes, shared_dedup.is_some(), &source_names);
    tracing::info!(
        sinks = routes.iter().map(|r| r.sink.name).collect::<Vec<_>>().join(","),
        shared_dedup = shared_dedup.is_some(),
        spool = %spool.path().display(),
        "pipeline built"
    );
    let rejected_store =
        RejectedStore::open(&data_dir.join("rejected"), config.rejected_store.max_bytes).map_err(data_dir_error)?;

    if write_keys.is_open() {
        tracing::warn!("no write keys configured: accepting unauthenticated events (loopback only)");
    }
    let source_rate_limits = crate::intake::rate_limit::SourceRateLimits::new(
        &config.limits,
        &config.sources,
        source_names.iter().map(|name| &**name),
    );
    let state = Arc::new(AppState {
        source_rate_limits,
        limits: config.limits.clone(),
        body_read_timeout: Duration::from_millis(config.server.body_read_timeout_ms),
        write_keys,
        redis_health: shared_dedup.as_ref().map(|redis| redis.health()),
        redis_breaker: shared_dedup.as_ref().map(|redis| {
            let redis = redis.clone();
            Arc::new(move || redis.breaker()) as resilience::BreakerState
        }),
        pipeline: Pipeline::new(dedup, shared_dedup, routes, spool),
        policy,
        rejected_store: Arc::new(rejected_store),
        in_flight: InFlightLimit::new(config.server.max_in_flight_requests),
        websocket: config.websocket.clone(),
        websockets: ConnectionRegistry::new(config.websocket.max_connections),
        metrics,
        shutting_down: AtomicBool::new(false),
    });

    let tls = match &config.server.tls {
        Some(tls) => Some(connections::load_tls(&tls.cert_file, &tls.key_file).map_err(StartupError::Tls)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| StartupError::Bind { addr: listen, source })?;
    let bound = listener.local_addr().map_err(StartupError::Serve)?;
    tracing::info!(
        addr = %bound,
        tls = tls.is_some(),
        data_dir = %data_dir.display(),
        sources = sources.len(),
        version = env!("CARGO_PKG_VERSION"),
        "breakwater listening"
    );

    let (stop_sender, stop) = watch::channel(false);
    {
        let state = state.clone();
        tokio::spawn(async move {
            wait_for_stop_signal().await;
            state.shutting_down.store(true, Ordering::Relaxed);
            state.websockets.begin_shutdown();
            tracing::info!("shutdown requested: no new connections; finishing in-flight requests");
            let _ = stop_sender.send(true);
        });
    }
    let shutdown_timeout = Duration::from_millis(config.server.shutdown_timeout_ms);
    let listener_settings = connections::ListenerSettings {
        max_connections: config.server.max_connections,
        header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
        tls: tls.clone(),
    };
    warn_if_file_descriptors_are_short(listener_settings.max_connections);
    let server = connections::serve(listener, router(state.clone()), listener_settings, stop.clone());
    let deadline = {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(shutdown_timeout).await;
        }
    };
    tokio::select! {
        () = server => {}
        () = deadline => tracing::warn!(timeout_ms = shutdown_timeout.as_millis() as u64, "shutdown timeout: closing connections still open"),
    }

    if !state.websockets.wait_until_empty(shutdown_timeout).await {
        tracing::warn!(
            open = state.websockets.len(),
            "shutdown timeout: WebSocket connections still open"
        );
    }
    if !state.pipeline.drain(shutdown_timeout).await {
        tracing::warn!("shutdown timeout: some deliveries did not finish (their requests were not acknowledged)");
    }
    // Replay stops here; what it had not deleted yet stays spooled for the next
    // start (a record is deleted only after its sink acknowledged it).
    for task in &maintenance {
        task.abort();
    }
    for task in maintenance {
        let _ = task.await;
    }
    // Every acknowledged batch is already durable; waiting for the batchers just lets
    // them finish cleanly once the last handle is gone.
    drop(state);
    let finished = futures_util::future::join_all(background);
    if tokio::time::timeout(Duration::from_secs(5), finished).await.is_err() {
        tracing::warn!("sink batchers still busy at exit");
    }
    tracing::info!("breakwater stopped");
    Ok(())
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

/// The sinks, each behind its resilience stack, with their spool: what the server
/// delivers through, and what the offline `spool replay` drains with.
pub struct Delivery {
    pub routes: Vec<SinkRoute>,
    pub spool: Arc<Spool>,
    /// Batcher tasks to await at shutdown.
    pub background: Vec<tokio::task::JoinHandle<()>>,
    /// Where policy reloads send new batch limits.
    pub batch_limits: Vec<(&'static str, watch::Sender<BatchLimits>)>,
}

/// Builds every configured sink, its spool queue and its stack. `recovered` sees the
/// events the file sink finds at start-up (for dedup).
pub fn build_delivery(
    config: &Config,
    policy: &Policy,
    data_dir: &Path,
    recovered: impl FnMut(file::RecoveredEvent<'_>),
) -> Result<Delivery, StartupError> {
    let data_dir_error = |source| StartupError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    };
    let window = Duration::from_secs(config.dedup.window_seconds);
    let mut inner_sinks = Vec::new();
    let mut background = Vec::new();
    let mut batch_limits = Vec::new();
    if config.file_sink_enabled() {
        let (limits_sender, limits) = watch::channel(batch_limits_of(&policy.file.batch));
        let (file_sink, writer) =
            FileSink::open(&data_dir.join("events"), &config.file_sink, limits, window, recovered)
                .map_err(data_dir_error)?;
        background.push(writer);
        batch_limits.push(("file", limits_sender));
        inner_sinks.push(NamedSink::from_sink(file_sink));
    }
    if let Some(clickhouse) = &config.clickhouse {
        let (limits_sender, limits) = watch::channel(batch_limits_of(&policy.clickhouse.batch));
        let (sink, batcher) = ClickHouseSink::start(clickhouse, limits)?;
        background.push(batcher);
        batch_limits.push(("clickhouse", limits_sender));
        inner_sinks.push(NamedSink::from_sink(sink));
    }
    if let Some(kafka) = &config.kafka {
        let sink = KafkaSink::start(kafka, &policy.kafka.batch).map_err(StartupError::Backend)?;
        inner_sinks.push(NamedSink::from_sink(sink));
    }
    let queue_sizes: Vec<_> = inner_sinks
        .iter()
        .map(|sink| (sink.name, sink_policy(policy, sink.name).spool.max_bytes))
        .collect();
    let spool = Arc::new(Spool::open(&data_dir.join("spool"), &queue_sizes)?);
    let mut routes = Vec::new();
    for inner in inner_sinks {
        let calls = calls_for(config, policy, inner.name);
        let sink = ResilientSink::new(inner.name, inner.service, &calls).map_err(StartupError::Backend)?;
        let queue = spool.queue(inner.name).expect("a queue per sink");
        routes.push(SinkRoute {
            sink,
            acknowledge: config.acknowledge(inner.name),
            queue,
            health: inner.health,
        });
    }
    Ok(Delivery {
        routes,
        spool,
        background,
        batch_limits,
    })
}

/// Creates every labelled series at zero, so dashboards and alerts see them before
/// the first event of their kind (an absent series reads as "no data", not 0).
fn preregister_series(routes: &[SinkRoute], redis: bool, sources: &[Arc<str>]) {
    for source in sources {
        metrics::counter!(metric::REQUESTS_RATE_LIMITED, "source" => source.to_string()).increment(0);
    }
    let mut dependencies: Vec<&'static str> = routes.iter().map(|r| r.sink.name).collect();
    if redis {
        dependencies.push(crate::dedup::redis::DEPENDENCY_NAME);
    }
    for route in routes {
        let sink = route.sink.name;
        metrics::counter!(metric::SINK_EVENTS_SENT, "sink" => sink).increment(0);
        metrics::counter!(metric::SPOOL_APPENDED_EVENTS, "sink" => sink).increment(0);
        metrics::counter!(metric::SPOOL_REPLAYED_EVENTS, "sink" => sink).increment(0);
        metrics::counter!(metric::SPOOL_FULL, "sink" => sink).increment(0);
        metrics::counter!(metric::DEAD_LETTER_EVENTS, "sink" => sink.to_string()).increment(0);
        metrics::gauge!(metric::SPOOL_OLDEST_AGE, "sink" => sink).set(0.0);
        for kind in ["io", "stopped", "unavailable", "circuit_open", "rejected"] {
            metrics::counter!(metric::SINK_ERRORS, "sink" => sink, "kind" => kind).increment(0);
        }
    }
    for dependency in dependencies {
        metrics::counter!(metric::RETRIES, "dependency" => dependency).increment(0);
        for to in ["open", "half_open", "closed"] {
            metrics::counter!(metric::CIRCUIT_BREAKER_TRANSITIONS, "dependency" => dependency, "to" => to).increment(0);
        }
        for by in ["rate_limit", "bulkhead"] {
            metrics::counter!(metric::CALLS_SHED, "dependency" => dependency, "by" => by).increment(0);
        }
    }
    for result in ["applied", "invalid"] {
        metrics::counter!(metric::POLICY_RELOADS, "result" => result).increment(0);
    }
    for outcome in ["ack", "nack"] {
        metrics::counter!(metric::WS_FRAMES, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(metric::WS_CONNECTIONS).set(0.0);
    metrics::counter!(metric::SPOOL_QUARANTINED).increment(0);
    metrics::counter!(metric::SPOOL_IO_ERRORS).increment(0);
    metrics::counter!(metric::SPOOL_REOPENED).increment(0);
    metrics::counter!(metric::DEDUP_FAIL_OPEN).increment(0);
}

fn batch_limits_of(batch: &BatchPolicy) -> BatchLimits {
    BatchLimits {
        max_events: batch.max_events,
        max_bytes: batch.max_bytes,
        linger: Duration::from_millis(batch.linger_ms),
    }
}

/// The policy section of a sink by name.
pub fn sink_policy<'a>(policy: &'a Policy, sink: &str) -> &'a SinkPolicy {
    match sink {
        "clickhouse" => &policy.clickhouse,
        "kafka" => &policy.kafka,
        _ => &policy.file,
    }
}

/// A sink's call policy. Kafka's per-attempt timeout is never shorter than the
/// producer's own message timeout: a message given up on by us but still queued in
/// librdkafka would otherwise be delivered behind the spool's back.
fn calls_for(config: &Config, policy: &Policy, sink: &str) -> CallPolicy {
    let mut calls = sink_policy(policy, sink).calls();
    if let (Some(kafka), "kafka") = (&config.kafka, sink) {
        calls.timeout_ms = calls.timeout_ms.max(kafka.message_timeout_ms + 1_000);
    }
    calls
}

/// Applies each new policy to the running stacks, spool sizes and batch limits,
/// and every second refreshes each breaker's state gauge (from its handle) and the
/// age of each spool's oldest record.
async fn apply_policy_changes(
    config: Config,
    mut policy: watch::Receiver<Arc<LoadedPolicy>>,
    routes: Vec<SinkRoute>,
    redis: Option<Arc<RedisDedup>>,
    batch_limits: Vec<(&'static str, watch::Sender<BatchLimits>)>,
) {
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = policy.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = policy.borrow_and_update().clone();
                for route in &routes {
                    let name = route.sink.name;
                    if let Err(error) = route.sink.apply(&calls_for(&config, &current.policy, name)) {
                        tracing::error!(sink = name, %error, "could not apply the new policy to this sink");
                    }
                    route.queue.set_max_bytes(sink_policy(&current.policy, name).spool.max_bytes);
                }
                for (name, sender) in &batch_limits {
                    sender.send_replace(batch_limits_of(&sink_policy(&current.policy, name).batch));
                }
                if let Some(redis) = &redis {
                    if let Err(error) = redis.apply(&current.policy.redis) {
                        tracing::error!(%error, "could not apply the new policy to redis");
                    }
                }
            }
            _ = refresh.tick() => {
                for route in &routes {
                    metrics::gauge!(metric::CIRCUIT_BREAKER_STATE, "dependency" => route.sink.name)
                        .set(resilience::state_value(route.sink.breaker()));
                }
                let queues: Vec<_> = routes.iter().map(|route| route.queue.clone()).collect();
                let ages = tokio::task::spawn_blocking(move || {
                    queues.iter().map(|q| (q.sink, q.stats().oldest_age_seconds.unwrap_or(0.0))).collect::<Vec<_>>()
                });
                if let Ok(ages) = ages.await {
                    for (sink, age) in ages {
                        metrics::gauge!(metric::SPOOL_OLDEST_AGE, "sink" => sink).set(age);
                    }
                }
                if let Some(redis) = &redis {
                    metrics::gauge!(metric::CIRCUIT_BREAKER_STATE, "dependency" => crate::dedup::redis::DEPENDENCY_NAME)
                        .set(resilience::state_value(redis.breaker()));
                }
            }
        }
    }
}

/// The whole HTTP surface: intake routes, ops endpoints, JSON 404/405.
pub fn router(state: Arc<AppState>) -> Router {
    crate::intake::routes()
        .merge(ops::routes())
        .fallback(|uri: Uri| async move {
            tracing::debug!(%uri, "no such endpoint");
            IntakeError::NotFound
        })
        .method_not_allowed_fallback(|| async { IntakeError::MethodNotAllowed })
        .with_state(state)
}

/// Holds `<data_dir>/breakwater.lock` for as long as the returned file lives.
pub fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, StartupError> {
    let path = data_dir.join("breakwater.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartupError::DataDir {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartupError::DataDirLocked(data_dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(source)) => Err(StartupError::DataDir { path, source }),
    }
}

async fn wait_for_stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
