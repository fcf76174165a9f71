//! The Flotilla aggregator: QUIC ingest, sled store, admin API, and the `flotilla` CLI.
//!
//! ```text
//! agents ==QUIC==> ingest -> commit (group flush) -> store (sled) <- api <-HTTP- flotilla CLI
//!                                                       ^
//!                                     rollups + retention (periodic)
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`ingest`] | accepting agents, Hello/Welcome, batch streams, acks |
//! | [`limits`] | ingest memory budget and per-host report rates |
//! | [`commit`] | group commit: one durable flush for many batches |
//! | [`store`] | the storage interface and its sled backend, all key layouts |
//! | [`connections`] | open connections by host |
//! | [`control`] | the control loop: desired state, directive outbox and delivery, decisions |
//! | [`api`] | admin HTTP JSON API and `/metrics` |
//! | [`views`] | the API's JSON shapes, shared with the CLI |
//! | [`stats`] | self-monitoring counters |
//! | [`cli`] | the `flotilla` operator CLI |
//! | [`up`] | `flotilla up`: a one-host fleet on this machine |
//! | [`analytics`] | pure analytics: forecasts, costs, plans, budgets, alerts |
//! | [`scheduler`] | runs analytics on a schedule, stores results, delivers alerts |
//! | [`hour_cache`] | decoded hour rollups kept between analytics passes |
//! | [`webhook`] | alert webhook delivery with retries |
#![forbid(unsafe_code)]

pub mod analytics;
pub mod api;
pub mod cli;
pub mod commit;
pub mod connections;
pub mod control;
pub mod hour_cache;
pub mod ingest;
pub mod limits;
pub mod scheduler;
pub mod stats;
pub mod store;
pub mod up;
pub mod views;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::config::aggregator::AggregatorConfig;
use common::daemon::spawn_watched;
use common::tls::Revocations;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::store::{Retention, SledStore, Stores};

/// How often dirty rollups are recomputed.
const ROLLUP_EVERY: Duration = Duration::from_secs(10);

