//! The aggregator's configuration (`/etc/flotilla/aggregator.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Checker, ConfigError, from_toml, read_file};

/// The defaults `flotilla up` and tests start from; paths relative to the data directory.
pub const EMBEDDED: &str = r#"
[listen]
quic = "127.0.0.1:7443"
admin = "127.0.0.1:7070"

[tls]
ca_cert = "tls/ca.pem"
cert = "tls/server.pem"
key = "tls/server.key"

[store]
path = "store"
"#;

/// The aggregator's validated configuration.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// Sockets.
    pub listen: ListenConfig,
    /// Certificates.
    pub tls: ServerTlsConfig,
    /// Storage and retention.
    pub store: StoreConfig,
    /// Telemetry intake.
    pub ingest: IngestConfig,
    /// Analytics: schedule and the files holding the pricing catalog and the policy.
    pub analytics: AnalyticsConfig,
    /// Control loop.
    pub control: ControlConfig,
}

/// `[analytics]`, validated (paths resolved). The files are parsed by the aggregator's
/// `analytics::settings`, which names their keys in its own errors.
#[derive(Debug, Clone)]
pub struct AnalyticsConfig {
    /// Cron expression with seconds (`sec min hour day month weekday`) for the analytics pass.
    pub schedule: String,
    /// Pricing catalog (instance types and prices); `None` uses the built-in catalog.
    pub pricing_file: Option<PathBuf>,
    /// Budgets, alert rules, plan targets and the webhook; `None` means none of them.
    pub policy_file: Option<PathBuf>,
}

/// `[control]`, validated (paths resolved). The policy file is parsed by the aggregator's
/// `control::policy`, which names its keys in its own errors.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Scaling policies (TOML); `None`: no policy, the loop only records operator directives.
    pub policy_file: Option<PathBuf>,
    /// How often policies are evaluated.
    pub interval: Duration,
    /// Telemetry window each evaluation looks at.
    pub window: Duration,
    /// Lifetime of a policy's directives.
    pub directive_ttl: Duration,
}

/// `[listen]`, validated.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// QUIC (UDP) address for agents.
    pub quic: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// File holding the admin bearer token; required when `admin` is not loopback.
    pub admin_token_file: Option<PathBuf>,
}

/// `[tls]`, validated (paths resolved).
#[derive(Debug, Clone)]
pub struct ServerTlsConfig {
    /// Fleet CA certificate (trust anchor for agents).
    pub ca_cert: PathBuf,
    /// Server certificate.
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
}

/// `[store]`, validated.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// sled directory.
    pub path: PathBuf,
    /// How long raw samples are kept.
    pub raw_retention: Duration,
    /// How long 1-minute rollups are kept.
    pub minute_retention: Duration,
    /// How long 1-hour rollups are kept.
    pub hour_retention: Duration,
}

/// `[ingest]`, validated.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Largest frame accepted from agents.
    pub max_frame_bytes: u32,
    /// A host not heard from for this long is shown as offline.
    pub offline_after: Duration,
    /// Most samples accepted in one telemetry batch; a larger batch is refused.
    pub max_batch_samples: usize,
    /// Global budget of bytes held by frames being read and batches awaiting commit.
    pub max_inflight_bytes: u64,
    /// Average report bytes per second each host may send.
    pub host_rate_bytes_per_sec: u64,
    /// Connections taken through the TLS handshake and Hello at once; more are refused at once
    /// (the agent backs off and retries) instead of timing out half-done.
    pub max_concurrent_handshakes: usize,
    /// Largest burst of report bytes a host may send at once.
    pub host_burst_bytes: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregatorConfig {
    listen: RawListen,
    tls: RawTls,
    store: RawStore,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    analytics: RawAnalytics,
    #[serde(default)]
    control: RawControl,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    #[serde(default)]
    policy_file: Option<PathBuf>,
    #[serde(default = "default_control_interval")]
    interval_secs: u64,
    #[serde(default = "default_control_window")]
    window_secs: u64,
    #[serde(default = "default_directive_ttl")]
    directive_ttl_secs: u64,
}

impl Default for RawControl {
    fn default() -> Self {
        Self {
            policy_file: None,
            interval_secs: default_control_interval(),
            window_secs: default_control_window(),
            directive_ttl_secs: default_directive_ttl(),
        }
    }
}

