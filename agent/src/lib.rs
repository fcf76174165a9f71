//! The Flotilla agent: samples this host, spools the samples, and uplinks them to the
//! aggregator over QUIC; answers the aggregator's directives; serves ONNX models over the KServe
//! v2 HTTP API ([`serving`]) and reports their statistics with the host's telemetry.
//!
//! ```text
//! telemetry thread (Collectors) --Sample--> sealer --batch--> spool (sled) --> uplink ==QUIC==> aggregator
//! aggregator ==QUIC==> downlink --ledger (applied ids, sled)--> actuator (models, sampler) --> DirectiveResult
//! ```
//!
//! Stop order: queued inference requests are answered 503 and the inference API drains (at most
//! [`serving::HTTP_DRAIN_GRACE`], concurrently with the rest) -> sampling stops -> the sealer
//! seals what it holds -> the uplink drains within its grace period -> close(OK) -> spool
//! flush -> endpoint idle. The seal never waits behind HTTP clients.
#![forbid(unsafe_code)]

pub mod actuator;
pub mod downlink;
pub mod health;
pub mod ledger;
pub mod optimizer;
pub mod probe;
pub mod sampler;
pub mod serving;
pub mod spool;
pub mod telemetry;
pub mod uplink;

use std::sync::Arc;
use std::time::Duration;

use common::config::agent::AgentConfig;
use common::proto::Hello;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use sampler::Sampler;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The spool could not be opened or written.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    /// A required collector could not start.
    #[error(transparent)]
    Sampler(#[from] sampler::SamplerError),
    /// TLS material could not be loaded.
    #[error("loading the agent's TLS identity")]
    Tls(#[from] common::tls::TlsError),
    /// The QUIC endpoint could not be made.
    #[error(transparent)]
    Quic(#[from] common::quic::QuicError),
    /// The inference API could not start.
    #[error(transparent)]
    Serving(#[from] serving::ServingError),
    /// A background task failed.
    #[error("agent task failed: {0}")]
    Task(String),
}

/// Makes the QUIC client endpoint with this host's certificate (bound to an ephemeral port).
pub fn client_endpoint(config: &AgentConfig) -> Result<quinn::Endpoint, AgentError> {
    let tls = common::tls::client_config(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)?;
    let bind = if config.uplink.aggregator.is_ipv6_literal() {
        std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    Ok(common::quic::client_endpoint(bind, tls)?)
}

/// Runs the agent until `shutdown` is cancelled, then stops in order.
pub async fn run(
    config: AgentConfig,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let inference = config.serving.as_ref().map(serving::Serving::bind).transpose()?;
    run_bound(config, endpoint, inference, shutdown).await
}

/// Like [`run`] with the inference API's listener already bound (from
/// [`serving::Serving::bind`]), so the caller knows its address (port 0) before it starts.
/// `inference` is used only when the config has a `[serving]` section.
pub async fn run_bound(
    config: AgentConfig,
    endpoint: quinn::Endpoint,
    inference: Option<std::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let spool_path = config.spool.path.clone();
    let max_bytes = config.spool.max_bytes;
    let spool = tokio::task::spawn_blocking(move || spool::Spool::open(&spool_path, max_bytes))
        .await
        .map_err(|e| AgentError::Task(e.to_string()))??;
    let spool = Arc::new(spool);

    let serving = match (&config.serving, inference) {
        (Some(sc), Some(listener)) => {
            Some(serving::Serving::start_on(listener, sc, shutdown.clone()).await?)
        }
        (Some(sc), None) => Some(serving::Serving::start(sc, shutdown.clone()).await?),
        (None, _) => None,
    };
    let models = serving.as_ref().map(serving::Serving::telemetry);
    let health = Arc::new(health::TelemetryHealth::default());
    if let Some(serving) = &serving {
        serving.show_telemetry_health(health.clone());
    }
    let (sampler, inventory, samples) =
        Sampler::start(&config.telemetry, &config.labels, models, health.clone()).await?;
    info!(
        gpus = inventory.gpus.len(),
        accelerators = inventory.accelerators.len(),
        sample_ms = u64::try_from(config.telemetry.sample_interval.as_millis()).unwrap_or(u64::MAX),
        spool_epoch = spool.epoch(),
        "Agent started."
    );
    let hello = Hello {
        min_version: common::proto::MIN_VERSION,
        max_version: common::proto::MAX_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        inventory: Some(inventory),
        config_version: config.version(),
        spool_epoch: spool.epoch(),
        spool_low_seq: 0, // filled in by the uplink at each connection
        agent_run_id: rand::random::<u64>().max(1),
    };

    let directives = Arc::new(downlink::Directives {
        ledger: ledger::Ledger::open(&spool)?,
        actuator: actuator::Actuator {
            repository: serving.as_ref().map(|s| s.repository.clone()),
            interval: Some(sampler.interval()),
            optimizations: serving.as_ref().map(|s| s.optimizations.clone()),
        },
    });
    let sealed = Arc::new(Notify::new());
    let sealer = common::daemon::spawn_watched(
        "sealer",
        sampler::seal(
            samples,
            spool.clone(),
            sealed.clone(),
            config.uplink.interval,
            health.clone(),
        ),
    );
    let uplink_stop = CancellationToken::new();
    let uplink = common::daemon::spawn_watched(
        "uplink",
        uplink::Uplink {
            endpoint,
            config: config.uplink.clone(),
            spool: spool.clone(),
            hello,
            sealed,
            drain_grace: Duration::from_secs(5),
            directives,
            health,
        }
        .run(uplink_stop.clone()),
    );

    shutdown.cancelled().await;
    // The HTTP drain runs beside the seal, bounded, so slow clients cannot hold telemetry back.
    let http_drain =
        serving.map(|serving| tokio::spawn(serving.stopped(serving::HTTP_DRAIN_GRACE)));
    info!("Stopping: sealing the last samples.");
    sampler.stop();
    let sealed_ok = sealer.await.map_err(|e| AgentError::Task(e.to_string()))?;
    uplink_stop.cancel();
    uplink.await.map_err(|e| AgentError::Task(e.to_string()))?;
    let spool_for_flush = spool.clone();
    tokio::task::spawn_blocking(move || spool_for_flush.flush())
        .await
        .map_err(|e| AgentError::Task(e.to_string()))??;
    if let Some(drain) = http_drain {
        let _ = drain.await;
    }
    sealed_ok?;
    let (batches, samples_produced) = spool.produced()?;
    let stats = spool.stats();
    info!(
        samples_produced,
        batches_produced = batches,
        pending_batches = stats.batches,
        dropped_batches = stats.dropped_batches,
        "Agent stopped."
    );
    Ok(())
}