/// How often retention is enforced.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// Why the aggregator could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// TLS material could not be loaded.
    #[error("loading the aggregator's TLS identity")]
    Tls(#[from] common::tls::TlsError),
    /// The QUIC endpoint could not be made.
    #[error(transparent)]
    Quic(#[from] common::quic::QuicError),
    /// The admin listener could not be bound.
    #[error("binding the admin API on {addr}")]
    AdminBind {
        /// Address.
        addr: SocketAddr,
        /// OS reason.
        #[source]
        source: std::io::Error,
    },
    /// The admin token file could not be read.
    #[error("reading listen.admin_token_file {path}")]
    Token {
        /// File.
        path: std::path::PathBuf,
        /// OS reason.
        #[source]
        source: std::io::Error,
    },
    /// The admin server failed.
    #[error("admin API server")]
    Admin(#[source] std::io::Error),
    /// The analytics policy or pricing file is bad.
    #[error("analytics configuration")]
    Config(#[source] common::config::ConfigError),
    /// The scaling policy file is bad.
    #[error("control configuration")]
    Policies(#[source] control::policy::PolicyError),
    /// The analytics scheduler could not start.
    #[error(transparent)]
    Analytics(#[from] scheduler::AnalyticsError),
}

/// An aggregator with its sockets bound and store open, ready to [`run`].
#[derive(Debug)]
pub struct Bound {
    /// QUIC endpoint for agents.
    pub endpoint: quinn::Endpoint,
    /// Admin API listener.
    pub admin: tokio::net::TcpListener,
    /// Storage, one interface per concern.
    pub stores: Stores,
    /// Revoked hosts (loaded from the store, shared with TLS).
    pub revocations: Revocations,
}

impl Bound {
    /// Opens the store and binds both sockets as the config says.
    pub async fn bind(config: &AggregatorConfig) -> Result<Self, AggregatorError> {
        let path = config.store.path.clone();
        let stores = tokio::task::spawn_blocking(move || Stores::sled(SledStore::open(&path)?))
            .await
            .map_err(|e| AggregatorError::Admin(std::io::Error::other(e)))??;
        let revocations = Revocations::default();
        for (host, at) in stores.revocations.revocations()? {
            revocations.revoke(host, at);
        }
        let tls = common::tls::server_config(
            &config.tls.ca_cert,
            &config.tls.cert,
            &config.tls.key,
            revocations.clone(),
        )?;
        let endpoint = common::quic::server_endpoint(config.listen.quic, tls)?;
        let admin = tokio::net::TcpListener::bind(config.listen.admin)
            .await
            .map_err(|source| AggregatorError::AdminBind { addr: config.listen.admin, source })?;
        Ok(Self { endpoint, admin, stores, revocations })
    }

    /// The bound QUIC address.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }
}

/// Runs the aggregator until `shutdown` is cancelled, then stops accepting, lets handlers
/// finish and flushes the store.
pub async fn run(
    config: AggregatorConfig,
    bound: Bound,
    shutdown: CancellationToken,
) -> Result<(), AggregatorError> {
    let Bound { endpoint, admin, stores, revocations } = bound;
    let store = stores.telemetry.clone();
    let delivery = control::delivery::Delivery::new(stores.control.clone());
    let token = match &config.listen.admin_token_file {
        Some(path) => Some(Arc::<str>::from(
            common::config::aggregator::read_admin_token(path).map_err(AggregatorError::Config)?,
        )),
        None => None,
    };
    let stats = Arc::new(stats::Stats::default());
    let connections = connections::Connections::default();
    let (committer, commit_worker) = commit::Committer::start(store.clone(), stats.clone());
    let ctx = Arc::new(ingest::IngestContext {
        store: store.clone(),
        delivery: delivery.clone(),
        committer,
        connections: connections.clone(),
        stats: stats.clone(),
        max_frame_bytes: config.ingest.max_frame_bytes,
        max_batch_samples: config.ingest.max_batch_samples,
        inflight: limits::InflightBudget::new(config.ingest.max_inflight_bytes),
        handshakes: Arc::new(tokio::sync::Semaphore::new(config.ingest.max_concurrent_handshakes)),
        rates: limits::HostRates::new(
            config.ingest.host_rate_bytes_per_sec,
            config.ingest.host_burst_bytes,
        ),
    });
    let unknown = || SocketAddr::from(([0, 0, 0, 0], 0));
    info!(
        quic = %endpoint.local_addr().unwrap_or_else(|_| unknown()),
        admin = %admin.local_addr().unwrap_or_else(|_| unknown()),
        store = %config.store.path.display(),
        "Aggregator started."
    );
    // Watched: a panic is logged at ERROR when it happens, not at shutdown.
    let ingest = spawn_watched("ingest", ingest::serve(endpoint, ctx, shutdown.clone()));
    let upkeep = spawn_watched("upkeep", upkeep(stores.clone(), &config, shutdown.clone()));
    let (settings, catalog) =
        scheduler::load_settings(&config.analytics).map_err(AggregatorError::Config)?;
    let scaling_alerts = Arc::new(control::budget_cap::ScalingAlerts::default());
    let analytics = Arc::new(
        scheduler::Analytics::new(stores.clone(), settings, catalog)
            .with_delivery(delivery.clone(), config.control.directive_ttl)
            .with_scaling_alerts(scaling_alerts.clone()),
    );
    let cron = spawn_watched(
        "analytics scheduler",
        scheduler::schedule(analytics.clone(), config.analytics.schedule.clone(), shutdown.clone()),
    );
    let policies = control::load_policies(&config.control).map_err(AggregatorError::Policies)?;
    let autoscaler = Arc::new(
        control::autoscaler::Autoscaler::new(
            policies,
            stores.clone(),
            delivery.clone(),
            config.control.window,
            config.control.directive_ttl,
        )
        .with_alerts(scaling_alerts),
    );
    let scaling = spawn_watched(
        "autoscaler",
        autoscaler.clone().run(config.control.interval, shutdown.clone()),
    );
    let searches = control::searches::Searches::new(delivery.clone());
    let following = spawn_watched("optimization searches", searches.clone().run(shutdown.clone()));
    let app = api::router(api::ApiState {
        stores: stores.clone(),
        delivery,
        connections,
        revocations,
        stats,
        token,
        offline_after: config.ingest.offline_after,
        analytics,
        autoscaler: (autoscaler.clone(), config.control.interval),
        searches,
    });
    let admin_shutdown = shutdown.clone();
    let served = axum::serve(admin, app)
        .with_graceful_shutdown(async move { admin_shutdown.cancelled().await })
        .await;
    // The admin server ends at shutdown (or on error, which stops everything).
    shutdown.cancel();
    let _ = ingest.await;
    let _ = upkeep.await;
    let _ = scaling.await;
    let _ = following.await;
    if let Ok(Err(e)) = cron.await {
        warn!(error = %common::daemon::error_chain(&e), "Analytics scheduler failed.");
    }
    // The ingest context (holding the last committer handle) is gone: the worker drains and ends.
    if tokio::time::timeout(Duration::from_secs(10), commit_worker).await.is_err() {
        warn!("Commit worker did not finish within 10 s.");
    }
    let s = store.clone();
    // Roll up the buckets that have closed; open ones are marked dirty and rolled up later.
    let _ = tokio::task::spawn_blocking(move || s.roll_up(ingest::now_ms())).await;
    info!("Aggregator stopped.");
    served.map_err(AggregatorError::Admin)
}

fn upkeep(
    stores: Stores,
    config: &AggregatorConfig,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + use<> {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let retention = Retention {
        raw_ms: ms(config.store.raw_retention),
        minute_ms: ms(config.store.minute_retention),
        hour_ms: ms(config.store.hour_retention),
    };
    let store = stores.telemetry;
    let control = stores.control;
    let control_ms = ms(config.store.raw_retention.max(config.store.minute_retention));
    async move {
        let mut rollup = tokio::time::interval(ROLLUP_EVERY);
        let mut retain = tokio::time::interval(RETENTION_EVERY);
        loop {
            tokio::select! {
                _ = rollup.tick() => {
                    let s = store.clone();
                    let now = ingest::now_ms();
                    match tokio::task::spawn_blocking(move || s.roll_up(now)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => error!(error = %common::daemon::error_chain(&e), "Rollup pass failed; retrying at the next pass."),
                        Err(e) => error!(error = %e, "Rollup task failed; retrying at the next pass."),
                    }
                }
                _ = retain.tick() => {
                    let s = store.clone();
                    let now = ingest::now_ms();
                    let c = control.clone();
                    match tokio::task::spawn_blocking(move || {
                        Ok::<_, store::StoreError>(s.enforce_retention(now, retention)? + c.prune(now - control_ms)?)
                    }).await {
                        Ok(Ok(n)) if n > 0 => info!(deleted = n, "Retention pass deleted expired records."),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => error!(error = %common::daemon::error_chain(&e), "Retention pass failed; retrying at the next pass."),
                        Err(e) => error!(error = %e, "Retention task failed; retrying at the next pass."),
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}
