//! `fleetsync-hub`: parses the command line and config, sets up tracing, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleetsync_hub::broker::external;
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
    /// Configuration for an external broker that ties each device's topics to its
    /// certificate (for `[broker] kind = "external"`).
    BrokerConfig {
        #[command(subcommand)]
        cmd: BrokerCmd,
    },
}

#[derive(Subcommand)]
enum BrokerCmd {
    /// A Mosquitto 2 config and ACL: TLS 1.3 with client certificates, the certificate CN
    /// as user name and client id, each device limited to its own topics, the hub
    /// replicas of DIR/hubs/ (`pki issue-hub`) to every device's up, blob, status and down.
    /// Printed (config, then ACL), or written into --out.
    Mosquitto {
        /// The PKI directory (from `pki init`); the broker serves DIR/hub.pem.
        #[arg(long)]
        pki: PathBuf,
        /// Listener port.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// Listener address.
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Write DIR/mosquitto.conf and DIR/acl (and keep the broker's data in DIR/data)
        /// instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where the broker keeps its sessions (default: OUT/data, or /var/lib/mosquitto).
        #[arg(long)]
        data: Option<PathBuf>,
        /// The replicas' shared subscription group (`[broker] shared_group`).
        #[arg(long, default_value = "fleetsync-hub")]
        shared_group: String,
        /// The account Mosquitto runs as when started as root (default: its own,
        /// `mosquitto`); it must be able to read PKI/hub-key.pem.
        #[arg(long)]
        user: Option<String>,
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
    /// Issue a hub replica's client certificate for an external broker into
    /// DIR/hubs/NAME/ (identity hub:NAME; one per replica).
    IssueHub {
        /// The PKI directory (from `pki init`).
        #[arg(long)]
        dir: PathBuf,
        /// Replica name (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
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

/// `broker-config mosquitto`: prints the config and ACL, or writes them into `out`.
/// `opts.data_dir` empty: OUT/data or /var/lib/mosquitto; `opts.acl_path` is set here.
fn broker_config(mut opts: external::MosquittoOptions, out: Option<PathBuf>) -> ExitCode {
    opts.acl_path = match &out {
        Some(o) => o.join("acl"),
        None => PathBuf::from("/etc/mosquitto/fleetsync.acl"),
    };
    if opts.data_dir.as_os_str().is_empty() {
        opts.data_dir = match &out {
            Some(o) => o.join("data"),
            None => PathBuf::from("/var/lib/mosquitto"),
        };
    }
    let (acl_path, data_dir) = (opts.acl_path.clone(), opts.data_dir.clone());
    let generated = match external::mosquitto(&opts) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if generated.hubs.is_empty() {
        eprintln!(
            "warning: no hub certificate under {}/hubs yet: no hub may read the devices' topics (`fleetsync-hub pki issue-hub --name NAME`, then run this again)",
            opts.pki.display()
        );
    }
    let Some(out) = out else {
        println!("# ---- mosquitto.conf\n{}", generated.config);
        println!("# ---- {}\n{}", acl_path.display(), generated.acl);
        return ExitCode::SUCCESS;
    };
    let conf = out.join("mosquitto.conf");
    let written = std::fs::create_dir_all(&data_dir)
        .and_then(|()| std::fs::write(&conf, &generated.config))
        .and_then(|()| std::fs::write(&acl_path, &generated.acl));
    match written {
        Ok(()) => {
            println!(
                "{} and {} written (hubs: {}); start: mosquitto -c {}",
                conf.display(),
                acl_path.display(),
                if generated.hubs.is_empty() {
                    "none".to_string()
                } else {
                    generated.hubs.join(", ")
                },
                conf.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot write into {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
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

/// jemalloc rather than glibc's malloc: with a thousand portal stream clients on the
/// 1,000-vehicle load the hub used less memory for them and a quarter less CPU (README,
/// "Portal live stream").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        Cmd::Pki {
            cmd: PkiCmd::IssueHub { dir, name },
        } => match pki::issue_hub(&dir, &name) {
            Ok(out) => {
                println!(
                    "{}/cert.pem and key.pem written for hub replica {name} (broker user {})",
                    out.display(),
                    pki::hub_identity(&name)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::BrokerConfig {
            cmd:
                BrokerCmd::Mosquitto {
                    pki,
                    port,
                    bind,
                    out,
                    data,
                    shared_group,
                    user,
                },
        } => broker_config(
            external::MosquittoOptions {
                pki,
                bind,
                port,
                acl_path: PathBuf::new(),
                data_dir: data.unwrap_or_default(),
                shared_group,
                max_packet_bytes: config::BrokerConfig::default().max_packet_bytes,
                user,
            },
            out,
        ),
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
