//! `flotilla-agent`: arguments, config, logging, signals and exit codes; nothing else.
//!
//! Exit codes: 0 after a clean stop, 64 for a bad config (systemd does not restart on it),
//! 1 for anything else, 130 when a second SIGTERM/SIGINT cut the clean stop short.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use common::config::agent::AgentConfig;
use tokio_util::sync::CancellationToken;

/// The Flotilla host agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file.
    #[arg(long, short, global = true, default_value = "/etc/flotilla/agent.toml")]
    config: PathBuf,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `agent=debug`.
    #[arg(long, global = true, default_value = "info", env = "FLOTILLA_LOG")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Print what this host's collectors see, then exit. Needs no certificates.
    Probe {
        /// Print JSON (inventory and one sample) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the config file and exit.
    CheckConfig,
    /// Measure one optimizer candidate's memory alone and print it as JSON (run by the
    /// optimizer as a child process; `FILE` is `NAME/VERSION/model*.onnx` of a repository).
    Footprint {
        /// The ONNX file.
        #[arg(long)]
        file: PathBuf,
        /// tract, onnxruntime (the host pool) or onnxruntime:THREADS.
        #[arg(long, default_value = "tract")]
        engine: String,
        /// Largest batch run.
        #[arg(long, default_value_t = 1)]
        max_batch: usize,
        /// Synthesized requests when the model has no calibration.json.
        #[arg(long, default_value_t = 16)]
        calibration_rows: usize,
        /// The onnxruntime library to load.
        #[arg(long)]
        ort_library: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::daemon::init_logging(&args.log, "info");
    common::daemon::exit_status(real_main(args))
}

fn real_main(args: Args) -> anyhow::Result<()> {
    match args.command.unwrap_or(Command::Run) {
        Command::Probe { json } => probe(&args.config, json),
        Command::Footprint { file, engine, max_batch, calibration_rows, ort_library } => {
            use agent::optimizer::footprint;
            let engine = footprint::parse_engine(&engine).map_err(anyhow::Error::msg)?;
            // The model's own config (loader options, input dims), as the search used it.
            let model_dir = footprint::model_dir_of(&file);
            let name = model_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let mut config = agent::serving::model_config::ModelConfig::load(&model_dir, name)?;
            config.max_batch_size = max_batch;
            if ort_library.is_some() {
                config.onnxruntime.library = ort_library;
            }
            let measured =
                footprint::measure_here(&file, engine, &config, &model_dir, calibration_rows)
                    .map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string(&measured)?);
            Ok(())
        }
        Command::CheckConfig => {
            AgentConfig::load(&args.config)?;
            println!("{}: ok", args.config.display());
            Ok(())
        }
        Command::Run => {
            let config = AgentConfig::load(&args.config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let result = runtime.block_on(async {
                let endpoint = agent::client_endpoint(&config)?;
                let shutdown = CancellationToken::new();
                tokio::spawn(common::daemon::stop_on_signal(shutdown.clone()));
                agent::run(config, endpoint, shutdown).await?;
                Ok(())
            });
            // Blocking tasks still running (a model load, a disk write) must not hold the
            // exit past the clean stop: the runtime gets a second to wind down.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
    }
}

fn probe(config_path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    // Probe works without a config file: it only needs the telemetry settings.
    let config = if config_path.exists() {
        AgentConfig::load(config_path)?
    } else {
        AgentConfig::embedded(std::path::Path::new("."))
    };
    let mut collectors = agent::telemetry::Collectors::new(&config.telemetry)?;
    let inventory = collectors.inventory(&config.labels);
    // Rates and CPU use need two readings.
    let _ = collectors.sample();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let sample = collectors.sample();
    if json {
        let doc = serde_json::json!({ "inventory": inventory, "sample": sample });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", agent::probe::render(&inventory, &sample));
    }
    Ok(())
}
