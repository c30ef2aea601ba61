//! The `replicas` topology of `chaos` and `load`: a Mosquitto the simulator starts on a
//! free port with the configuration `fleetsync-hub broker-config mosquitto` generates, and
//! hub replica processes on one PostgreSQL database behind it.
//!
//! ```text
//! dir/pki/hubs/{a,b}/       a client certificate per replica (CN hub:a, hub:b)
//! dir/mosquitto/            mosquitto.conf, acl, data/ (sessions survive a restart), log
//! replica config            [broker] kind = "external", url = mqtts://localhost:PORT,
//!                           the replica's certificate; [store] url = the one database
//! ```
//!
//! The broker is stopped as an operator would stop it (SIGTERM: it saves its sessions)
//! and started again on the same port with the same data.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Which processes carry the devices' traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// One hub process with its embedded broker (sled, or PostgreSQL with `--store`).
    #[default]
    Embedded,
    /// A Mosquitto and two hub replicas on one PostgreSQL database (`--store` required).
    Replicas,
}

impl Topology {
    /// True for [`Topology::Embedded`] (the reports leave the topology out then).
    pub fn is_embedded(&self) -> bool {
        *self == Topology::Embedded
    }
}

/// Hub replicas the topology runs.
pub const REPLICAS: usize = 2;

/// Replica `i`'s name (its certificate is `hub:{name}`).
pub fn replica_name(i: usize) -> String {
    char::from(b'a' + (i % 26) as u8).to_string()
}

/// The Mosquitto executable: `flag`, else `FLEETSYNC_MOSQUITTO`, else `mosquitto` on
/// `PATH`, else `/usr/sbin/mosquitto` (where Debian puts it, outside a user's `PATH`).
pub fn mosquitto_exe(flag: Option<&Path>) -> Result<PathBuf, String> {
    let given = flag.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("FLEETSYNC_MOSQUITTO")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "mosquitto: {} is not a file (--mosquitto or FLEETSYNC_MOSQUITTO)",
                p.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("mosquitto"));
    on_path
        .chain([PathBuf::from("/usr/sbin/mosquitto")])
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "mosquitto not found: --topology replicas starts a Mosquitto 2 broker; install it \
             (Debian: apt-get install mosquitto) or name it with --mosquitto PATH or \
             FLEETSYNC_MOSQUITTO"
                .to_string()
        })
}

/// Checks `--store` for the replicas topology: they share one PostgreSQL database.
pub fn require_store(store: Option<&str>) -> Result<&str, String> {
    store.ok_or_else(|| {
        "--topology replicas needs --store postgres://USER@HOST:PORT/DB (an empty database \
         the replicas share)"
            .to_string()
    })
}

/// Issues `n` replicas' client certificates into `pki/hubs/` (kept if already there).
pub fn issue_hubs(pki: &Path, n: usize) -> Result<(), String> {
    for i in 0..n {
        let name = replica_name(i);
        if !pki.join("hubs").join(&name).join("cert.pem").exists() {
            fleetsync_hub::pki::issue_hub(pki, &name).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Replica `i`'s `[broker]` section: the external broker on `port`, its own certificate.
pub fn broker_section(pki: &Path, i: usize, port: u16) -> String {
    let hub = pki.join("hubs").join(replica_name(i));
    format!(
        "[broker]\nkind = \"external\"\nurl = \"mqtts://localhost:{port}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        ca = pki.join("ca.pem").display(),
        cert = hub.join("cert.pem").display(),
        key = hub.join("key.pem").display(),
    )
}

/// A Mosquitto process the simulator owns.
#[derive(Debug)]
pub struct Broker {
    exe: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    /// Its TLS listener on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Writes the generated config for `pki` (hub certificates issued already) into
    /// `dir` and starts the broker on a free port; waits until it accepts connections.
    pub async fn start(exe: &Path, pki: &Path, dir: &Path) -> Result<Broker, String> {
        std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = crate::ports::unused_port().map_err(|e| e.to_string())?;
        let opts = fleetsync_hub::broker::external::MosquittoOptions {
            pki: pki.to_path_buf(),
            bind: "127.0.0.1".into(),
            port,
            acl_path: dir.join("acl"),
            data_dir: dir.join("data"),
            shared_group: "fleetsync-hub".into(),
            max_packet_bytes: 256 * 1024,
            // Started as root, Mosquitto would switch to its own account, which cannot
            // read the keys in the working directory.
            user: std::fs::metadata("/proc/self")
                .is_ok_and(|m| m.uid() == 0)
                .then(|| "root".to_string()),
        };
        let g = fleetsync_hub::broker::external::mosquitto(&opts).map_err(|e| e.to_string())?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, g.config).map_err(|e| format!("{}: {e}", conf.display()))?;
        std::fs::write(&opts.acl_path, g.acl)
            .map_err(|e| format!("{}: {e}", opts.acl_path.display()))?;
        let mut b = Broker {
            exe: exe.to_path_buf(),
            conf,
            log: dir.join("mosquitto.log"),
            port,
            child: None,
        };
        b.spawn().await?;
        Ok(b)
    }

    /// Starts the process and waits (10 s at most) until it listens.
    pub async fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let out = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.exe)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("mosquitto ({}): {e}", self.exe.display()))?;
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                return Err(format!(
                    "mosquitto did not listen on {addr} (log: {})",
                    self.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stops it with SIGTERM (it saves its sessions) and waits for it to exit (SIGKILL
    /// after 10 s).
    pub async fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(c.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its log so far (for a failure message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A process's memory from /proc/PID/status, MiB.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// Resident now (VmRSS).
    pub rss_mib: f64,
    /// Peak resident (VmHWM).
    pub peak_rss_mib: f64,
}

/// `pid`'s memory, if it is running.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<f64> {
        status
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse::<f64>()
            .ok()
    };
    Some(Memory {
        rss_mib: kib("VmRSS:")? / 1024.0,
        peak_rss_mib: kib("VmHWM:")? / 1024.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_store_or_broker_is_a_clear_error() {
        let e = require_store(None).unwrap_err();
        assert!(e.contains("--store postgres://"), "{e}");
        let e = mosquitto_exe(Some(Path::new("/nonexistent/mosquitto"))).unwrap_err();
        assert!(e.contains("/nonexistent/mosquitto is not a file"), "{e}");
    }

    #[test]
    fn replica_sections_name_their_own_certificate() {
        let s = broker_section(Path::new("/p"), 1, 8883);
        assert!(s.contains("kind = \"external\""));
        assert!(s.contains("url = \"mqtts://localhost:8883\""));
        assert!(s.contains("/p/hubs/b/cert.pem"));
    }

    #[test]
    fn memory_of_this_process() {
        let m = memory(std::process::id()).unwrap();
        assert!(m.rss_mib > 0.0 && m.peak_rss_mib >= m.rss_mib);
    }
}
