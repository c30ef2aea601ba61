//! `fleetsync-sim`: parses the command line, sets up tracing (stderr, `warn` unless
//! `RUST_LOG` says otherwise, so the live display stays readable) and runs a mode of the
//! library until Ctrl-C / SIGTERM (a second one quits at once).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "fleetsync-sim",
    version,
    about = "Simulated vehicles, drivers and faults for fleetsync"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Start a hub and N vehicles with real agents in this process, drive delivery rounds
    /// with POD at each stop, show live progress, and end with a summary checked against
    /// the hub (exit code 1 if anything was lost or duplicated).
    Demo(fleetsync_sim::DemoOptions),
    /// Real agent processes and a hub process under faults (kill -9, link cuts, lost
    /// acks, delays, disk quota pressure, clock skew), then the delivery-contract oracle.
    /// Exit code 1 if the oracle fails.
    Chaos(ChaosArgs),
    /// Many lightweight protocol-level vehicles (real TLS and certificates, no agent)
    /// against a hub process: events/s acked, capture-to-ack latency, hub CPU and RSS,
    /// and a check that every event sent is at the hub exactly once.
    Load(LoadArgs),
    /// Run a hub in this process (used by `chaos` to start killable hub processes).
    #[command(hide = true)]
    Hub {
        /// Hub config file.
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Run an agent in this process (used by `chaos`).
    #[command(hide = true)]
    Agent {
        /// Agent config file.
        #[arg(long)]
        config: std::path::PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Vehicles (MQTT clients with their own certificates).
    #[arg(long, default_value_t = 1000)]
    vehicles: usize,
    /// Fixes per second per vehicle.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds measured (after connecting and a 3 s settle).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Keep the working directory (PKI, hub data, hub.log) here; the hub's log filter
    /// is FLEETSYNC_HUB_LOG (default warn,rumqttd=off).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Run the hub on PostgreSQL (an empty database: postgres://USER@HOST:PORT/DB)
    /// instead of sled.
    #[arg(long)]
    store: Option<String>,
    /// Also measure partner webhooks: a shipment per vehicle, one arrival per vehicle
    /// during the window, a webhook subscription to a receiver in this process; reports
    /// the latency from the hub's record of each arrival to its webhook request.
    #[arg(long)]
    webhooks: bool,
    /// `embedded`: one hub process with its own broker. `replicas`: a Mosquitto started
    /// here and `--replicas` hub replica processes on the `--store` database (required).
    #[arg(long, value_enum, default_value_t)]
    topology: fleetsync_sim::replicas::Topology,
    /// Hub replicas of `--topology replicas` (1 to 8; 1 and 2 give the scale-out ratio).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// The Mosquitto executable for `--topology replicas` (default: FLEETSYNC_MOSQUITTO,
    /// else `mosquitto` on PATH, else /usr/sbin/mosquitto).
    #[arg(long)]
    mosquitto: Option<std::path::PathBuf>,
    /// Also measure the portal's live stream: this many stream clients over HTTP, a
    /// shipment per vehicle spread over --customers, one arrival per vehicle; reports
    /// the latency from the hub's stamp of each change to each client, whether every
    /// client got every change, and the hub's RSS before and with the clients. 0: the
    /// same run without any stream client (shipments, ERP changes, pauses), a control.
    #[arg(long)]
    portal_clients: Option<usize>,
    /// With --portal-clients (sled only): run the control (--portal-clients 0) first, and
    /// judge the RSS target by the clients' cost: the hub's peak RSS with them minus the
    /// control's (the hub grows with the vehicles alone too, its embedded broker most).
    #[arg(long)]
    portal_control: bool,
    /// Customers the stream clients and shipments are spread over.
    #[arg(long, default_value_t = 100)]
    customers: usize,
    /// Seconds of the stream's baseline (vehicles paused, ERP changes only) before the
    /// measured window.
    #[arg(long, default_value_t = 10)]
    portal_baseline: u64,
}

#[derive(Debug, clap::Args)]
struct ChaosArgs {
    /// Vehicles (agent processes).
    #[arg(long, default_value_t = 20)]
    vehicles: usize,
    /// Seconds of fault injection (then the backlog drains and the oracle runs).
    #[arg(long, default_value_t = 90)]
    duration: u64,
    /// Seed of routes and the fault schedule.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Keep the working directory (configs, stores, logs) here.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Run the hub on PostgreSQL (an empty database: postgres://USER@HOST:PORT/DB)
    /// instead of sled.
    #[arg(long)]
    store: Option<String>,
    /// `embedded`: one hub process with its own broker. `replicas`: a Mosquitto started
    /// here and two hub replica processes on the `--store` database (required); faults add
    /// replica kills -9 and broker restarts.
    #[arg(long, value_enum, default_value_t)]
    topology: fleetsync_sim::replicas::Topology,
    /// The Mosquitto executable for `--topology replicas` (default: FLEETSYNC_MOSQUITTO,
    /// else `mosquitto` on PATH, else /usr/sbin/mosquitto).
    #[arg(long)]
    mosquitto: Option<std::path::PathBuf>,
}

/// What `--topology replicas` needs (a database, a Mosquitto), or why it cannot run.
fn replicas_ready(
    topology: fleetsync_sim::replicas::Topology,
    store: Option<&str>,
    mosquitto: Option<&std::path::Path>,
) -> Result<(), String> {
    if topology.is_embedded() {
        return Ok(());
    }
    fleetsync_sim::replicas::require_store(store)?;
    fleetsync_sim::replicas::mosquitto_exe(mosquitto).map(|_| ())
}

/// Cancels `token` on the first Ctrl-C / SIGTERM; exits on the second.
fn on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        for n in 0.. {
            #[cfg(unix)]
            let term_fut = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let term_fut = std::future::pending::<()>();
            tokio::select! {
                r = tokio::signal::ctrl_c() => if r.is_err() { return },
                _ = term_fut => {}
            }
            if n == 0 {
                eprintln!(
                    "\nstopping: draining the agents' backlogs, then the summary (Ctrl-C again to quit at once)"
                );
                token.cancel();
            } else {
                std::process::exit(130);
            }
        }
    });
}

