//! Scale-out fixtures: a real Mosquitto started on a free port with the configuration
//! `fleetsync-hub broker-config mosquitto` generates, hub replicas as processes on one
//! fresh PostgreSQL database, and agents that connect through the broker.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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

/// A Mosquitto process on its own port, configured by the hub's generator; it keeps its
/// sessions in its directory, so [`Mosquitto::restart`] finds them again.
pub struct Mosquitto {
    exe: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    /// Its TLS listener.
    pub port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    /// Writes the config for `pki` (whose hubs/ must be issued already) into `dir` and
    /// starts the broker; waits until it accepts connections.
    pub fn start(exe: &Path, pki: &Path, dir: &Path) -> Mosquitto {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let opts = fleetsync_hub::broker::external::MosquittoOptions {
            pki: pki.to_path_buf(),
            bind: "127.0.0.1".into(),
            port,
            acl_path: dir.join("acl"),
            data_dir: dir.join("data"),
            shared_group: "fleetsync-hub".into(),
            max_packet_bytes: 256 * 1024,
            // Started as root, Mosquitto would switch to its own account, which cannot
            // read the test's keys.
            user: std::fs::metadata("/proc/self")
                .is_ok_and(|m| m.uid() == 0)
                .then(|| "root".to_string()),
        };
        let g = fleetsync_hub::broker::external::mosquitto(&opts).unwrap();
        assert!(!g.hubs.is_empty(), "issue the hub certificates first");
        std::fs::create_dir_all(&opts.data_dir).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, g.config).unwrap();
        std::fs::write(&opts.acl_path, g.acl).unwrap();
        let mut m = Mosquitto {
            exe: exe.to_path_buf(),
            conf,
            log: dir.join("mosquitto.log"),
            port,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.exe)
            .arg("-c")
            .arg(&self.conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not listen on {addr} (log: {})",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker as an operator would (SIGTERM: it saves its sessions) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Hub replica config text: the external broker on `broker_port`, the store at `pg_url`.
pub fn replica_config(pki: &Path, name: &str, broker_port: u16, http: u16, pg_url: &str) -> String {
    let hub = pki.join("hubs").join(name);
    format!(
        r#"
[broker]
kind = "external"
url = "mqtts://localhost:{broker_port}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[http]
listen = "127.0.0.1:{http}"
[store]
url = "{pg_url}"
[auth]
operator_token = "{OPERATOR_TOKEN}"
"#,
        ca = pki.join("ca.pem").display(),
        cert = hub.join("cert.pem").display(),
        key = hub.join("key.pem").display(),
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
        let names: Vec<String> = (0..replicas)
            .map(|i| char::from(b'a' + i as u8).to_string())
            .collect();
        for n in &names {
            fleetsync_hub::pki::issue_hub(&pki, n).unwrap();
        }
        let broker = Mosquitto::start(&exe, &pki, &dir.path().join("mosquitto"));
        let mut hubs = Vec::new();
        for n in &names {
            let http = free_port();
            let cfg = dir.path().join(format!("hub-{n}.toml"));
            std::fs::write(&cfg, replica_config(&pki, n, broker.port, http, &pg_url)).unwrap();
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
