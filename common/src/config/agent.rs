//! The agent's configuration (`/etc/flotilla/agent.toml`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Checker, ConfigError, from_toml, read_file};

/// The defaults `flotilla up` and tests start from: every key at its default, paths relative.
pub const EMBEDDED: &str = r#"
[uplink]
aggregator = "127.0.0.1:7443"

[tls]
ca_cert = "tls/ca.pem"
cert = "tls/host.pem"
key = "tls/host.key"

[spool]
path = "spool"
"#;

/// The agent's validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where and how to send telemetry.
    pub uplink: UplinkConfig,
    /// Certificates.
    pub tls: AgentTlsConfig,
    /// What to collect and how often.
    pub telemetry: TelemetryConfig,
    /// The on-disk queue of unacknowledged batches.
    pub spool: SpoolConfig,
    /// Operator labels sent in the inventory.
    pub labels: BTreeMap<String, String>,
    /// Inference serving; `None` when the config has no `[serving]` table.
    pub serving: Option<ServingConfig>,
}

/// `[serving]`, validated: the KServe v2 HTTP API and the model repository.
#[derive(Debug, Clone)]
pub struct ServingConfig {
    /// HTTP listen address (Triton's convention is port 8000).
    pub listen: SocketAddr,
    /// Directory holding `<model>/<version>/model.onnx` and `<model>/config.toml`.
    pub model_repository: PathBuf,
    /// Largest request body accepted, bytes.
    pub max_request_bytes: usize,
    /// File holding the bearer token that lets non-loopback peers load and unload models;
    /// `None`: repository control only from loopback. Checked by [`AgentConfig::load`].
    pub admin_token_file: Option<PathBuf>,
    /// Admission limits of the inference API.
    pub limits: ServingLimits,
}

/// The inference API's admission limits (`[serving]` keys). Over a limit, a request is refused
/// at once with a JSON error naming the key, never queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingLimits {
    /// Request body bytes in flight (read, parsed, queued or computing) over all models.
    pub max_inflight_bytes: usize,
    /// Request body bytes in flight for one model version.
    pub max_model_inflight_bytes: usize,
    /// HTTP requests handled at once; one more gets 503.
    pub max_concurrent_requests: usize,
    /// Longest an HTTP request may take before it is answered 504.
    pub request_timeout: Duration,
    /// Distinct values of the free (client-chosen, non-batch) dims a model version accepts
    /// before refusing new ones; each costs a tract plan.
    pub max_shapes_per_model: usize,
}

impl Default for ServingLimits {
    fn default() -> Self {
        Self {
            max_inflight_bytes: usize::try_from(default_max_inflight_bytes()).unwrap_or(usize::MAX),
            max_model_inflight_bytes: usize::try_from(default_max_model_inflight_bytes())
                .unwrap_or(usize::MAX),
            max_concurrent_requests: usize::try_from(default_max_concurrent_requests())
                .unwrap_or(usize::MAX),
            request_timeout: Duration::from_millis(default_request_timeout_ms()),
            max_shapes_per_model: usize::try_from(default_max_shapes_per_model())
                .unwrap_or(usize::MAX),
        }
    }
}

/// `[uplink]`, validated.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// Aggregator QUIC address (a DNS name or IP, and a port).
    pub aggregator: AggregatorAddr,
    /// Name to expect in the aggregator's certificate.
    pub server_name: String,
    /// How often a batch is sealed and sent.
    pub interval: Duration,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

/// Where the aggregator listens: a host (DNS name, IPv4 or IPv6 literal) and a UDP port. Names
/// are resolved at every connection attempt, so a moved aggregator is found again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregatorAddr {
    /// DNS name or IP literal (without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl AggregatorAddr {
    /// Parses `host:port`, `1.2.3.4:port` or `[v6]:port`.
    pub fn parse(s: &str) -> Option<Self> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return (addr.port() != 0)
                .then(|| Self { host: addr.ip().to_string(), port: addr.port() });
        }
        let (host, port) = s.rsplit_once(':')?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
            });
        valid.then(|| Self { host: host.to_owned(), port })
    }

    /// Whether the host is an IPv6 literal (the agent then binds an IPv6 socket).
    pub fn is_ipv6_literal(&self) -> bool {
        self.host.parse::<std::net::Ipv6Addr>().is_ok()
    }
}

