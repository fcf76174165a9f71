//! The JSON shapes of the admin API, shared by the server (`api`) and the `flotilla` CLI, so the
//! two cannot drift apart. Field names carry units; times are Unix milliseconds unless named
//! `_secs`.

use serde::{Deserialize, Serialize};

use common::proto::{Inventory, Sample};

/// Whether a host is reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Connected, or reported within `ingest.offline_after_secs`.
    Online,
    /// Known but silent for longer than that.
    Offline,
    /// Its certificates are revoked; it cannot connect.
    Revoked,
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Revoked => "revoked",
        })
    }
}

/// One row of `GET /api/v1/hosts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSummary {
    /// Host id (certificate Common Name).
    pub host: String,
    /// Reporting state.
    pub state: HostState,
    /// Last Hello or stored batch from this host.
    pub last_seen_unix_ms: Option<i64>,
    /// GPUs in the inventory.
    pub gpu_count: u32,
    /// CPU utilization in the latest sample, 0..100.
    pub cpu_util_pct: Option<f64>,
    /// Mean GPU utilization over the host's GPUs in the latest sample, 0..100.
    pub gpu_util_pct: Option<f64>,
    /// Samples stored from this host, ever.
    pub samples_total: u64,
    /// Highest batch seq stored.
    pub last_seq: u64,
    /// Agent software version from its Hello.
    pub agent_version: String,
}

/// `GET /api/v1/hosts/{host}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostDetail {
    /// The summary row.
    pub summary: HostSummary,
    /// Inventory from the agent's latest Hello.
    pub inventory: Inventory,
    /// The latest stored sample.
    pub latest: Option<Sample>,
    /// Batches the agent's spool dropped for lack of space, as it last reported.
    pub spool_dropped_batches: u64,
    /// Samples in those batches.
    pub spool_dropped_samples: u64,
    /// When the host's client certificate expires, Unix seconds (from its last handshake).
    pub cert_not_after_secs: Option<i64>,
    /// Telemetry health: clock offset, the agent's telemetry errors, refused future samples.
    #[serde(default)]
    pub telemetry: crate::store::HostHealth,
    /// Stored seqs above the host's watermark, waiting for a gap to fill (normally 0).
    #[serde(default)]
    pub dedup_seen: u64,
}

/// Resolution of a metric query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Every raw sample.
    Raw,
    /// One point per minute (mean, min, max).
    Minute,
    /// One point per hour.
    Hour,
}

/// One point of a metric series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// Start of the bucket (or the sample time for raw points).
    pub unix_ms: i64,
    /// Mean over the bucket.
    pub value: f64,
    /// Smallest value in the bucket.
    pub min: f64,
    /// Largest value in the bucket.
    pub max: f64,
    /// Samples in the bucket.
    pub count: u64,
}

/// `GET /api/v1/hosts/{host}/metrics/{metric}?since_secs=N&resolution=raw|minute|hour`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSeries {
    /// Host id.
    pub host: String,
    /// Series name, e.g. `cpu_util_pct`, `gpu0_power_mw`.
    pub metric: String,
    /// Resolution the points have.
    pub resolution: Resolution,
    /// Points, oldest first.
    pub points: Vec<MetricPoint>,
}

/// `GET /api/v1/hosts/{host}/metric-names`: the series the host's latest sample has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricNames {
    /// Host id.
    pub host: String,
    /// Series names.
    pub metrics: Vec<String>,
}

/// `POST /api/v1/hosts/{host}/revoke` (and `DELETE` to lift it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokeResult {
    /// Host id.
    pub host: String,
    /// When the revocation took effect, Unix seconds; `None` after lifting it.
    pub revoked_at_secs: Option<i64>,
    /// Whether an open connection of the host was closed.
    pub disconnected: bool,
}

/// Body of every error response: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong and what to do.
    pub error: String,
}

/// One directive as the API shows it (`GET /api/v1/directives`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectiveView {
    /// Unique id.
    pub id: String,
    /// The host it is for.
    pub host: String,
    /// Its kind (`set_instances`, ...).
    pub kind: String,
    /// Its payload, as sent.
    pub payload: serde_json::Value,
    /// One line: what it asks.
    pub summary: String,
    /// The decision that made it.
    pub decision: String,
    /// `pending`, `sent`, `applied`, `rejected`, `unsupported` or `expired`.
    pub state: String,
    /// Created, Unix ms.
    pub created_ms: i64,
    /// Deadline, Unix ms.
    pub not_after_ms: i64,
    /// Sends so far.
    pub attempts: u32,
    /// First sent, Unix ms.
    pub first_sent_ms: Option<i64>,
    /// Answered, Unix ms.
    pub answered_ms: Option<i64>,
    /// The agent's message: what changed, or why not.
    pub message: String,
}

/// An operator's directive (`POST /api/v1/directives`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectiveRequest {
    /// Host id.
    pub host: String,
    /// Kind (`ping`, `set_instances`, `set_batching`, `load`, `unload`, `drain`,
    /// `set_telemetry_interval`).
    pub kind: String,
    /// The kind's payload (see docs/control.md); omitted for `ping`.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Seconds until it expires unapplied (default 600, at most 7 days).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Seconds to wait for the agent's answer before replying (default 0: reply at once).
    #[serde(default)]
    pub wait_secs: Option<u64>,
}
