//! The `flotilla` operator CLI: argument parsing (clap derive), dispatch of each command to the
//! admin API [`client`], output through [`render`] (tables) or `--json`, and exit codes.
//!
//! Exit codes: 0 success; 1 any other error (printed as `error: {:#}`, the whole chain);
//! 2 usage errors (from clap); 69 (`EX_UNAVAILABLE`) when the aggregator cannot be reached.
//! Settings come from flags first, then the environment (`FLOTILLA_API`, `FLOTILLA_TOKEN`),
//! then defaults; the environment is passed in, so tests never mutate the process's.

pub mod analytics;
pub mod client;
pub mod control;
pub mod optimize;
pub mod plot;
pub mod render;
pub mod simulate;

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use self::client::{Client, ClientError, DEFAULT_API};
use crate::views::{MetricSeries, RevokeResult};

/// Exit code when the aggregator cannot be reached (`EX_UNAVAILABLE` from sysexits.h).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Sparkline width when the terminal width (`COLUMNS`) is unknown.
const DEFAULT_PLOT_WIDTH: usize = 80;

/// Query and control a Flotilla fleet through the aggregator's admin API.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, propagate_version = true)]
pub struct Cli {
    /// Admin API base URL [env: FLOTILLA_API] [default: http://127.0.0.1:7070]
    #[arg(long, global = true, value_name = "URL")]
    pub api: Option<String>,
    /// Bearer token for the admin API [env: FLOTILLA_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Print the API's JSON instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The `flotilla` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List hosts: state, last report, GPUs, utilization
    Hosts {
        /// Revoke or re-admit a host instead of listing.
        #[command(subcommand)]
        action: Option<HostsAction>,
    },
    /// Show one host: inventory, latest readings, each GPU and accelerator
    Host {
        /// Host id (its certificate's Common Name)
        host: String,
    },
    /// Show a metric series of a host as a table, or a sparkline with --plot
    Metrics(MetricsArgs),
    /// Run a one-host fleet (aggregator and agent) on this machine, for a first try
    Up(UpArgs),
    /// Fleet-wide serving metrics per model: rates, outcomes, merged latency percentiles
    Models {
        /// Window: a number followed by s, m, h or d
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_since)]
        since: u64,
    },
    /// Demand forecast of a model (requests/s) or host (utilization); `forecast backtest`
    Forecast(analytics::ForecastArgs),
    /// Cost per host and model, idle cost and cost per 1,000 inferences
    Costs,
    /// Cost-saving plans with savings, risk and effort, by priority
    Plan,
    /// Budget status and burn-down; `budgets set|delete` manage API budgets
    Budgets {
        /// Add or delete a budget instead of listing.
        #[command(subcommand)]
        action: Option<analytics::BudgetsAction>,
    },
    /// Active SLO, cost and budget alerts, and their history
    Alerts {
        /// History entries to show
        #[arg(long, default_value_t = 20)]
        history: usize,
    },
    /// Run an analytics pass now, or show the latest one
    Analytics {
        /// run or show
        #[command(subcommand)]
        action: analytics::AnalyticsAction,
    },
    /// Directives and their life: created, sent, answered, by which decision
    Directives(control::DirectivesArgs),
    /// Send an operator's directive to a host, or show one
    Directive {
        /// send or show
        #[command(subcommand)]
        action: control::DirectiveAction,
    },
    /// Search a model's engines, threads, variants and batch sizes on its host, for a strategy
    /// within an accuracy bound, and follow the search to its report
    Optimize(optimize::OptimizeArgs),
    /// Show a model's optimization search on a host: its progress, or its report
    Optimizations(optimize::OptimizationsArgs),
    /// Replay a demand trace through the scaling engine and forecaster, locally
    Simulate(simulate::SimulateArgs),
    /// Scaling policies and where each stands per host; or check a policy file locally
    Policies {
        /// Check this policy file (every problem, by policy and key) without an aggregator
        #[arg(long, value_name = "FILE")]
        check: Option<std::path::PathBuf>,
    },
    /// Decisions: inputs, the rule that fired, the directives made
    Decisions {
        /// Only about this model
        #[arg(long)]
        model: Option<String>,
        /// Most to show, newest first
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// `flotilla hosts revoke|unrevoke HOST`.
#[derive(Debug, Subcommand)]
pub enum HostsAction {
    /// Refuse the host's current certificates and close its connection
    Revoke {
        /// Host id
        host: String,
    },
    /// Lift a revocation, so the host's certificates are accepted again
    Unrevoke {
        /// Host id
        host: String,
    },
}

/// `flotilla metrics HOST METRIC [--since D] [--resolution R] [--plot]`.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Host id
    pub host: String,
    /// Series name, e.g. cpu_util_pct or gpu0_power_mw
    pub metric: String,
    /// How far back: a number followed by s, m, h, d or w (90s, 15m, 1h, 2d, 1w)
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_since)]
    pub since: u64,
    /// Point resolution [default: raw up to 2h, minute up to 2d, else hour]
    #[arg(long, value_enum)]
    pub resolution: Option<ResolutionArg>,
    /// Print a sparkline with min, max and last instead of a table
    #[arg(long)]
    pub plot: bool,
}