/// jemalloc rather than glibc's malloc: with a thousand portal stream clients on the
/// 1,000-vehicle load the hub used less memory for them and a quarter less CPU (README,
/// "Portal live stream").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetsync-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        on_signals(shutdown.clone());
        match cli.mode {
            Mode::Hub { config } => {
                let cfg = match fleetsync_hub::Config::load(&config) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("fleetsync-sim hub: {e}");
                        return ExitCode::from(64);
                    }
                };
                match fleetsync_hub::run(cfg, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("fleetsync-sim hub: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Mode::Agent { config } => {
                let cfg = match fleetsync_agent::Config::load(&config) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("fleetsync-sim agent: {e}");
                        return ExitCode::from(64);
                    }
                };
                match fleetsync_agent::run(cfg, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("fleetsync-sim agent: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Mode::Load(a) => {
                let Ok(exe) = std::env::current_exe() else {
                    eprintln!("fleetsync-sim load: cannot find my own executable");
                    return ExitCode::FAILURE;
                };
                if a.portal_clients.is_some() && (a.customers == 0 || a.customers > a.vehicles) {
                    eprintln!("fleetsync-sim load: --customers must be at least 1 and at most --vehicles");
                    return ExitCode::from(64);
                }
                if a.portal_control && (a.portal_clients.unwrap_or(0) == 0 || a.store.is_some()) {
                    eprintln!(
                        "fleetsync-sim load: --portal-control needs --portal-clients N (N > 0) on sled; on PostgreSQL run the control yourself (--portal-clients 0) on another empty database"
                    );
                    return ExitCode::from(64);
                }
                if a.vehicles == 0 || !(a.rate > 0.0 && a.rate <= 50.0) {
                    eprintln!("fleetsync-sim load: --vehicles must be at least 1 and --rate between 0 and 50");
                    return ExitCode::from(64);
                }
                if let Err(e) = replicas_ready(a.topology, a.store.as_deref(), a.mosquitto.as_deref()) {
                    eprintln!("fleetsync-sim load: {e}");
                    return ExitCode::from(64);
                }
                if !(1..=8).contains(&a.replicas) {
                    eprintln!("fleetsync-sim load: --replicas must be from 1 to 8");
                    return ExitCode::from(64);
                }
                let opts = |clients: Option<usize>, dir: Option<std::path::PathBuf>| fleetsync_sim::load::LoadOptions {
                    vehicles: a.vehicles,
                    rate: a.rate,
                    duration: std::time::Duration::from_secs(a.duration),
                    exe: exe.clone(),
                    dir,
                    store: a.store.clone(),
                    webhooks: a.webhooks,
                    topology: a.topology,
                    replicas: a.replicas,
                    mosquitto: a.mosquitto.clone(),
                    portal: clients.map(|clients| fleetsync_sim::load_portal::PortalOptions {
                        clients,
                        customers: a.customers,
                        baseline: std::time::Duration::from_secs(a.portal_baseline),
                    }),
                };
                let control = if a.portal_control {
                    println!("control: the same run without stream clients");
                    match fleetsync_sim::load::load(opts(Some(0), None), shutdown.clone()).await {
                        Ok(r) => {
                            fleetsync_sim::load::print_summary(&r);
                            Some(r)
                        }
                        Err(e) => {
                            eprintln!("fleetsync-sim load: control run: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    None
                };
                match fleetsync_sim::load::load(opts(a.portal_clients, a.dir.clone()), shutdown).await {
                    Ok(mut r) => {
                        if let Some(c) = &control {
                            println!("with {} stream clients:", a.portal_clients.unwrap_or(0));
                            fleetsync_sim::load_portal::judge_by_control(&mut r, c);
                        }
                        fleetsync_sim::load::print_summary(&r);
                        if let Some(path) = a.report
                            && let Err(e) = std::fs::write(&path, serde_json::to_vec_pretty(&r).unwrap_or_default())
                        {
                            eprintln!("fleetsync-sim load: cannot write {}: {e}", path.display());
                        }
                        if r.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
                    }
                    Err(e) => {
                        eprintln!("fleetsync-sim load: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Mode::Chaos(a) => {
                let exe = match std::env::current_exe() {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!("fleetsync-sim chaos: cannot find my own executable: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                if let Err(e) = replicas_ready(a.topology, a.store.as_deref(), a.mosquitto.as_deref()) {
                    eprintln!("fleetsync-sim chaos: {e}");
                    return ExitCode::from(64);
                }
                let opts = fleetsync_sim::chaos::ChaosOptions {
                    vehicles: a.vehicles.max(2),
                    duration: std::time::Duration::from_secs(a.duration),
                    seed: a.seed,
                    exe,
                    dir: a.dir,
                    store: a.store,
                    topology: a.topology,
                    mosquitto: a.mosquitto,
                };
                match fleetsync_sim::chaos::chaos(opts, shutdown).await {
                    Ok(r) => {
                        fleetsync_sim::chaos::print_summary(&r);
                        if let Some(path) = a.report
                            && let Err(e) = std::fs::write(
                                &path,
                                serde_json::to_vec_pretty(&r).unwrap_or_default(),
                            )
                        {
                            eprintln!("fleetsync-sim chaos: cannot write {}: {e}", path.display());
                        }
                        if r.oracle.ok {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::FAILURE
                        }
                    }
                    Err(e) => {
                        eprintln!("fleetsync-sim chaos: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Mode::Demo(opts) => match fleetsync_sim::demo(opts, shutdown).await {
                Ok(r) if r.oracle_ok => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e @ fleetsync_sim::SimError::Options(_)) => {
                    eprintln!("fleetsync-sim demo: {e}");
                    ExitCode::from(64)
                }
                Err(e) => {
                    eprintln!("fleetsync-sim demo: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}
