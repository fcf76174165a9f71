//! Inference serving: ONNX models from a repository directory, run by tract (or forwarded to a
//! local KServe v2 accelerator server) behind a dynamic batcher, exposed over the KServe v2 HTTP
//! API that Triton's clients speak.
//!
//! | module | owns |
//! |---|---|
//! | [`tensor`] | KServe datatypes and tensors: JSON, binary extension and tract conversions |
//! | [`model_config`] | a model's `config.toml`, validated, every key named on error |
//! | [`runner`] | the tract engine: strict-then-lenient loading, signature, plan per shape |
//! | [`kserve`] | the `kserve` engine that forwards batches to another KServe v2 server |
//! | [`batcher`] | the pure batch policy and the per-model worker |
//! | [`adaptive`] | the pure controller that tunes batch size and queue delay from measurements |
//! | [`model`] | one loaded version: queue, worker, instance threads, replies |
//! | [`stats`] | per-version counters and histograms, `/metrics`, telemetry deltas |
//! | [`names`] | the model and version name rule, checked before any file-system access |
//! | [`repository`] | the model directory, load/unload, the index |
//! | [`request`] | the KServe v2 JSON request parsed into typed buffers, no `Value` tree |
//! | [`limits`] | admission: bytes in flight, concurrency, request time, shapes per model |
//! | [`http`] | the axum routes, name checks, repository-control access |
//! | [`demo`] | the embedded demo model `flotilla up` serves |
//!
//! ```text
//! HTTP --parse/validate--> LoadedModel::infer --queue--> worker --Batch--> instance thread --Engine--> reply
//!                                                     policy <--adaptive::Controller <-- measurements
//!                                                     stats --take_samples--> telemetry Sample.models
//! ```

pub mod adaptive;
pub mod auto;
pub mod batcher;
pub mod demo;
pub mod http;
pub mod kserve;
pub mod limits;
pub mod model;
pub mod model_config;
pub mod names;
pub mod onnxruntime;
pub mod ort_library;
pub mod repository;
pub mod request;
pub mod runner;
pub mod stats;
pub mod tensor;
pub mod threads;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt as _;
use common::config::agent::ServingConfig;
use common::proto::ModelSample;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use repository::Repository;

/// How long the inference API may take, after shutdown, to finish the responses it is writing
/// (queued requests are answered 503 at once, batches already running finish). Past it, open
/// connections are cut. The systemd units' `TimeoutStopSec=30` stays above it.
pub const HTTP_DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The HTTP port could not be bound.
    #[error("binding the inference API on {addr} (serving.listen): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The admin token file could not be used (checked at config load too).
    #[error("serving.admin_token_file: {0}")]
    AdminToken(String),
}

/// A running inference server.
#[derive(Debug)]
pub struct Serving {
    /// The models.
    pub repository: Arc<Repository>,
    /// The optimizer's searches, shared by the API and the directive actuator.
    pub optimizations: Arc<crate::optimizer::jobs::Jobs>,
    /// Where the API listens.
    pub addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    telemetry_health: Arc<std::sync::OnceLock<Arc<crate::health::TelemetryHealth>>>,
}

impl Serving {
    /// Binds `serving.listen` (port 0 picks a free port; the log and [`Self::addr`] say which).
    pub fn bind(config: &ServingConfig) -> Result<std::net::TcpListener, ServingError> {
        let bind_error = |source| ServingError::Bind { addr: config.listen, source };
        let listener = std::net::TcpListener::bind(config.listen).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        Ok(listener)
    }

    /// Binds the API, loads every model in the repository, and serves until `shutdown`.
    pub async fn start(
        config: &ServingConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, ServingError> {
        Self::start_on(Self::bind(config)?, config, shutdown).await
    }

    /// Like [`Self::start`] on an already bound listener (from [`Self::bind`]).
    pub async fn start_on(
        listener: std::net::TcpListener,
        config: &ServingConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, ServingError> {
        let bind_error = |source| ServingError::Bind { addr: config.listen, source };
        let listener = tokio::net::TcpListener::from_std(listener).map_err(bind_error)?;
        let addr = listener.local_addr().unwrap_or(config.listen);
        let admin_token = match &config.admin_token_file {
            Some(path) => Some(http::AdminToken::new(
                &common::config::agent::read_token_file(path).map_err(ServingError::AdminToken)?,
            )),
            None => None,
        };
        let repository = Arc::new(Repository::new(&config.model_repository));
        repository.load_all().await;
        let state = http::ApiState {
            repository: repository.clone(),
            max_request_bytes: config.max_request_bytes,
            limits: Arc::new(limits::Limits::new(config.limits.clone())),
            admin_token,
            telemetry_health: Arc::default(),
            optimizations: Arc::default(),
            footprint_probe: crate::optimizer::footprint::agent_probe(),
        };
        let telemetry_health = state.telemetry_health.clone();
        let optimizations = state.optimizations.clone();
        // Peer addresses reach the handlers: repository control checks for loopback.
        let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
        // Replies go out as soon as they are written, not held back for Nagle's coalescing
        // (which meets the client's delayed ACK on small pipelined or HTTP/2 replies).
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY could not be set on a connection.");
            }
        });
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "Inference API stopped.");
            }
        });
        let ready: Vec<String> =
            repository.loaded().iter().map(|m| format!("{}/{}", m.name, m.version)).collect();
        info!(%addr, repository = %config.model_repository.display(), models = ?ready, "Inference API listening.");
        Ok(Self { repository, optimizations, addr, server, telemetry_health })
    }

    /// Shows the agent's telemetry health on `/metrics` from now on (set once; later calls
    /// are ignored).
    pub fn show_telemetry_health(&self, health: Arc<crate::health::TelemetryHealth>) {
        let _ = self.telemetry_health.set(health);
    }

    /// A source of per-model telemetry for the sampler.
    pub fn telemetry(&self) -> ModelTelemetry {
        ModelTelemetry { repository: self.repository.clone() }
    }

    /// Call after `shutdown` is cancelled: answers every queued request at once (503, the agent
    /// is shutting down), then gives the API up to `grace` to finish the responses it is
    /// writing; past that its connections are cut (logged). Returns whether it drained in time.
    pub async fn stopped(mut self, grace: Duration) -> bool {
        self.repository.stop_all();
        if tokio::time::timeout(grace, &mut self.server).await.is_ok() {
            return true;
        }
        self.server.abort();
        warn!(
            grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            "The inference API did not drain within its grace period; open connections were cut."
        );
        false
    }
}

/// Takes per-model deltas for each telemetry sample.
#[derive(Debug, Clone)]
pub struct ModelTelemetry {
    repository: Arc<Repository>,
}

impl ModelTelemetry {
    /// The deltas of every loaded version since the last call.
    pub fn take(&self, interval: Duration) -> Vec<ModelSample> {
        self.repository.loaded().iter().filter_map(|m| m.stats.take_sample(interval)).collect()
    }
}
