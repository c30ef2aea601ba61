//! The embedded rumqttd broker, on its own threads, listening in plain MQTT on a loopback
//! port that only the gateway and the hub's ingest use.
//!
//! rumqttd cannot report the port it bound, so we pick a free one, start the broker, and
//! wait until it accepts; if it does not (the port was taken in between), we try another.
//! Every connection must log in: the gateway logs devices in as `(device_id, secret)` and
//! the ingest as `(HUB_USER, secret)`, where `secret` is random per start. A local process
//! that connects to the loopback port directly cannot impersonate a device.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Username of the hub's own ingest connection.
pub const HUB_USER: &str = "fleetsync-hub";

/// A running embedded broker.
#[derive(Debug)]
pub struct Embedded {
    /// Loopback address of its plain MQTT listener.
    pub addr: SocketAddr,
    /// Password every connection must present.
    pub secret: String,
}

/// Starting the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No port could be bound.
    #[error("embedded broker did not start: {0}")]
    Start(String),
}

fn random_secret() -> String {
    use rand::Rng as _;
    let bytes: [u8; 24] = rand::rng().random();
    hex::encode(bytes)
}

fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn config(addr: SocketAddr, max_packet: usize, max_connections: usize, secret: &str) -> Config {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_packet,
        max_inflight_count: 200,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let secret = secret.to_string();
    connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
        let ok = pass == secret && (user == client_id || user == HUB_USER);
        async move { ok }
    });
    let server = ServerSettings {
        name: "fleetsync-internal".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: max_connections + 16,
            max_outgoing_packet_count: 200,
            // Each filter's log keeps at most 4 x 16 MiB in memory; a consumer that falls
            // further behind loses publishes, which devices resend (no hub ack).
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

/// Starts the broker on a free loopback port.
pub fn start(max_packet: usize, max_connections: usize) -> Result<Embedded, BrokerError> {
    let secret = random_secret();
    let mut last_err = String::new();
    for _ in 0..5 {
        let addr = free_port().map_err(|e| BrokerError::Start(e.to_string()))?;
        let mut broker = Broker::new(config(addr, max_packet, max_connections, &secret));
        let spawned = std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            });
        if let Err(e) = spawned {
            return Err(BrokerError::Start(e.to_string()));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                tracing::info!(%addr, "embedded broker listening");
                return Ok(Embedded { addr, secret });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        last_err = format!("port {addr} did not accept");
    }
    Err(BrokerError::Start(last_err))
}
