//! `fleetsync-hub`: parses the command line and config, sets up tracing, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleetsync_hub::{Config, config, pki};
use tokio_util::sync::CancellationToken;

/// Exit code for a bad config or bad arguments (EX_USAGE), so systemd does not restart-loop.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "fleetsync-hub",
    version,
    about = "The fleetsync hub: devices in, events stored, operators served"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the hub.
    Run {
        /// Config file (see `fleetsync-hub config example`).
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
    /// Certificates for the hub and devices.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// The store.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Apply the PostgreSQL schema migrations this hub carries, then exit (a hub applies
    /// them at start too). Nothing to do for sled.
    Migrate {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print a complete, commented config.
    Example,
    /// Check a config file and exit (0 valid, 64 invalid).
    Check {
        /// Config file.
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA and the hub's server certificate.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name or IP for the hub certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Issue a device certificate into DIR/devices/ID/.
    IssueDevice {
        /// The PKI directory (from `pki init`).
        #[arg(long)]
        dir: PathBuf,
        /// Device id (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(long)]
        device: String,
    },
}

/// The config (exit 64 when it is invalid) and a runtime to run it in.
fn config_and_runtime(
    path: &std::path::Path,
) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let cfg = Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })?;
    Ok((cfg, rt))
}

fn init_tracing(json: bool) {
    // rumqttd logs every closed device connection as an error; the gateway and ingest log
    // what an operator needs. RUST_LOG=rumqttd=info brings it back.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rumqttd=off,rumqttc=warn,sled=warn")
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json { b.json().init() } else { b.init() }
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
            Ok(cfg) => match fleetsync_hub::preflight(&cfg) {
                Ok(()) => {
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
        Cmd::Pki {
            cmd: PkiCmd::Init { dir, sans },
        } => match pki::init(&dir, &sans) {
            Ok(p) => {
                println!(
                    "CA:   {}\nhub:  {} (key {})",
                    p.ca.display(),
                    p.hub_cert.display(),
                    p.hub_key.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Pki {
            cmd: PkiCmd::IssueDevice { dir, device },
        } => match pki::issue_device(&dir, &device) {
            Ok(out) => {
                println!(
                    "{}/cert.pem and key.pem written for device {device}",
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Store {
            cmd: StoreCmd::Migrate { config },
        } => {
            init_tracing(false);
            let (cfg, rt) = match config_and_runtime(&config) {
                Ok(v) => v,
                Err(code) => return code,
            };
            rt.block_on(async move {
                match fleetsync_hub::store::Store::open(&cfg.store).await {
                    Ok(fleetsync_hub::store::Store::Postgres(pg)) => {
                        match pg.schema_version().await {
                            Ok(v) => {
                                println!("store: PostgreSQL schema at version {v}");
                                ExitCode::SUCCESS
                            }
                            Err(e) => {
                                eprintln!("error: store: {e}");
                                ExitCode::FAILURE
                            }
                        }
                    }
                    Ok(_) => {
                        println!("store: sled has no schema to migrate");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: store: {e}");
                        ExitCode::from(if e.is_config() { EXIT_CONFIG } else { 1 })
                    }
                }
            })
        }
        Cmd::Run { config, log_json } => {
            init_tracing(log_json);
            let (cfg, rt) = match config_and_runtime(&config) {
                Ok(v) => v,
                Err(code) => return code,
            };
            rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let running = match fleetsync_hub::start(cfg, shutdown.clone()).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "hub did not start");
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

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