fn default_control_interval() -> u64 {
    15
}

fn default_control_window() -> u64 {
    60
}

fn default_directive_ttl() -> u64 {
    600
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalytics {
    #[serde(default = "default_schedule")]
    schedule: String,
    #[serde(default)]
    pricing_file: Option<PathBuf>,
    #[serde(default)]
    policy_file: Option<PathBuf>,
}

impl Default for RawAnalytics {
    fn default() -> Self {
        Self { schedule: default_schedule(), pricing_file: None, policy_file: None }
    }
}

fn default_schedule() -> String {
    "0 */5 * * * *".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    #[serde(default = "default_quic")]
    quic: String,
    #[serde(default = "default_admin")]
    admin: String,
    #[serde(default)]
    admin_token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: PathBuf,
    #[serde(default = "default_raw_hours")]
    raw_retention_hours: u64,
    #[serde(default = "default_minute_days")]
    minute_retention_days: u64,
    #[serde(default = "default_hour_days")]
    hour_retention_days: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    #[serde(default = "default_max_frame")]
    max_frame_bytes: u32,
    #[serde(default = "default_offline_secs")]
    offline_after_secs: u64,
    #[serde(default = "default_max_batch_samples")]
    max_batch_samples: u64,
    #[serde(default = "default_max_inflight")]
    max_inflight_bytes: u64,
    #[serde(default = "default_host_rate")]
    host_rate_bytes_per_sec: u64,
    #[serde(default = "default_host_burst")]
    host_burst_bytes: u64,
    #[serde(default = "default_max_concurrent_handshakes")]
    max_concurrent_handshakes: u64,
}

impl Default for RawIngest {
    fn default() -> Self {
        Self {
            max_frame_bytes: default_max_frame(),
            offline_after_secs: default_offline_secs(),
            max_batch_samples: default_max_batch_samples(),
            max_inflight_bytes: default_max_inflight(),
            host_rate_bytes_per_sec: default_host_rate(),
            host_burst_bytes: default_host_burst(),
            max_concurrent_handshakes: default_max_concurrent_handshakes(),
        }
    }
}

fn default_max_batch_samples() -> u64 {
    50_000
}
fn default_max_inflight() -> u64 {
    256 * 1024 * 1024
}
fn default_host_rate() -> u64 {
    4 * 1024 * 1024
}
fn default_host_burst() -> u64 {
    32 * 1024 * 1024
}
fn default_max_concurrent_handshakes() -> u64 {
    64
}

fn default_quic() -> String {
    "0.0.0.0:7443".into()
}
fn default_admin() -> String {
    "127.0.0.1:7070".into()
}
fn default_raw_hours() -> u64 {
    48
}
fn default_minute_days() -> u64 {
    30
}
fn default_hour_days() -> u64 {
    400
}
fn default_max_frame() -> u32 {
    crate::proto::DEFAULT_MAX_FRAME_BYTES
}
fn default_offline_secs() -> u64 {
    30
}

// === impl AggregatorConfig ===

impl AggregatorConfig {
    /// Reads and validates a config file, and the admin token file it names (see
    /// [`read_admin_token`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (text, origin, base) = read_file(path)?;
        let config = Self::parse(&text, &origin, &base)?;
        if let Some(token) = &config.listen.admin_token_file {
            read_admin_token(token)?;
        }
        Ok(config)
    }

    /// Parses and validates TOML text; relative paths are resolved against `base`.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawAggregatorConfig = from_toml(text, origin)?;
        let mut c = Checker::default();
        let admin = c.socket_addr("listen.admin", &raw.listen.admin);
        let admin_token_file = raw
            .listen
            .admin_token_file
            .as_ref()
            .map(|p| c.path("listen.admin_token_file", p, base));
        if !admin.ip().is_loopback() {
            // The admin API is plain HTTP: off loopback its bearer token would cross the network
            // in cleartext.
            c.problem(
                "listen.admin",
                "must be a loopback address (127.0.0.1 or [::1]): the admin API is plain HTTP and \
                 would send its bearer token in cleartext; reach it through an SSH tunnel or a \
                 TLS-terminating proxy on this host",
                &raw.listen.admin,
            );
        }
        let listen = ListenConfig {
            quic: c.socket_addr("listen.quic", &raw.listen.quic),
            admin,
            admin_token_file,
        };
        let tls = ServerTlsConfig {
            ca_cert: c.path("tls.ca_cert", &raw.tls.ca_cert, base),
            cert: c.path("tls.cert", &raw.tls.cert, base),
            key: c.path("tls.key", &raw.tls.key, base),
        };
        let s = &raw.store;
        // Out-of-range values are reported and then clamped, so nothing below can overflow.
        let hours = |h: u64| Duration::from_secs(h.saturating_mul(3600));
        let raw_h = c
            .range("store.raw_retention_hours", s.raw_retention_hours, 1, 24 * 365)
            .clamp(1, 24 * 365);
        let minute_d =
            c.range("store.minute_retention_days", s.minute_retention_days, 1, 3650).clamp(1, 3650);
        let hour_d =
            c.range("store.hour_retention_days", s.hour_retention_days, 1, 36_500).clamp(1, 36_500);
        if hour_d < minute_d {
            c.problem(
                "store.hour_retention_days",
                &format!("must keep hours at least as long as minutes ({minute_d} days)"),
                hour_d,
            );
        }
        if minute_d * 24 < raw_h {
            c.problem(
                "store.minute_retention_days",
                &format!("must keep minutes at least as long as raw samples ({raw_h} h)"),
                minute_d,
            );
        }
        let store = StoreConfig {
            path: c.path("store.path", &s.path, base),
            raw_retention: hours(raw_h),
            minute_retention: hours(minute_d * 24),
            hour_retention: hours(hour_d * 24),
        };
        let ingest = IngestConfig {
            max_frame_bytes: c.range(
                "ingest.max_frame_bytes",
                raw.ingest.max_frame_bytes,
                4096,
                64 * 1024 * 1024,
            ),
            offline_after: Duration::from_secs(c.range(
                "ingest.offline_after_secs",
                raw.ingest.offline_after_secs,
                2,
                86_400,
            )),
            // At most 1,000,000, which fits usize on every target we build for.
            max_batch_samples: usize::try_from(
                c.range("ingest.max_batch_samples", raw.ingest.max_batch_samples, 1, 1_000_000)
                    .clamp(1, 1_000_000),
            )
            .unwrap_or(1_000_000),
            max_inflight_bytes: c.range(
                "ingest.max_inflight_bytes",
                raw.ingest.max_inflight_bytes,
                1024 * 1024,
                // One reservation is at most u32::MAX bytes (tokio's semaphore takes a u32).
                u64::from(u32::MAX),
            ),
            host_rate_bytes_per_sec: c.range(
                "ingest.host_rate_bytes_per_sec",
                raw.ingest.host_rate_bytes_per_sec,
                1024,
                1024 * 1024 * 1024,
            ),
            host_burst_bytes: raw.ingest.host_burst_bytes,
            // At most 100,000, which fits usize on every target we build for.
            max_concurrent_handshakes: usize::try_from(c.range(
                "ingest.max_concurrent_handshakes",
                raw.ingest.max_concurrent_handshakes,
                1,
                100_000,
            ))
            .unwrap_or(100_000),
        };
        // Every frame the limit admits must fit both the global budget and a host's burst, or
        // it could never be read or stored.
        for (key, value) in [
            ("ingest.max_inflight_bytes", ingest.max_inflight_bytes),
            ("ingest.host_burst_bytes", ingest.host_burst_bytes),
        ] {
            if value < u64::from(ingest.max_frame_bytes) {
                c.problem(
                    key,
                    &format!(
                        "must be at least ingest.max_frame_bytes ({})",
                        ingest.max_frame_bytes
                    ),
                    value,
                );
            }
        }
        let a = &raw.analytics;
        if a.schedule.split_whitespace().count() != 6 {
            c.problem(
                "analytics.schedule",
                "must be a cron expression with 6 fields (sec min hour day month weekday)",
                &a.schedule,
            );
        }
        let analytics = AnalyticsConfig {
            schedule: a.schedule.clone(),
            pricing_file: a
                .pricing_file
                .as_ref()
                .map(|p| c.path("analytics.pricing_file", p, base)),
            policy_file: a.policy_file.as_ref().map(|p| c.path("analytics.policy_file", p, base)),
        };
        let k = &raw.control;
        let control = ControlConfig {
            policy_file: k.policy_file.as_ref().map(|p| c.path("control.policy_file", p, base)),
            interval: Duration::from_secs(c.range(
                "control.interval_secs",
                k.interval_secs,
                1,
                3600,
            )),
            window: Duration::from_secs(c.range("control.window_secs", k.window_secs, 2, 3600)),
            directive_ttl: Duration::from_secs(c.range(
                "control.directive_ttl_secs",
                k.directive_ttl_secs,
                10,
                7 * 24 * 3600,
            )),
        };
        c.finish(origin, Self { listen, tls, store, ingest, analytics, control })
    }

    /// The embedded defaults with paths under `base`.
    pub fn embedded(base: &Path) -> Self {
        // The embedded text is fixed and covered by a unit test.
        Self::parse(EMBEDDED, "<embedded>", base).unwrap_or_else(|e| unreachable!("{e}"))
    }
}

