//! `flotilla up`: a one-host fleet on this machine, for a first try.
//!
//! Creates a data directory with a dev CA, a server certificate and a certificate for this host
//! (kept across runs), writes the effective configs there for reference, then runs an
//! aggregator and an agent in this process until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use common::config::agent::AgentConfig;
use common::config::aggregator::AggregatorConfig;
use common::ids::HostId;
use common::tls::{self, Ca};
use tokio_util::sync::CancellationToken;

/// What `flotilla up` was asked for.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Data directory (certificates, store, spool).
    pub data_dir: PathBuf,
    /// Aggregator QUIC address.
    pub quic: SocketAddr,
    /// Admin API address.
    pub admin: SocketAddr,
    /// The agent's inference API address.
    pub inference: SocketAddr,
    /// Agent sampling interval, ms.
    pub sample_ms: u64,
    /// Agent uplink interval, s.
    pub uplink_secs: u64,
    /// This machine's cost per hour as an owned host, USD (its `hourly_cost_usd` label).
    pub hourly_cost: f64,
}

/// The default hourly cost of the machine `flotilla up` runs on, as an owned host: a 5,000 USD
/// server amortized over 36 months (26,298 h: 0.19/h) plus 400 W at 0.15 USD/kWh (0.06/h). An
/// assumption, not a quote; `--hourly-cost` sets the real figure.
pub const OWNED_HOURLY_COST_USD: f64 = 0.25;

/// How often `flotilla up` runs analytics: every 30 s, so costs, a plan and a forecast show
/// within a minute of starting (a production aggregator's default is every 5 minutes).
const UP_ANALYTICS_SCHEDULE: &str = "*/30 * * * * *";

/// Runs the one-host fleet until Ctrl-C or SIGTERM.
pub fn run(opts: UpOptions) -> anyhow::Result<()> {
    // Warnings and errors only by default, so the welcome text stays readable; FLOTILLA_LOG=info
    // shows connections and batches.
    let filter = std::env::var("FLOTILLA_LOG").unwrap_or_else(|_| "warn".to_owned());
    common::daemon::init_logging(&filter, "warn");
    let host = local_host_id();
    prepare_tls(&opts.data_dir, &host)?;
    let models = opts.data_dir.join("models");
    agent::serving::demo::install_demo(&models)
        .with_context(|| format!("writing the demo model under {}", models.display()))?;
    let agg_text = aggregator_config(&opts);
    write_config(&opts.data_dir.join("aggregator.toml"), &agg_text)?;
    let agg_config =
        AggregatorConfig::parse(&agg_text, "flotilla up (aggregator)", &opts.data_dir)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async move {
        let bound = crate::Bound::bind(&agg_config).await.context("starting the aggregator")?;
        let admin = bound.admin_addr().unwrap_or(opts.admin);
        let quic = bound.quic_addr().unwrap_or(opts.quic);
        // The agent dials the address actually bound (port 0 picks a free one).
        let agent_text = agent_config(&opts, quic);
        write_config(&opts.data_dir.join("agent.toml"), &agent_text)?;
        let agent_config = AgentConfig::parse(&agent_text, "flotilla up (agent)", &opts.data_dir)?;
        // Bound here so the welcome shows the real port (`--inference 127.0.0.1:0` picks one).
        let listener = agent_config
            .serving
            .as_ref()
            .map(agent::serving::Serving::bind)
            .transpose()
            .context("starting the agent's inference API")?;
        let inference =
            listener.as_ref().and_then(|l| l.local_addr().ok()).unwrap_or(opts.inference);
        let shutdown = CancellationToken::new();
        let aggregator = tokio::spawn(crate::run(agg_config, bound, shutdown.clone()));
        let endpoint = agent::client_endpoint(&agent_config).context("starting the agent")?;
        let agent =
            tokio::spawn(agent::run_bound(agent_config, endpoint, listener, shutdown.clone()));
        print_welcome(
            &opts.data_dir,
            &host,
            quic,
            admin,
            connect_addr(inference),
            opts.hourly_cost,
        );
        // First Ctrl-C/SIGTERM: clean stop; a second one exits at once.
        tokio::spawn(common::daemon::stop_on_signal(shutdown.clone()));
        shutdown.cancelled().await;
        println!("Stopping… (Ctrl-C again to exit at once)");
        let (a, b) = tokio::join!(agent, aggregator);
        a.context("agent task")?.context("agent")?;
        b.context("aggregator task")?.context("aggregator")?;
        Ok(())
    });
    // Blocking tasks still running must not hold the exit past the clean stop.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// This machine's host name as a valid host id (`local` if it has none usable).