/// `--resolution` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResolutionArg {
    /// Every raw sample
    Raw,
    /// One point per minute
    Minute,
    /// One point per hour
    Hour,
}

impl ResolutionArg {
    /// The name the API takes in `?resolution=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Minute => "minute",
            Self::Hour => "hour",
        }
    }
}

/// `flotilla up` flags.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory for the fleet CA, certificates, the store and the agent's spool
    #[arg(long, value_name = "PATH", default_value = "./flotilla-data")]
    pub data_dir: PathBuf,
    /// QUIC address the aggregator listens on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7443")]
    pub quic: SocketAddr,
    /// Admin API address the aggregator listens on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub admin: SocketAddr,
    /// Address the agent's inference API (KServe v2 HTTP) listens on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    pub inference: SocketAddr,
    /// Agent sampling interval in milliseconds
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub sample_ms: u64,
    /// Agent uplink interval in seconds
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub uplink_secs: u64,
    /// What this machine costs per hour, in USD, as an owned host (the default assumes a
    /// 5,000 USD server over 36 months plus 400 W at 0.15 USD/kWh: 0.25)
    #[arg(long, value_name = "USD", default_value_t = crate::up::OWNED_HOURLY_COST_USD,
          value_parser = parse_hourly_cost)]
    pub hourly_cost: f64,
}

/// A price per hour: a finite number, 0 or more.
fn parse_hourly_cost(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("invalid --hourly-cost {text:?}: use a price per hour such as 0.25")),
    }
}

/// Runs the CLI with the process's arguments and environment.
pub fn main() -> ExitCode {
    main_with(std::env::args_os(), &|key: &str| std::env::var(key).ok())
}