/// Reads `listen.admin_token_file`: refused when unreadable, empty (every client would get 401)
/// or readable by group or others (the token is a password). Returns the trimmed token.
pub fn read_admin_token(path: &Path) -> Result<String, ConfigError> {
    let problem = |what: String| ConfigError::Invalid {
        origin: path.display().to_string(),
        problems: vec![format!("listen.admin_token_file: {what}")],
    };
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(problem(format!(
                "{} is readable by group or others (mode {:o}); the token is a password: run \
                 `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(problem(format!(
            "{} is empty, so every admin request would be refused with 401; write a token into \
             it, e.g. `head -c 32 /dev/urandom | base64 > {} && chmod 600 {}`",
            path.display(),
            path.display(),
            path.display()
        )));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_are_valid() {
        let c = AggregatorConfig::embedded(Path::new("/d"));
        assert_eq!(c.listen.admin.to_string(), "127.0.0.1:7070");
        assert_eq!(c.store.path, Path::new("/d/store"));
        assert_eq!(c.ingest.max_frame_bytes, 4 * 1024 * 1024);
    }

    #[test]
    fn every_bad_value_is_named() {
        let text = r#"
[listen]
quic = "7443"
admin = "0.0.0.0:7070"
[tls]
ca_cert = "ca.pem"
cert = "s.pem"
key = "s.key"
[store]
path = "store"
raw_retention_hours = 0
minute_retention_days = 9223372036854775807
hour_retention_days = 99999999
[ingest]
max_frame_bytes = 10
"#;
        let err =
            AggregatorConfig::parse(text, "agg.toml", Path::new(".")).unwrap_err().to_string();
        for needle in [
            "listen.quic: must be an IP address and port",
            "listen.admin: must be a loopback address",
            "store.raw_retention_hours: must be 1..=8760, got 0",
            "store.hour_retention_days",
            "store.minute_retention_days: must be 1..=3650, got 9223372036854775807",
            "ingest.max_frame_bytes: must be 4096..=67108864, got 10",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn admin_token_file_is_checked_at_load() {
        // Regression (issue 8, hole 9): an empty or world-readable token file was accepted; the
        // empty one then refused every client with 401.
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("admin.token");
        let config = dir.path().join("aggregator.toml");
        std::fs::write(
            &config,
            "[listen]\nadmin = \"127.0.0.1:7070\"\nadmin_token_file = \"admin.token\"\n\
             [tls]\nca_cert = \"ca.pem\"\ncert = \"s.pem\"\nkey = \"s.key\"\n\
             [store]\npath = \"store\"\n",
        )
        .unwrap();
        let set = |text: &str, mode: u32| {
            std::fs::write(&token, text).unwrap();
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        set("  \n", 0o600);
        let err = AggregatorConfig::load(&config).unwrap_err().to_string();
        assert!(err.contains("listen.admin_token_file") && err.contains("is empty"), "{err}");
        set("s3cret\n", 0o644);
        let err = AggregatorConfig::load(&config).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("mode 644"), "{err}");
        set("s3cret\n", 0o600);
        AggregatorConfig::load(&config).unwrap();
        assert_eq!(read_admin_token(&token).unwrap(), "s3cret");
    }
}
