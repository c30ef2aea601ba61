//! Scale-out fixtures: a real Mosquitto started on a free port with the configuration
//! `fleetsync-hub broker-config mosquitto` generates, hub replicas as processes on one
//! fresh PostgreSQL database, and agents that connect through the broker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{DRIVER_TOKEN, Http, OPERATOR_TOKEN, Proc, free_port, wait_http_ok};

/// The `mosquitto` executable the broker tests start: `FLEETSYNC_TEST_MOSQUITTO`. Unset:
/// `None` with a note on stderr (a developer without Mosquitto runs the rest); in CI (`CI`
/// set) unset is a failure, never a silent skip.
pub fn mosquitto_bin() -> Option<PathBuf> {
    match std::env::var("FLEETSYNC_TEST_MOSQUITTO") {
        Ok(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "FLEETSYNC_TEST_MOSQUITTO={} is not a file",
                p.display()
            );
            Some(p)
        }
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "FLEETSYNC_TEST_MOSQUITTO is not set in CI: .ci/run must set it"
            );
            eprintln!(
                "SKIPPED: FLEETSYNC_TEST_MOSQUITTO is not set; external broker tests not run"
            );
            None
        }
    }
}

/// A Mosquitto process on its own port with the hub's generated config (the simulator's:
/// `start`, `stop` with SIGTERM, `spawn` again on the same port and data, `log`).
pub use fleetsync_sim::replicas::Broker as Mosquitto;

/// Replica `i`'s config text: the simulator's `[broker]` section for the broker on
/// `broker_port` (its certificate `hub:{a,b,...}`), the store at `pg_url`.
pub fn replica_config(pki: &Path, i: usize, broker_port: u16, http: u16, pg_url: &str) -> String {
    format!(
        "{}[http]\nlisten = \"127.0.0.1:{http}\"\n[store]\nurl = \"{pg_url}\"\n[auth]\noperator_token = \"{OPERATOR_TOKEN}\"\n",
        fleetsync_sim::replicas::broker_section(pki, i, broker_port)
    )
}

/// A fleet behind an external broker: a PKI with devices and hub replicas `a`, `b`, ...,
/// a Mosquitto, one PostgreSQL database; replicas and agents are started by the test.
pub struct Replicas {
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    pub broker: Mosquitto,
    pub pg_url: String,
    /// Each replica's config and operator API address, by index.
    pub hubs: Vec<(PathBuf, SocketAddr)>,
    /// Each agent's device id, config and local API address.
    pub agents: Vec<(String, PathBuf, SocketAddr)>,
}

impl Replicas {
    /// `None` when Mosquitto or PostgreSQL is not configured (outside CI).
    pub async fn new(replicas: usize, devices: &[&str]) -> Option<Replicas> {
        let exe = mosquitto_bin()?;
        let pg = crate::pg_url()?;
        let pg_url = crate::fresh_pg_db(&pg).await;
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki(dir.path(), devices);
        fleetsync_sim::replicas::issue_hubs(&pki, replicas).unwrap();
        let broker = Mosquitto::start(&exe, &pki, &dir.path().join("mosquitto"))
            .await
            .unwrap();
        let mut hubs = Vec::new();
        for i in 0..replicas {
            let http = free_port();
            let cfg = dir.path().join(format!("hub-{i}.toml"));
            std::fs::write(&cfg, replica_config(&pki, i, broker.port, http, &pg_url)).unwrap();
            hubs.push((cfg, SocketAddr::from(([127, 0, 0, 1], http))));
        }
        let mut agents = Vec::new();
        for d in devices {
            let api = free_port();
            let text = crate::agent_config(
                d,
                &pki,
                &dir.path().join(format!("agent-{d}")),
                broker.port,
                api,
                256 << 20,
            )
            .replace(
                "ack_timeout_ms = 3000\n",
                "ack_timeout_ms = 3000\nbroker = \"external\"\n",
            );
            let cfg = dir.path().join(format!("agent-{d}.toml"));
            std::fs::write(&cfg, text).unwrap();
            agents.push((d.to_string(), cfg, SocketAddr::from(([127, 0, 0, 1], api))));
        }
        Some(Replicas {
            dir,
            pki,
            broker,
            pg_url,
            hubs,
            agents,
        })
    }

    /// Starts replica `i` and waits until it is ready (subscribed at the broker).
    pub async fn start_hub(&self, i: usize) -> Proc {
        let (cfg, addr) = &self.hubs[i];
        let log = self.dir.path().join(format!("hub-{i}.log"));
        let p = Proc::spawn("fleetsync-hub", cfg, &log);
        assert!(
            wait_http_ok(*addr, "/readyz", Duration::from_secs(30)).await,
            "replica {i} did not become ready (log: {})",
            log.display()
        );
        p
    }

    /// Starts agent `i` and waits until its API answers.
    pub async fn start_agent(&self, i: usize) -> Proc {
        let (device, cfg, addr) = &self.agents[i];
        let log = self.dir.path().join(format!("agent-{device}.log"));
        let p = Proc::spawn("fleetsync-agent", cfg, &log);
        assert!(
            wait_http_ok(*addr, "/healthz", Duration::from_secs(30)).await,
            "agent {device} did not start (log: {})",
            log.display()
        );
        p
    }

    /// Replica `i`'s operator API.
    pub fn ops(&self, i: usize) -> Http {
        Http::new(self.hubs[i].1, OPERATOR_TOKEN)
    }

    /// Agent `i`'s local API.
    pub fn driver(&self, i: usize) -> Http {
        Http::new(self.agents[i].2, DRIVER_TOKEN)
    }

    /// A replica's or agent's log, for a failure message.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}
