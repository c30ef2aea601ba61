//! The ingest's link to an external broker (MQTT 5 over TLS), one of several replicas.
//!
//! ```text
//! CONNECT  client id = this replica's, clean start (nothing of a dead replica's session
//!          is worth keeping: a device resends whatever the hub did not ack)
//! SUBSCRIBE $share/{group}/fleet/v1/+/up     \ the broker hands each message to one
//!           $share/{group}/fleet/v1/+/blob   / replica of the group
//!           fleet/v1/+/status                  every replica: presence
//! SUBACK   every filter granted -> ready; one refused (the broker's ACL) -> not ready,
//!          logged as an error naming the filter, and no device frame is taken
//! status   retained or live "online" / "offline" -> the presence registry; a live
//!          "online" (the device has just subscribed to its downlinks) -> `listening`
//! ```
//!
//! The presence registry is cleared whenever the link is lost: while this replica cannot
//! reach the broker it does not know who is connected; the retained statuses fill it
//! again on the next subscription.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetsync_protocol::topic::{Channel, Layout, STATUS_OFFLINE, STATUS_ONLINE};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{ExternalLink, Frame};
use crate::metrics::Metrics;

/// Messages the broker may send before this replica acks (MQTT 5 receive maximum).
const RECEIVE_MAXIMUM: u16 = 1000;

/// The broker's filters for `link`: the shared `up` and `blob`, and every `status`.
pub(super) fn filters(group: &str) -> [String; 3] {
    let l = Layout::External;
    [
        format!("$share/{group}/{}", l.hub_filter(Channel::Up)),
        format!("$share/{group}/{}", l.hub_filter(Channel::Blob)),
        l.hub_filter(Channel::Status).to_string(),
    ]
}

/// The client and event loop of `link` (nothing is sent until the loop is polled).
pub(super) fn connect(
    link: &ExternalLink,
    max_packet: usize,
    queue: usize,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(link.client_id.clone(), link.host.clone(), link.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_start(true);
    opts.set_max_packet_size(Some(max_packet as u32));
    opts.set_receive_maximum(Some(RECEIVE_MAXIMUM));
    opts.set_outgoing_inflight_upper_limit(RECEIVE_MAXIMUM);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        link.tls.clone(),
    )));
    // Acks are small and latency-bound: no Nagle delay.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    AsyncClient::new(opts, queue)
}

/// Polls the event loop until `shutdown`: device frames to `tx`, statuses to presence.
pub(super) async fn pump(
    mut eventloop: EventLoop,
    client: AsyncClient,
    link: ExternalLink,
    tx: mpsc::Sender<Frame>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let filters = filters(&link.group);
    let mut backoff = Duration::from_millis(200);
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
                    warn!("frame on a topic that is not UTF-8; ignored");
                    continue;
                };
                if let Ok((device, Channel::Status)) = Layout::External.parse(&topic) {
                    status(&link, &metrics, device, &p.payload, p.retain);
                    continue;
                }
                let frame = Frame {
                    topic,
                    payload: p.payload,
                };
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(200);
                info!(broker = %format!("{}:{}", link.host, link.port), client_id = %link.client_id,
                    "ingest connected to the external broker; subscribing");
                let subs = filters
                    .iter()
                    .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(subs) {
                    warn!(error = %e, "subscribe request failed; reconnecting");
                    let _ = client.try_disconnect();
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<&str> = ack
                    .return_codes
                    .iter()
                    .zip(&filters)
                    .filter(|(c, _)| !matches!(c, SubscribeReasonCode::Success(_)))
                    .map(|(_, f)| f.as_str())
                    .collect();
                if refused.is_empty() {
                    info!("subscriptions in place; taking device traffic");
                    ready.store(true, Ordering::SeqCst);
                } else {
                    error!(?refused, codes = ?ack.return_codes,
                        "the broker refused the hub's subscriptions (its ACL must let this hub's certificate read fleet/v1/+/up, blob and status); not ready");
                }
            }
            Ok(_) => {}
            Err(e) => {
                ready.store(false, Ordering::SeqCst);
                link.presence.clear();
                metrics.connected_devices.store(0, Ordering::Relaxed);
                warn!(error = %e, retry_ms = backoff.as_millis() as u64,
                    "ingest lost the external broker; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A device's `status` message: presence, and a live `online` means it is listening.
fn status(link: &ExternalLink, metrics: &Metrics, device: &str, payload: &[u8], retained: bool) {
    let online = match payload {
        p if p == STATUS_ONLINE => true,
        p if p == STATUS_OFFLINE || p.is_empty() => false,
        _ => {
            debug!(%device, "status message neither online nor offline; ignored");
            return;
        }
    };
    link.presence.set(device, online);
    metrics
        .connected_devices
        .store(link.presence.count() as u64, Ordering::Relaxed);
    if online && !retained {
        // Only a live message: the retained ones arrive for every device at each
        // subscription, and would resend every assignment of the fleet at once.
        let _ = link.listening.try_send(device.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_share_up_and_blob_and_read_every_status() {
        assert_eq!(
            filters("g1"),
            [
                "$share/g1/fleet/v1/+/up".to_string(),
                "$share/g1/fleet/v1/+/blob".to_string(),
                "fleet/v1/+/status".to_string(),
            ]
        );
    }
}