impl std::fmt::Display for AggregatorAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_ipv6_literal() {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `[tls]`, validated (paths resolved).
#[derive(Debug, Clone)]
pub struct AgentTlsConfig {
    /// Fleet CA certificate.
    pub ca_cert: PathBuf,
    /// This host's certificate.
    pub cert: PathBuf,
    /// This host's key.
    pub key: PathBuf,
}

/// `[telemetry]`, validated.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Time between samples.
    pub sample_interval: Duration,
    /// Whether to read NVIDIA GPUs.
    pub nvml: NvmlMode,
    /// Whether to read `/sys/class/hwmon`.
    pub hwmon: bool,
    /// Commands printing accelerator readings as JSON lines.
    pub exec: Vec<ExecSourceConfig>,
}

/// How the NVML collector behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NvmlMode {
    /// Use NVML when the driver is present; log one line and go on when it is not.
    Auto,
    /// Never load NVML.
    Off,
    /// Fail at start if NVML cannot be loaded (for GPU hosts that must report GPUs).
    Required,
}

/// One `[[telemetry.exec]]` source, validated.
#[derive(Debug, Clone)]
pub struct ExecSourceConfig {
    /// Source name (`exec:NAME` in readings).
    pub name: String,
    /// Program and arguments.
    pub command: Vec<String>,
    /// How long one run may take.
    pub timeout: Duration,
}

/// `[spool]`, validated.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// sled directory.
    pub path: PathBuf,
    /// Cap on stored batches, bytes; the oldest are dropped (and counted) beyond it.
    pub max_bytes: u64,
}

// === raw ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentConfig {
    /// Where and how to send telemetry.
    uplink: RawUplink,
    /// Certificates (paths relative to the config file's directory).
    tls: RawTls,
    /// What to collect.
    #[serde(default)]
    telemetry: RawTelemetry,
    /// On-disk queue.
    spool: RawSpool,
    /// Free-form labels (instance_type, lifecycle, zone, ...).
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Inference serving (off when absent).
    serving: Option<RawServing>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServing {
    #[serde(default = "default_serving_listen")]
    listen: String,
    model_repository: PathBuf,
    #[serde(default = "default_max_request_bytes")]
    max_request_bytes: u64,
    /// Bearer-token file for repository control from non-loopback peers.
    admin_token_file: Option<PathBuf>,
    /// Request bytes in flight over all models.
    #[serde(default = "default_max_inflight_bytes")]
    max_inflight_bytes: u64,
    /// Request bytes in flight per model version.
    #[serde(default = "default_max_model_inflight_bytes")]
    max_model_inflight_bytes: u64,
    /// HTTP requests handled at once.
    #[serde(default = "default_max_concurrent_requests")]
    max_concurrent_requests: u64,
    /// Per-request time limit, ms.
    #[serde(default = "default_request_timeout_ms")]
    request_timeout_ms: u64,
    /// Distinct free-dim shapes per model version.
    #[serde(default = "default_max_shapes_per_model")]
    max_shapes_per_model: u64,
}