pub fn local_host_id() -> HostId {
    let raw = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    host_id_from(&raw)
}

/// A valid host id made from a host name: lower case, other characters as '-', leading
/// punctuation dropped, cut to the id length limit; `local` when nothing usable is left.
fn host_id_from(raw: &str) -> HostId {
    let cleaned: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(common::ids::HOST_ID_MAX_LEN)
        .collect();
    HostId::new(&cleaned)
        .unwrap_or_else(|_| HostId::new("local").unwrap_or_else(|e| unreachable!("{e}")))
}

fn prepare_tls(data_dir: &Path, host: &HostId) -> anyhow::Result<()> {
    let dir = data_dir.join("tls");
    if !dir.join(tls::files::CA_CERT).exists() {
        tls::init_ca_dir(&dir, &[], 825, false).context("creating the dev CA")?;
    }
    let (cert, key) = (dir.join("host.pem"), dir.join("host.key"));
    let issued_for = dir.join("host.id");
    let current = std::fs::read_to_string(&issued_for).unwrap_or_default();
    if !cert.exists() || current.trim() != host.as_str() {
        let pair = Ca::load(&dir)?.issue_host(host, 365)?;
        tls::write_private(&key, &pair.key_pem)?;
        tls::write_public(&cert, &pair.cert_pem)?;
        std::fs::write(&issued_for, host.as_str())
            .with_context(|| format!("writing {}", issued_for.display()))?;
    }
    Ok(())
}

fn write_config(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn aggregator_config(opts: &UpOptions) -> String {
    format!(
        "# Written by `flotilla up`; see config/aggregator.toml for every key.\n\
         [listen]\nquic = \"{}\"\nadmin = \"{}\"\n\n\
         [tls]\nca_cert = \"tls/ca.pem\"\ncert = \"tls/server.pem\"\nkey = \"tls/server.key\"\n\n\
         [store]\npath = \"store\"\n\n         [analytics]\nschedule = \"{UP_ANALYTICS_SCHEDULE}\"\n",
        opts.quic, opts.admin
    )
}

fn agent_config(opts: &UpOptions, quic: SocketAddr) -> String {
    format!(
        "# Written by `flotilla up`; see config/agent.toml for every key.\n\
         [uplink]\naggregator = \"{}\"\ninterval_secs = {}\n\n\
         [tls]\nca_cert = \"tls/ca.pem\"\ncert = \"tls/host.pem\"\nkey = \"tls/host.key\"\n\n\
         [telemetry]\nsample_interval_ms = {}\n\n\
         [spool]\npath = \"spool\"\n\n\
         [serving]\nlisten = \"{}\"\nmodel_repository = \"models\"\n\n         # Priced as an owned machine (flotilla up --hourly-cost USD).\n         [labels]\nlifecycle = \"owned\"\nhourly_cost_usd = \"{}\"\n",
        connect_addr(quic),
        opts.uplink_secs,
        opts.sample_ms,
        opts.inference,
        opts.hourly_cost
    )
}

/// The address an agent on this machine dials for a listener on `listen` (0.0.0.0 -> 127.0.0.1).
fn connect_addr(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    }
}

