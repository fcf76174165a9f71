//! `flotilla-aggregator`: arguments, config, logging, signals and exit codes; nothing else.
//!
//! Exit codes: 0 after a clean stop, 64 for a bad config (systemd does not restart on it),
//! 1 for anything else, 130 when a second SIGTERM/SIGINT cut the clean stop short.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use common::config::aggregator::AggregatorConfig;
use common::ids::HostId;
use tokio_util::sync::CancellationToken;

/// The Flotilla aggregator and fleet certificate authority.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file.
    #[arg(long, short, global = true, default_value = "/etc/flotilla/aggregator.toml")]
    config: PathBuf,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `aggregator=debug`.
    #[arg(long, global = true, default_value = "info", env = "FLOTILLA_LOG")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the aggregator (the default).
    Run,
    /// Check the config file and exit.
    CheckConfig,
    /// The fleet certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the CA and the aggregator's server certificate.
    Init {
        /// Directory for ca.pem, ca.key, server.pem, server.key.
        #[arg(long, default_value = "/etc/flotilla/tls")]
        dir: PathBuf,
        /// Extra DNS names or IPs for the server certificate (flotilla-aggregator, localhost
        /// and 127.0.0.1 are always included). Repeatable.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace an existing CA (every host certificate must then be reissued).
        #[arg(long)]
        force: bool,
    },
    /// Issue a host's client certificate and key (HOST.pem mode 0644, HOST.key mode 0600).
    Issue {
        /// Host id: the certificate's Common Name, and the host's name in the fleet.
        host: String,
        /// CA directory.
        #[arg(long, default_value = "/etc/flotilla/tls")]
        dir: PathBuf,
        /// Output directory (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::daemon::init_logging(&args.log, "info");
    common::daemon::exit_status(real_main(args))
}

fn real_main(args: Args) -> anyhow::Result<()> {
    match args.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            let config = AggregatorConfig::load(&args.config)?;
            aggregator::scheduler::check(&config.analytics)?;
            aggregator::control::load_policies(&config.control)?;
            println!("{}: ok", args.config.display());
            Ok(())
        }
        Command::Ca(CaCommand::Init { dir, sans, days, force }) => {
            common::tls::init_ca_dir(&dir, &sans, days, force)?;
            println!("Created the fleet CA and server certificate in {}:", dir.display());
            println!(
                "  ca.pem ca.key server.pem server.key (keys mode 0600; keep ca.key off agent hosts)"
            );
            println!("Next: flotilla-aggregator ca issue HOST --dir {}", dir.display());
            Ok(())
        }
        Command::Ca(CaCommand::Issue { host, dir, out, days, force }) => {
            let host = HostId::new(&host)?;
            let out = out.unwrap_or_else(|| dir.clone());
            let (cert, key) = common::tls::issue_host_files(&dir, &host, &out, days, force)?;
            println!("Issued {host}: {} and {}", cert.display(), key.display());
            println!(
                "Copy them with {} to the host (agent.toml [tls] cert, key, ca_cert).",
                dir.join(common::tls::files::CA_CERT).display()
            );
            Ok(())
        }
        Command::Run => {
            let config = AggregatorConfig::load(&args.config)?;
            aggregator::scheduler::check(&config.analytics)?;
            aggregator::control::load_policies(&config.control)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let result = runtime.block_on(async {
                let bound = aggregator::Bound::bind(&config).await?;
                let shutdown = CancellationToken::new();
                tokio::spawn(common::daemon::stop_on_signal(shutdown.clone()));
                aggregator::run(config, bound, shutdown).await?;
                Ok(())
            });
            // Blocking tasks still running (a model load, a disk write) must not hold the
            // exit past the clean stop: the runtime gets a second to wind down.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
    }
}