fn default_serving_listen() -> String {
    "0.0.0.0:8000".to_owned()
}
fn default_max_request_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_inflight_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_max_model_inflight_bytes() -> u64 {
    128 * 1024 * 1024
}
fn default_max_concurrent_requests() -> u64 {
    256
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_max_shapes_per_model() -> u64 {
    16
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    /// `host:port` of the aggregator's QUIC listener (DNS name or IP literal).
    aggregator: String,
    /// Name in the aggregator's certificate.
    #[serde(default = "default_server_name")]
    server_name: String,
    /// Seconds between sealed batches.
    #[serde(default = "default_uplink_secs")]
    interval_secs: u64,
    /// First reconnect delay, ms.
    #[serde(default = "default_backoff_initial_ms")]
    backoff_initial_ms: u64,
    /// Longest reconnect delay, ms.
    #[serde(default = "default_backoff_max_ms")]
    backoff_max_ms: u64,
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
struct RawTelemetry {
    /// Milliseconds between samples.
    #[serde(default = "default_sample_ms")]
    sample_interval_ms: u64,
    /// auto | off | required.
    #[serde(default = "default_nvml")]
    nvml: NvmlMode,
    /// Read hwmon sensors.
    #[serde(default)]
    hwmon: bool,
    /// Exec sources.
    #[serde(default)]
    exec: Vec<RawExec>,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            sample_interval_ms: default_sample_ms(),
            nvml: default_nvml(),
            hwmon: false,
            exec: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    name: String,
    command: Vec<String>,
    #[serde(default = "default_exec_timeout_ms")]
    timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    path: PathBuf,
    #[serde(default = "default_spool_max_bytes")]
    max_bytes: u64,
}

fn default_server_name() -> String {
    crate::tls::DEFAULT_SERVER_NAME.to_owned()
}
fn default_uplink_secs() -> u64 {
    5
}
fn default_backoff_initial_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_sample_ms() -> u64 {
    1000
}
fn default_nvml() -> NvmlMode {
    NvmlMode::Auto
}
fn default_exec_timeout_ms() -> u64 {
    2000
}
fn default_spool_max_bytes() -> u64 {
    256 * 1024 * 1024
}

// === impl AgentConfig ===

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (text, origin, base) = read_file(path)?;
        let config = Self::parse(&text, &origin, &base)?;
        if let Some(file) = config.serving.as_ref().and_then(|s| s.admin_token_file.as_ref()) {
            read_token_file(file).map_err(|problem| ConfigError::Invalid {
                origin,
                problems: vec![format!("serving.admin_token_file: {problem}")],
            })?;
        }
        Ok(config)
    }

    /// Parses and validates TOML text; relative paths are resolved against `base`.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawAgentConfig = from_toml(text, origin)?;
        let mut c = Checker::default();
        let u = &raw.uplink;
        let uplink = UplinkConfig {
            aggregator: AggregatorAddr::parse(&u.aggregator).unwrap_or_else(|| {
                c.problem(
                    "uplink.aggregator",
                    "must be a host name or IP address and a port, e.g. aggregator.example.com:7443",
                    &u.aggregator,
                );
                AggregatorAddr { host: "127.0.0.1".into(), port: 7443 }
            }),
            server_name: u.server_name.clone(),
            interval: Duration::from_secs(c.range(
                "uplink.interval_secs",
                u.interval_secs,
                1,
                3600,
            )),
            backoff_initial: Duration::from_millis(c.range(
                "uplink.backoff_initial_ms",
                u.backoff_initial_ms,
                10,
                60_000,
            )),
            backoff_max: Duration::from_millis(c.range(
                "uplink.backoff_max_ms",
                u.backoff_max_ms,
                100,
                3_600_000,
            )),
        };
        if u.server_name.is_empty() {
            c.problem(
                "uplink.server_name",
                "must be the DNS name in the aggregator's certificate",
                "",
            );
        }
        if u.backoff_max_ms < u.backoff_initial_ms {
            c.problem(
                "uplink.backoff_max_ms",
                &format!("must be >= uplink.backoff_initial_ms ({})", u.backoff_initial_ms),
                u.backoff_max_ms,
            );
        }
        let tls = AgentTlsConfig {
            ca_cert: c.path("tls.ca_cert", &raw.tls.ca_cert, base),
            cert: c.path("tls.cert", &raw.tls.cert, base),
            key: c.path("tls.key", &raw.tls.key, base),
        };
        let t = &raw.telemetry;
        let mut exec = Vec::new();
        for (i, e) in t.exec.iter().enumerate() {
            let key = format!("telemetry.exec[{i}]");
            let valid_name = !e.name.is_empty()
                && e.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch));
            if !valid_name {
                c.problem(
                    &format!("{key}.name"),
                    "must be 1+ letters, digits, '-' or '_'",
                    &e.name,
                );
            }
            if e.command.first().is_none_or(String::is_empty) {
                c.problem(
                    &format!("{key}.command"),
                    "must name a program, e.g. [\"/usr/bin/fpga-stats\", \"--json\"]",
                    &e.command,
                );
            }
            let timeout_ms = c.range(&format!("{key}.timeout_ms"), e.timeout_ms, 10, 60_000);
            exec.push(ExecSourceConfig {
                name: e.name.clone(),
                command: e.command.clone(),
                timeout: Duration::from_millis(timeout_ms),
            });
        }
        let telemetry = TelemetryConfig {
            sample_interval: Duration::from_millis(c.range(
                "telemetry.sample_interval_ms",
                t.sample_interval_ms,
                100,
                3_600_000,
            )),
            nvml: t.nvml,
            hwmon: t.hwmon,
            exec,
        };
        let spool = SpoolConfig {
            path: c.path("spool.path", &raw.spool.path, base),
            max_bytes: c.range("spool.max_bytes", raw.spool.max_bytes, 1024 * 1024, 1 << 40),
        };
        for k in raw.labels.keys() {
            if k.is_empty() || !k.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                c.problem(
                    &format!("labels.{k}"),
                    "label keys must be letters, digits, '-', '_' or '.'",
                    k,
                );
            }
        }
        let serving = raw.serving.as_ref().map(|sv| {
            let size = |c: &mut Checker, key: &str, v: u64, lo: u64, hi: u64| {
                usize::try_from(c.range(key, v, lo, hi)).unwrap_or(usize::MAX)
            };
            let max_request_bytes =
                size(&mut c, "serving.max_request_bytes", sv.max_request_bytes, 1024, 1 << 32);
            let max_inflight_bytes =
                size(&mut c, "serving.max_inflight_bytes", sv.max_inflight_bytes, 1024, 1 << 40);
            let max_model_inflight_bytes = size(
                &mut c,
                "serving.max_model_inflight_bytes",
                sv.max_model_inflight_bytes,
                1024,
                1 << 40,
            );
            if max_model_inflight_bytes < max_request_bytes {
                c.problem(
                    "serving.max_model_inflight_bytes",
                    &format!(
                        "must be at least serving.max_request_bytes ({max_request_bytes}), or no request that large could ever be admitted"
                    ),
                    max_model_inflight_bytes,
                );
            }
            if max_inflight_bytes < max_model_inflight_bytes {
                c.problem(
                    "serving.max_inflight_bytes",
                    &format!(
                        "must be at least serving.max_model_inflight_bytes ({max_model_inflight_bytes})"
                    ),
                    max_inflight_bytes,
                );
            }
            let limits = ServingLimits {
                max_inflight_bytes,
                max_model_inflight_bytes,
                max_concurrent_requests: size(
                    &mut c,
                    "serving.max_concurrent_requests",
                    sv.max_concurrent_requests,
                    1,
                    65_536,
                ),
                request_timeout: Duration::from_millis(c.range(
                    "serving.request_timeout_ms",
                    sv.request_timeout_ms,
                    1,
                    3_600_000,
                )),
                max_shapes_per_model: size(
                    &mut c,
                    "serving.max_shapes_per_model",
                    sv.max_shapes_per_model,
                    1,
                    4096,
                ),
            };
            ServingConfig {
                listen: c.socket_addr("serving.listen", &sv.listen),
                model_repository: c.path("serving.model_repository", &sv.model_repository, base),
                max_request_bytes,
                admin_token_file: sv
                    .admin_token_file
                    .as_ref()
                    .map(|p| c.path("serving.admin_token_file", p, base)),
                limits,
            }
        });
        let config = Self { uplink, tls, telemetry, spool, labels: raw.labels, serving };
        c.finish(origin, config)
    }

    /// The embedded defaults with paths under `base`.
    pub fn embedded(base: &Path) -> Self {
        // The embedded text is fixed and covered by a unit test.
        Self::parse(EMBEDDED, "<embedded>", base).unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// A short fingerprint of the settings, sent as Hello.config_version.
    pub fn version(&self) -> String {
        format!(
            "s{}ms-u{}s",
            self.telemetry.sample_interval.as_millis(),
            self.uplink.interval.as_secs()
        )
    }
}

