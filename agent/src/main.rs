//! `fleetsync-agent`: parses the command line and config, sets up tracing, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleetsync_agent::{Config, config};
use tokio_util::sync::CancellationToken;

/// Exit code for a bad config (EX_USAGE), so systemd does not restart-loop.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "fleetsync-agent",
    version,
    about = "The fleetsync in-vehicle agent"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        /// Config file (see `fleetsync-agent config example`).
        #[arg(long, short)]
        config: PathBuf,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print a complete, commented config.
    Example,
    /// Check a config file (exit 0 valid, 64 invalid).
    Check {
        /// Config file.
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Config {
            cmd: ConfigCmd::Example,
        } => {
            print!("{}", config::EXAMPLE);
            ExitCode::SUCCESS
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { config },
        } => match Config::load(&config) {
            Ok(cfg) => match fleetsync_agent::preflight(&cfg) {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(if e.is_config() { EXIT_CONFIG } else { 1 })
                }
            },
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Cmd::Run { config, log_json } => {
            let filter =
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,rumqttc=warn,sled=warn")
                });
            let b = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr);
            if log_json {
                b.json().init()
            } else {
                b.init()
            }
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let running = match fleetsync_agent::start(cfg, shutdown.clone()).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "agent did not start");
                        eprintln!("error: {e}");
                        return if e.is_config() {
                            ExitCode::from(EXIT_CONFIG)
                        } else {
                            ExitCode::FAILURE
                        };
                    }
                };
                wait_for_signal().await;
                tracing::info!("shutting down");
                shutdown.cancel();
                if tokio::time::timeout(Duration::from_secs(10), running.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!("tasks still running after 10 s; stopping anyway");
                }
                ExitCode::SUCCESS
            })
        }
    }
}

/// SIGINT or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
