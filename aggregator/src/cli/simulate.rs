//! `flotilla simulate`: replays a demand trace through the scaling engine locally (no
//! aggregator), comparing reactive, predictive + reactive and a fixed fleet
//! ([`crate::control::simulate`]).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::analytics::series::{self, HourlySeries};
use crate::control::policy::{PolicySet, Predictive};
use crate::control::simulate::{self, ReplayConfig};

/// `flotilla simulate --trace FILE.csv [--policy FILE --policy-name N] [...]`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Demand trace, `timestamp,value` CSV (hourly or finer; averaged per hour)
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Policy file (`config/policies.toml` format); default: a built-in replay policy
    #[arg(long, value_name = "FILE", requires = "policy_name")]
    pub policy: Option<PathBuf>,
    /// Name of the policy to replay from --policy
    #[arg(long, value_name = "NAME", requires = "policy")]
    pub policy_name: Option<String>,
    /// Demand of the window's highest hour, requests/s
    #[arg(long, default_value_t = 400.0)]
    pub peak_rps: f64,
    /// Requests/s one ready instance serves within the SLO
    #[arg(long, default_value_t = 10.0)]
    pub rps_per_instance: f64,
    /// Seconds from adding an instance to its being ready
    #[arg(long, default_value_t = 300)]
    pub load_secs: u64,
    /// Price of one instance-hour
    #[arg(long, default_value_t = 2.0)]
    pub price: f64,
    /// Weeks replayed (the last ones of the trace, or before --end)
    #[arg(long, default_value_t = 8)]
    pub weeks: usize,
    /// Weeks of forecast warm-up history before the window
    #[arg(long, default_value_t = 4)]
    pub warmup_weeks: usize,
    /// End of the window (a timestamp as in the CSV); default: the end of the trace
    #[arg(long, value_name = "TIME")]
    pub end: Option<String>,
    /// Multiplicative noise on minute demand, +- this %, seeded
    #[arg(long, default_value_t = 0.0)]
    pub noise_pct: f64,
    /// Seed of the noise
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Override the predictive buffer, % (default: the policy's); a comma list replays one
    /// predictive row per value (with every --lead-secs and --forecast-scale-in value)
    #[arg(long, value_delimiter = ',')]
    pub buffer_pct: Vec<f64>,
    /// Override the predictive lead, seconds (default: the policy's); a comma list as above
    #[arg(long, value_delimiter = ',')]
    pub lead_secs: Vec<u64>,
    /// Override whether the forecast is corrected by measured demand over forecast, smoothed
    /// (true), or used as it is (false) (default: the policy's); `true,false` replays both
    #[arg(long, value_delimiter = ',')]
    pub correct_bias: Vec<bool>,
}

/// Runs `flotilla simulate` and returns its output.
pub fn run(args: &SimulateArgs, as_json: bool) -> anyhow::Result<String> {
    let path = &args.trace;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let points = series::parse_csv(&text).with_context(|| format!("reading {}", path.display()))?;
    let trace = HourlySeries::from_points(points);
    let end_ms = match &args.end {
        Some(t) => {
            Some(series::parse_time(t).with_context(|| format!("--end {t:?} is not a time"))?)
        }
        None => None,
    };
    let cfg = ReplayConfig {
        peak_rps: args.peak_rps,
        rps_per_instance: args.rps_per_instance,
        load_secs: args.load_secs,
        price_per_instance_hour: args.price,
        weeks: args.weeks,
        warmup_weeks: args.warmup_weeks,
        end_ms,
        noise_pct: args.noise_pct,
        seed: args.seed,
        ..ReplayConfig::default()
    };
    let mut policy = match (&args.policy, &args.policy_name) {
        (Some(file), Some(name)) => {
            let set = PolicySet::load(file)?;
            set.get(name)
                .cloned()
                .with_context(|| format!("{} has no policy named {name:?}", file.display()))?
        }
        _ => simulate::default_policy(&cfg),
    };
    let own = policy.predictive.clone();
    let or_own = |list: &[f64], v: f64| if list.is_empty() { vec![v] } else { list.to_vec() };
    let leads =
        if args.lead_secs.is_empty() { vec![own.lead_secs] } else { args.lead_secs.clone() };
    let biases = if args.correct_bias.is_empty() {
        vec![own.correct_bias]
    } else {
        args.correct_bias.clone()
    };
    let mut variants = Vec::new();
    for buffer_pct in or_own(&args.buffer_pct, own.buffer_pct) {
        for &lead_secs in &leads {
            for &correct_bias in &biases {
                let v = Predictive { buffer_pct, lead_secs, correct_bias, ..own.clone() };
                // Each variant is checked as the policy it would be.
                let mut check = policy.clone();
                check.predictive = v.clone();
                check.validated()?;
                variants.push(v);
            }
        }
    }
    if let [only] = &variants[..] {
        policy.predictive = only.clone();
    }
    let policy = policy.validated()?;
    let report = simulate::replay_variants(&trace, &policy, &cfg, &variants)?;
    if as_json {
        super::to_json(&report)
    } else {
        Ok(simulate::render(&report, &path.display().to_string()))
    }
}