/// Reads a bearer-token file: the token is its content with surrounding whitespace trimmed.
/// Refuses a file that is missing, empty, or readable by every user (`chmod 600` it).
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(format!(
                "{} is readable by every user (mode {:o}); run chmod 600 on it",
                path.display(),
                mode & 0o777
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "{} is empty; put a long random token in it (e.g. openssl rand -hex 32)",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregator_addresses() {
        let a = AggregatorAddr::parse("agg.example.com:7443").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("agg.example.com", 7443));
        assert_eq!(AggregatorAddr::parse("10.0.0.5:9").unwrap().to_string(), "10.0.0.5:9");
        let v6 = AggregatorAddr::parse("[::1]:7443").unwrap();
        assert!(v6.is_ipv6_literal());
        assert_eq!(v6.to_string(), "[::1]:7443");
        for bad in ["nowhere", "host:0", "host:99999", ":7443", "a..b:1", "sp ace:1", "-x:1"] {
            assert!(AggregatorAddr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = AgentConfig::embedded(Path::new("/data"));
        assert_eq!(c.uplink.interval, Duration::from_secs(5));
        assert_eq!(c.telemetry.sample_interval, Duration::from_secs(1));
        assert_eq!(c.spool.path, Path::new("/data/spool"));
        assert_eq!(c.uplink.server_name, "flotilla-aggregator");
    }

    #[test]
    fn every_bad_value_is_named() {
        let text = r#"
[uplink]
aggregator = "nowhere"
interval_secs = 0
backoff_initial_ms = 5000
backoff_max_ms = 1000
[tls]
ca_cert = ""
cert = "c.pem"
key = "c.key"
[telemetry]
sample_interval_ms = 5
[[telemetry.exec]]
name = "bad name"
command = []
[spool]
path = "s"
[serving]
listen = "port 8000"
model_repository = "models"
max_request_bytes = 10
max_concurrent_requests = 0
request_timeout_ms = 0
max_shapes_per_model = 0
max_model_inflight_bytes = 2048
max_inflight_bytes = 1024
"#;
        let err = AgentConfig::parse(text, "agent.toml", Path::new(".")).unwrap_err().to_string();
        for needle in [
            "uplink.aggregator: must be a host name or IP address and a port, e.g. aggregator.example.com:7443, got \"nowhere\"",
            "uplink.interval_secs: must be 1..=3600, got 0",
            "uplink.backoff_max_ms",
            "tls.ca_cert",
            "telemetry.sample_interval_ms: must be 100..=3600000, got 5",
            "telemetry.exec[0].name",
            "telemetry.exec[0].command",
            "serving.listen: must be an IP address and port such as 127.0.0.1:7443, got \"port 8000\"",
            "serving.max_request_bytes: must be 1024..=4294967296, got 10",
            "serving.max_concurrent_requests: must be 1..=65536, got 0",
            "serving.request_timeout_ms: must be 1..=3600000, got 0",
            "serving.max_shapes_per_model: must be 1..=4096, got 0",
            "serving.max_inflight_bytes: must be at least serving.max_model_inflight_bytes (2048)",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    #[test]
    fn serving_defaults_and_admin_token_file_checks() {
        let dir = tempfile::tempdir().unwrap();
        let toml =
            |extra: &str| format!("{EMBEDDED}\n[serving]\nmodel_repository = \"models\"\n{extra}",);
        let c = AgentConfig::parse(&toml(""), "a.toml", dir.path()).unwrap();
        let s = c.serving.unwrap();
        assert_eq!(s.listen.to_string(), "0.0.0.0:8000");
        assert_eq!(s.limits, ServingLimits::default());
        assert_eq!(s.limits.request_timeout, Duration::from_secs(30));
        assert!(s.admin_token_file.is_none());

        let file = dir.path().join("agent.toml");
        let token = dir.path().join("token");
        std::fs::write(&file, toml("admin_token_file = \"token\"\n")).unwrap();
        let err = AgentConfig::load(&file).unwrap_err().to_string();
        assert!(err.contains("serving.admin_token_file") && err.contains("token"), "{err}");
        std::fs::write(&token, "  \n").unwrap();
        set_mode(&token, 0o600);
        let err = AgentConfig::load(&file).unwrap_err().to_string();
        assert!(err.contains("serving.admin_token_file") && err.contains("is empty"), "{err}");
        std::fs::write(&token, "s3cret\n").unwrap();
        set_mode(&token, 0o644);
        let err = AgentConfig::load(&file).unwrap_err();
        assert!(err.to_string().contains("readable by every user"), "{err}");
        assert!(matches!(err, ConfigError::Invalid { .. }), "exit 64 needs a ConfigError");
        set_mode(&token, 0o600);
        let c = AgentConfig::load(&file).unwrap();
        let path = c.serving.unwrap().admin_token_file.unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "s3cret");
    }

    fn set_mode(path: &Path, mode: u32) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        #[cfg(not(unix))]
        let _ = (path, mode);
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_name() {
        let text = format!("{EMBEDDED}\n[telemetry]\nsample_every = 3\n");
        let err = AgentConfig::parse(&text, "a.toml", Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("sample_every"), "{err}");
        let text = EMBEDDED.replace("[spool]", "[spool]\nmax_bytes = \"lots\"");
        let err = AgentConfig::parse(&text, "a.toml", Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("max_bytes"), "{err}");
        let text = format!("{EMBEDDED}\n[telemetry]\nnvml = \"maybe\"\n");
        let err = AgentConfig::parse(&text, "a.toml", Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("maybe") && err.contains("auto"), "{err}");
    }
}