/// Runs the CLI with these arguments (the first is the program name) and this environment
/// lookup, printing to stdout and stderr, and returns the exit code.
pub fn main_with<I, T>(args: I, env: &dyn Fn(&str) -> Option<String>) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            // Help and version go to stdout with 0; usage errors to stderr with 2.
            let _ = err.print();
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2));
        }
    };
    match run(cli, env) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Error texts can quote the server or an agent: escape them like any output.
            eprintln!("error: {}", render::escape_output(&format!("{err:#}")));
            exit_code_for(&err)
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let Cli { api, token, json, command } = cli;
    if let Command::Up(up) = command {
        return crate::up::run(crate::up::UpOptions {
            data_dir: up.data_dir,
            quic: up.quic,
            admin: up.admin,
            inference: up.inference,
            sample_ms: up.sample_ms,
            uplink_secs: up.uplink_secs,
            hourly_cost: up.hourly_cost,
        });
    }
    if let Command::Simulate(args) = &command {
        return print(&simulate::run(args, json)?);
    }
    if let Command::Policies { check: Some(file) } = &command {
        return print(&control::check_policies(file, json)?);
    }
    let api = api
        .or_else(|| env("FLOTILLA_API").filter(|v| !v.is_empty()))
        .unwrap_or_else(|| DEFAULT_API.to_owned());
    let token = token.or_else(|| env("FLOTILLA_TOKEN").filter(|v| !v.is_empty()));
    let client = Client::new(&api, token);
    let output = match command {
        Command::Hosts { action: None } => hosts(&client, json)?,
        Command::Hosts { action: Some(HostsAction::Revoke { host }) } => {
            revoke_text(&client.revoke(&host)?, true, json)?
        }
        Command::Hosts { action: Some(HostsAction::Unrevoke { host }) } => {
            revoke_text(&client.unrevoke(&host)?, false, json)?
        }
        Command::Host { host } => {
            let detail = client.host(&host)?;
            if json { to_json(&detail)? } else { render::host_detail(&detail, now_ms()) }
        }
        Command::Metrics(args) => metrics(&client, &args, json, plot_width(env))?,
        Command::Models { since } => analytics::models(&client, since, json)?,
        Command::Forecast(args) => match &args.action {
            Some(analytics::ForecastAction::Backtest(b)) => analytics::backtest(&client, b, json)?,
            None => analytics::forecast(&client, &args, json)?,
        },
        Command::Costs => analytics::costs(&client, json)?,
        Command::Plan => analytics::plan(&client, json)?,
        Command::Budgets { action: None } => analytics::budgets(&client, json)?,
        Command::Budgets { action: Some(analytics::BudgetsAction::Set(a)) } => {
            analytics::budget_set(&client, &a, json)?
        }
        Command::Budgets { action: Some(analytics::BudgetsAction::Delete { name }) } => {
            let left = client.delete_budget(&name)?;
            if json { to_json(&left)? } else { format!("Deleted budget {name}.\n") }
        }
        Command::Alerts { history } => analytics::alerts(&client, history, json)?,
        Command::Analytics { action } => analytics::analytics(&client, &action, json)?,
        Command::Directives(args) => control::directives(&client, &args, json)?,
        Command::Directive { action } => control::directive(&client, &action, json)?,
        Command::Optimize(args) => optimize::optimize(&client, &args, json)?,
        Command::Optimizations(args) => optimize::optimizations(&client, &args, json)?,
        Command::Decisions { model, limit } => {
            control::decisions(&client, model.as_deref(), limit, json)?
        }
        Command::Policies { .. } => control::policies(&client, json)?,
        Command::Up(_) | Command::Simulate(_) => return Ok(()),
    };
    print(&output)
}

/// 69 when anything in the chain says the aggregator was unreachable, 64 for a bad policy
/// file, else 1.
fn exit_code_for(err: &anyhow::Error) -> ExitCode {
    if err.chain().any(|c| c.downcast_ref::<crate::control::policy::PolicyError>().is_some()) {
        return ExitCode::from(64);
    }
    let unreachable = err
        .chain()
        .any(|cause| cause.downcast_ref::<ClientError>().is_some_and(ClientError::is_unreachable));
    ExitCode::from(if unreachable { EXIT_UNAVAILABLE } else { 1 })
}

// === commands ===

fn hosts(client: &Client, json: bool) -> anyhow::Result<String> {
    let hosts = client.hosts()?;
    if json {
        return to_json(&hosts);
    }
    if hosts.is_empty() {
        return Ok(format!(
            "No hosts yet: no agent has connected to the aggregator at {}.\n",
            client.api()
        ));
    }
    Ok(render::hosts_table(&hosts, now_ms()))
}

/// What a revoke (`revoked`) or unrevoke did, in words or JSON.
fn revoke_text(result: &RevokeResult, revoked: bool, json: bool) -> anyhow::Result<String> {
    if json {
        return to_json(result);
    }
    let host = &result.host;
    Ok(if revoked {
        let connection = if result.disconnected {
            "1 open connection closed"
        } else {
            "it had no open connection"
        };
        format!(
            "Revoked {host}: its certificates issued before now are refused; {connection}. Issue \
             a new certificate with `flotilla-aggregator ca issue {host}` to re-admit it.\n"
        )
    } else {
        format!(
            "Lifted the revocation of {host}: its certificates are accepted again at its next \
             connection.\n"
        )
    })
}

