//! The command lines: `config example` runs as is after `pki init`; bad configs exit 64
//! with the offending key named; `pki` refuses to overwrite and to issue bad device ids.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use fleetsync_tests::{Proc, bin, free_port, wait_http_ok};

fn run(bin_name: &str, args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(bin(bin_name))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_example_config_runs_after_pki_init() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        "fleetsync-hub",
        &["pki", "init", "--dir", "pki"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        "fleetsync-hub",
        &["pki", "issue-device", "--dir", "pki", "--device", "V1"],
        dir.path(),
    );
    assert!(out.status.success());
    let example = run("fleetsync-hub", &["config", "example"], dir.path()).stdout;
    std::fs::write(dir.path().join("hub.toml"), &example).unwrap();
    // Same ports as the example would clash with other tests: move them by environment.
    let (mqtt, http) = (free_port(), free_port());
    let log = std::fs::File::create(dir.path().join("hub.log")).unwrap();
    let child = Command::new(bin("fleetsync-hub"))
        .args(["run", "--config", "hub.toml"])
        .current_dir(dir.path())
        .env("FLEETSYNC_HUB_MQTT_LISTEN", format!("127.0.0.1:{mqtt}"))
        .env("FLEETSYNC_HUB_HTTP_LISTEN", format!("127.0.0.1:{http}"))
        .stderr(log)
        .spawn()
        .unwrap();
    let _hub = Proc {
        child,
        name: "hub".into(),
    };
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    assert!(
        wait_http_ok(addr, "/readyz", Duration::from_secs(20)).await,
        "example config did not run"
    );

    // The agent's example runs against it too (port and API moved the same way).
    let example =
        String::from_utf8(run("fleetsync-agent", &["config", "example"], dir.path()).stdout)
            .unwrap();
    let api = free_port();
    let agent_toml = example
        .replace(
            "mqtts://localhost:8883",
            &format!("mqtts://localhost:{mqtt}"),
        )
        .replace("127.0.0.1:8090", &format!("127.0.0.1:{api}"));
    std::fs::write(dir.path().join("agent.toml"), agent_toml).unwrap();
    let _agent = Proc::spawn(
        "fleetsync-agent",
        &dir.path().join("agent.toml"),
        &dir.path().join("agent.log"),
    );
    let api_addr: SocketAddr = format!("127.0.0.1:{api}").parse().unwrap();
    assert!(
        wait_http_ok(api_addr, "/healthz", Duration::from_secs(20)).await,
        "agent example config did not run"
    );
}

#[test]
fn bad_configs_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let example = run("fleetsync-hub", &["config", "example"], dir.path()).stdout;
    let text = String::from_utf8(example)
        .unwrap()
        .replace("[http]", "[http]\nlisten_port = 8080");
    std::fs::write(dir.path().join("bad.toml"), text).unwrap();
    for args in [
        &["config", "check", "bad.toml"][..],
        &["run", "--config", "bad.toml"][..],
    ] {
        let out = run("fleetsync-hub", args, dir.path());
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("listen_port"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let example = run("fleetsync-agent", &["config", "example"], dir.path()).stdout;
    let text = String::from_utf8(example)
        .unwrap()
        .replace("device_id = \"V1\"", "device_id = \"V1/../V2\"");
    std::fs::write(dir.path().join("agent.toml"), text).unwrap();
    let out = run(
        "fleetsync-agent",
        &["run", "--config", "agent.toml"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device_id"));
    let out = run(
        "fleetsync-agent",
        &["config", "check", "missing.toml"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn pki_refuses_overwrite_and_bad_ids_and_never_prints_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        "fleetsync-hub",
        &["pki", "init", "--dir", "p", "--san", "hub.example.net"],
        dir.path(),
    );
    assert!(out.status.success());
    let printed =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!printed.contains("PRIVATE KEY"));
    let out = run("fleetsync-hub", &["pki", "init", "--dir", "p"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    let out = run(
        "fleetsync-hub",
        &["pki", "issue-device", "--dir", "p", "--device", "a/b"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("device id"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("p/ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "CA key readable by others");
    }
}

/// `config check` loads and checks what `run` will use, and both exit 64 on the same
/// problems: unusable TLS material, a key that is not the certificate's, a store path
/// under a file, a port in use, values out of range; an agent whose certificate names
/// another device.
#[test]
fn config_check_and_run_refuse_the_same_things_with_64() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(
        run("fleetsync-hub", &["pki", "init", "--dir", "pki"], d)
            .status
            .success()
    );
    for dev in ["V1", "V2"] {
        let out = run(
            "fleetsync-hub",
            &["pki", "issue-device", "--dir", "pki", "--device", dev],
            d,
        );
        assert!(out.status.success());
    }
    std::fs::write(d.join("garbage.pem"), "not a certificate\n").unwrap();
    std::fs::write(d.join("a-file"), "x").unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_port = held.local_addr().unwrap().port();
    let example =
        String::from_utf8(run("fleetsync-hub", &["config", "example"], d).stdout).unwrap();
    let base = example
        .replace("0.0.0.0:8883", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", free_port()));
    let cases: [(&str, String, &str); 6] = [
        (
            "bad CA",
            base.replace("pki/ca.pem", "garbage.pem"),
            "garbage.pem",
        ),
        (
            "key of another certificate",
            base.replace("pki/hub-key.pem", "pki/devices/V1/key.pem"),
            "tls",
        ),
        (
            "store under a file",
            base.replace("data/hub", "a-file/hub"),
            "not a directory",
        ),
        (
            "port in use",
            base.replace(
                &base[base.find("[http]").unwrap()..base.find("[store]").unwrap()],
                &format!("[http]\nlisten = \"127.0.0.1:{held_port}\"\n\n"),
            ),
            "in use",
        ),
        (
            "handshake timeout 0",
            base.replace("handshake_timeout_ms = 5000", "handshake_timeout_ms = 0"),
            "handshake_timeout_ms",
        ),
        (
            "1 TiB packets",
            base.replace(
                "max_packet_bytes = 262144",
                "max_packet_bytes = 1099511627776",
            ),
            "max_packet_bytes",
        ),
    ];
    for (what, text, says) in cases {
        assert_ne!(text, base, "{what}: the case did not change the config");
        std::fs::write(d.join("hub.toml"), &text).unwrap();
        for args in [
            &["config", "check", "hub.toml"][..],
            &["run", "--config", "hub.toml"][..],
        ] {
            let out = run("fleetsync-hub", args, d);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{what}: {args:?}: {err}");
            assert!(
                err.contains(says),
                "{what}: {args:?} does not say {says:?}: {err}"
            );
        }
    }
    drop(held);

    // The agent: device_id V2 with V1's certificate.
    let agent = String::from_utf8(run("fleetsync-agent", &["config", "example"], d).stdout)
        .unwrap()
        .replace("device_id = \"V1\"", "device_id = \"V2\"")
        .replace("127.0.0.1:8090", &format!("127.0.0.1:{}", free_port()));
    std::fs::write(d.join("agent.toml"), agent).unwrap();
    for args in [
        &["config", "check", "agent.toml"][..],
        &["run", "--config", "agent.toml"][..],
    ] {
        let out = run("fleetsync-agent", args, d);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains("certificate of \"V1\""), "{args:?}: {err}");
    }
}