fn print_welcome(
    data_dir: &Path,
    host: &HostId,
    quic: SocketAddr,
    admin: SocketAddr,
    inference: SocketAddr,
    cost: f64,
) {
    let api = if admin.port() == 7070 && admin.ip().is_loopback() {
        String::new()
    } else {
        format!(" --api http://{admin}")
    };
    println!(
        "Flotilla is up: an aggregator and an agent for host \"{host}\" on this machine.\n\
         \x20 data:       {data}\n\
         \x20 aggregator: QUIC {quic}, admin API http://{admin}\n\
         \x20 agent:      inference API http://{inference} (KServe v2), serving the demo model\n\
         \n\
         Try, in another terminal (the first batch arrives within a few seconds):\n\
         \x20 flotilla{api} hosts\n\
         \x20 flotilla{api} host {host}\n\
         \x20 flotilla{api} metrics {host} cpu_util_pct --since 10m --plot\n\
         \x20 flotilla{api} costs      (this machine at {cost} USD/h as owned; --hourly-cost)\n\
         \x20 flotilla{api} plan\n\
         \x20 flotilla{api} forecast demo   (analytics run every 30 s)\n\
         \x20 curl -s http://{admin}/metrics\n\
         \x20 curl -s http://{inference}/v2/models/demo/infer -d '{{\"inputs\":[{{\"name\":\"features\",\"shape\":[1,4],\"datatype\":\"FP32\",\"data\":[5.1,3.5,1.4,0.2]}}]}}'\n\
         \n\
         Press Ctrl-C to stop; data stays in {data} for the next run.",
        data = data_dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn generated_configs_parse() {
        let opts = UpOptions {
            data_dir: PathBuf::from("/tmp/x"),
            quic: "0.0.0.0:7443".parse().unwrap(),
            admin: "127.0.0.1:7070".parse().unwrap(),
            inference: "127.0.0.1:8000".parse().unwrap(),
            sample_ms: 500,
            uplink_secs: 2,
            hourly_cost: 0.4,
        };
        let a = aggregator_config(&opts);
        let b = agent_config(&opts, opts.quic);
        let agg = AggregatorConfig::parse(&a, "a", &opts.data_dir).unwrap();
        assert_eq!(agg.store.path, Path::new("/tmp/x/store"));
        let agent = AgentConfig::parse(&b, "b", &opts.data_dir).unwrap();
        assert_eq!(agent.uplink.aggregator.to_string(), "127.0.0.1:7443");
        assert_eq!(agent.telemetry.sample_interval, Duration::from_millis(500));
        // Priced as an owned machine at the given rate; analytics every 30 s.
        assert_eq!(agent.labels.get("lifecycle").map(String::as_str), Some("owned"));
        assert_eq!(agent.labels.get("hourly_cost_usd").map(String::as_str), Some("0.4"));
        assert_eq!(agg.analytics.schedule, UP_ANALYTICS_SCHEDULE);
    }

    #[test]
    fn host_ids_are_made_from_host_names() {
        let id = |raw: &str| host_id_from(raw).as_str().to_owned();
        assert_eq!(id("gpu-node-7\n"), "gpu-node-7");
        assert_eq!(id("  GPU_Node.Example.COM \n"), "gpu_node.example.com");
        assert_eq!(id("rack 4/slot#2"), "rack-4-slot-2");
        assert_eq!(id("--.node"), "node", "leading punctuation is dropped");
        assert_eq!(id(""), "local");
        assert_eq!(id("\n"), "local");
        assert_eq!(id("---"), "local");
        let long = "a".repeat(common::ids::HOST_ID_MAX_LEN + 10);
        assert_eq!(id(&long).len(), common::ids::HOST_ID_MAX_LEN);
        // Whatever this machine is called, the id is one the fleet accepts.
        assert!(HostId::new(local_host_id().as_str()).is_ok());
    }
}