fn metrics(
    client: &Client,
    args: &MetricsArgs,
    json: bool,
    width: usize,
) -> anyhow::Result<String> {
    let MetricsArgs { host, metric, since, resolution, plot } = args;
    let series = match client.metric(host, metric, *since, resolution.map(ResolutionArg::as_str)) {
        Ok(series) => series,
        Err(err) if err.status_code() == Some(404) => {
            // Unknown host (an unknown metric answers 200 with no points): name the host's metrics
            // if the host exists after all.
            return Err(match client.metric_names(host) {
                Ok(names) if !names.metrics.contains(metric) => {
                    let has = if names.metrics.is_empty() {
                        "it has none yet".to_owned()
                    } else {
                        format!("it has {}", names.metrics.join(", "))
                    };
                    anyhow::Error::new(err)
                        .context(format!("{host} has no metric {metric:?} ({has})"))
                }
                _ => anyhow::Error::new(err),
            });
        }
        Err(err) => return Err(err.into()),
    };
    if json {
        return to_json(&series);
    }
    let since_text = render::format_duration_secs(*since);
    if series.points.is_empty() {
        let names =
            client.metric_names(host).with_context(|| format!("listing the metrics of {host}"))?;
        return Ok(format!(
            "No points for {metric} on {host} in the last {since_text}.\n{}\n",
            names_list(host, &names.metrics)
        ));
    }
    let mut out = title(&series, &since_text);
    if *plot {
        out.push_str(&render::metric_plot(&series, width));
    } else {
        out.push_str(&render::metric_table(&series));
    }
    Ok(out)
}

fn title(series: &MetricSeries, since_text: &str) -> String {
    let count = series.points.len();
    format!(
        "{} {}, last {since_text}, {} resolution, {count} point{}\n",
        series.host,
        series.metric,
        render::resolution_name(series.resolution),
        if count == 1 { "" } else { "s" }
    )
}

fn names_list(host: &str, names: &[String]) -> String {
    if names.is_empty() {
        format!("{host} has no metrics yet (no sample stored).")
    } else {
        format!("Metrics of {host}: {}", names.join(", "))
    }
}

// === helpers ===

/// Parses `--since`: a positive whole number followed by `s`, `m`, `h`, `d` or `w`, into seconds.
pub fn parse_since(text: &str) -> Result<u64, String> {
    let invalid = || {
        format!("invalid --since value {text:?}: use a number followed by s, m, h, d or w, e.g. 1h")
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
    let (number, unit) = text.split_at(split);
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(invalid()),
    };
    let number: u64 = number.parse().map_err(|_| invalid())?;
    match number.checked_mul(unit_secs) {
        Some(secs) if secs > 0 => Ok(secs),
        _ => Err(invalid()),
    }
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let text = serde_json::to_string_pretty(value).context("encoding the answer as JSON")?;
    // serde_json escapes C0 controls but writes DEL and C1 (e.g. U+009B, a CSI) raw; `\u00XX`
    // is the same JSON string and inert on a terminal.
    let mut out = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        if c.is_control() && c != '\n' {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out.push('\n');
    Ok(out)
}

/// Writes `text` to stdout; a closed pipe (`flotilla hosts | head -1`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let text = render::escape_output(text);
    let mut stdout = io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => {
            Err(err).context("writing to standard output")
        }
        _ => Ok(()),
    }
}

/// Terminal width from `COLUMNS`, else [`DEFAULT_PLOT_WIDTH`].
fn plot_width(env: &dyn Fn(&str) -> Option<String>) -> usize {
    env("COLUMNS")
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&c| c >= 10)
        .unwrap_or(DEFAULT_PLOT_WIDTH)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeMap;
    use std::net::TcpListener;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
    }

    #[test]
    fn since_accepts_each_unit() {
        assert_eq!(parse_since("90s"), Ok(90));
        assert_eq!(parse_since("15m"), Ok(900));
        assert_eq!(parse_since("1h"), Ok(3600));
        assert_eq!(parse_since("2d"), Ok(172_800));
        assert_eq!(parse_since("1w"), Ok(604_800));
    }

    #[test]
    fn since_rejects_bad_values() {
        for bad in ["", "h", "1", "1x", "1.5h", "-1h", "1 h", "0s", "1hh", "99999999999999999999w"]
        {
            let err = parse_since(bad).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "invalid --since value {bad:?}: use a number followed by s, m, h, d or w, \
                     e.g. 1h"
                )
            );
        }
        assert_eq!(
            parse_since("x").unwrap_err(),
            "invalid --since value \"x\": use a number followed by s, m, h, d or w, e.g. 1h"
        );
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let cli = parse(&["--json", "--api", "http://h:1", "hosts"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.api.as_deref(), Some("http://h:1"));
        let cli = parse(&["hosts", "revoke", "gpu-01", "--json", "--token", "t"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.token.as_deref(), Some("t"));
        assert!(matches!(
            cli.command,
            Command::Hosts { action: Some(HostsAction::Revoke { ref host }) } if host == "gpu-01"
        ));
    }

    #[test]
    fn metrics_flags_parse() {
        let cli = parse(&["metrics", "gpu-01", "cpu_util_pct", "--since", "2d", "--plot"]).unwrap();
        let Command::Metrics(args) = cli.command else { panic!("not metrics") };
        assert_eq!(args.since, 172_800);
        assert!(args.plot);
        assert_eq!(args.resolution, None);
        let cli = parse(&["metrics", "h", "m", "--resolution", "minute"]).unwrap();
        let Command::Metrics(args) = cli.command else { panic!("not metrics") };
        assert_eq!(args.since, 3600);
        assert_eq!(args.resolution, Some(ResolutionArg::Minute));

        let err = parse(&["metrics", "h", "m", "--since", "1x"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("invalid --since value \"1x\""), "{err}");
    }

    #[test]
    fn analytics_commands_parse() {
        let cli = parse(&["forecast", "resnet", "--plot", "f.svg"]).unwrap();
        let Command::Forecast(f) = cli.command else { panic!("not forecast") };
        assert_eq!(f.target.as_deref(), Some("resnet"));
        assert!(f.action.is_none());
        let cli =
            parse(&["forecast", "backtest", "--csv", "x.csv", "--origin", "2018-09-10T00:00"])
                .unwrap();
        let Command::Forecast(f) = cli.command else { panic!("not forecast") };
        assert!(
            matches!(f.action, Some(analytics::ForecastAction::Backtest(ref b)) if b.origin.len() == 1)
        );
        assert!(parse(&["forecast"]).is_err());
        let cli = parse(&[
            "budgets",
            "set",
            "--name",
            "b",
            "--amount",
            "10",
            "--scope",
            "label:team=x",
            "--threshold",
            "50:forecast",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Budgets { action: Some(analytics::BudgetsAction::Set(_)) }
        ));
        assert!(
            parse(&["budgets", "set", "--name", "b", "--amount", "1", "--scope", "team"]).is_err()
        );
        assert!(matches!(parse(&["models"]).unwrap().command, Command::Models { since: 300 }));
    }

    #[test]
    fn up_flags_have_defaults() {
        let cli = parse(&["up"]).unwrap();
        let Command::Up(up) = cli.command else { panic!("not up") };
        assert_eq!(up.data_dir, PathBuf::from("./flotilla-data"));
        assert_eq!(up.quic, "127.0.0.1:7443".parse::<SocketAddr>().unwrap());
        assert_eq!(up.admin, "127.0.0.1:7070".parse::<SocketAddr>().unwrap());
        assert_eq!((up.sample_ms, up.uplink_secs), (1000, 5));
        assert!(parse(&["up", "--sample-ms", "0"]).is_err());
    }

    #[test]
    fn unreachable_aggregator_exits_69() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let env: BTreeMap<&str, String> = [("FLOTILLA_API", api)].into_iter().collect();
        let lookup = |key: &str| env.get(key).cloned();
        assert_eq!(main_with(["flotilla", "hosts"], &lookup), ExitCode::from(EXIT_UNAVAILABLE));
        assert_eq!(main_with(["flotilla", "nope"], &lookup), ExitCode::from(2));
    }

    #[test]
    fn revoke_messages() {
        let result =
            RevokeResult { host: "gpu-01".into(), revoked_at_secs: Some(1), disconnected: true };
        assert_eq!(
            revoke_text(&result, true, false).unwrap(),
            "Revoked gpu-01: its certificates issued before now are refused; 1 open connection \
             closed. Issue a new certificate with `flotilla-aggregator ca issue gpu-01` to \
             re-admit it.\n"
        );
        let json = revoke_text(&result, true, true).unwrap();
        assert_eq!(serde_json::from_str::<RevokeResult>(&json).unwrap(), result);
    }
}
