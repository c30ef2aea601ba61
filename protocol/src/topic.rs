//! MQTT topics: the only place their layout is written down.
//!
//! ```text
//! embedded broker (hub's own, per-device prefix enforced from the client certificate)
//!   /tenants/{device_id}/up      Uplink::Batch        device -> hub
//!   /tenants/{device_id}/blob    Uplink::BlobChunk    device -> hub
//!   /tenants/{device_id}/down    Downlink::*          hub -> device
//! external broker (its ACL ties the prefix to the certificate identity)
//!   fleet/v1/{device_id}/up | blob | down
//!   fleet/v1/{device_id}/status  retained "online" | "offline" (the last will), device -> every hub
//! ```
//!
//! With an external broker the hub replicas split the `up` and `blob` traffic through an
//! MQTT 5 shared subscription, `$share/{group}/` + [`Layout::hub_filter`]; `status` is read
//! by every replica (presence).
//!
//! A device id is 1..=64 bytes of `[A-Za-z0-9._-]`, so it can never contain a topic
//! separator or wildcard. The hub takes the device identity from the topic (which the
//! broker bound to the certificate), never from a payload.

use core::fmt;
use core::fmt::Write as _;

use crate::limits::MAX_DEVICE_ID_LEN;

/// Which broker layout is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The hub's embedded broker: `/tenants/{id}/...`.
    Embedded,
    /// An external broker cluster: `fleet/v1/{id}/...`.
    External,
}

/// The three channels of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Event batches, device to hub.
    Up,
    /// Blob chunks, device to hub.
    Blob,
    /// Acks, assignments, config, commands, hub to device.
    Down,
    /// Presence, device to every hub: retained `online`, and `offline` as the last will
    /// (external broker only; the embedded gateway knows presence first-hand).
    Status,
}

/// The `status` payload of a connected device.
pub const STATUS_ONLINE: &[u8] = b"online";
/// The `status` payload of a device that is gone (its last will, or a clean stop).
pub const STATUS_OFFLINE: &[u8] = b"offline";

impl Channel {
    /// The last topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Up => "up",
            Channel::Blob => "blob",
            Channel::Down => "down",
            Channel::Status => "status",
        }
    }
}

/// Why a topic or device id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicError {
    /// The topic does not start with this layout's prefix.
    WrongPrefix,
    /// The device id is empty, too long, or has a character outside `[A-Za-z0-9._-]`.
    BadDeviceId,
    /// The last level is not `up`, `blob`, `down` or `status`.
    UnknownChannel,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicError::WrongPrefix => "topic is not under the fleet prefix",
            TopicError::BadDeviceId => "device id must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            TopicError::UnknownChannel => "topic channel is not up, blob, down or status",
        })
    }
}

impl core::error::Error for TopicError {}

/// A topic string; long enough for any valid device id.
pub type Topic = heapless::String<96>;

impl Layout {
    fn prefix(self) -> &'static str {
        match self {
            Layout::Embedded => "/tenants/",
            Layout::External => "fleet/v1/",
        }
    }

    /// The topic of `device_id`'s `channel`.
    pub fn topic(self, device_id: &str, channel: Channel) -> Result<Topic, TopicError> {
        validate_device_id(device_id)?;
        let mut t = Topic::new();
        write!(t, "{}{}/{}", self.prefix(), device_id, channel.as_str())
            .map_err(|_| TopicError::BadDeviceId)?;
        Ok(t)
    }

    /// The prefix every topic of `device_id` starts with (ends in `/`).
    pub fn device_prefix(self, device_id: &str) -> Result<Topic, TopicError> {
        validate_device_id(device_id)?;
        let mut t = Topic::new();
        write!(t, "{}{}/", self.prefix(), device_id).map_err(|_| TopicError::BadDeviceId)?;
        Ok(t)
    }

    /// The filter matching `channel` of every device. The hub subscribes to it as is
    /// (embedded), or shared among its replicas (external: `$share/{group}/` before it).
    pub fn hub_filter(self, channel: Channel) -> &'static str {
        match (self, channel) {
            (Layout::Embedded, Channel::Up) => "/tenants/+/up",
            (Layout::Embedded, Channel::Blob) => "/tenants/+/blob",
            (Layout::Embedded, Channel::Down) => "/tenants/+/down",
            (Layout::Embedded, Channel::Status) => "/tenants/+/status",
            (Layout::External, Channel::Up) => "fleet/v1/+/up",
            (Layout::External, Channel::Blob) => "fleet/v1/+/blob",
            (Layout::External, Channel::Down) => "fleet/v1/+/down",
            (Layout::External, Channel::Status) => "fleet/v1/+/status",
        }
    }

    /// Splits a topic into its device id and channel.
    pub fn parse(self, topic: &str) -> Result<(&str, Channel), TopicError> {
        let rest = topic
            .strip_prefix(self.prefix())
            .ok_or(TopicError::WrongPrefix)?;
        let (device, channel) = rest.split_once('/').ok_or(TopicError::UnknownChannel)?;
        validate_device_id(device)?;
        let channel = match channel {
            "up" => Channel::Up,
            "blob" => Channel::Blob,
            "down" => Channel::Down,
            "status" => Channel::Status,
            _ => return Err(TopicError::UnknownChannel),
        };
        Ok((device, channel))
    }
}

/// Checks that `id` is a valid device id.
pub fn validate_device_id(id: &str) -> Result<(), TopicError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(TopicError::BadDeviceId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_in_both_layouts() {
        for layout in [Layout::Embedded, Layout::External] {
            for ch in [Channel::Up, Channel::Blob, Channel::Down, Channel::Status] {
                let t = layout.topic("truck-07", ch).unwrap();
                assert_eq!(layout.parse(&t).unwrap(), ("truck-07", ch));
            }
        }
        assert_eq!(
            Layout::Embedded.topic("v1", Channel::Up).unwrap(),
            "/tenants/v1/up"
        );
        assert_eq!(
            Layout::External.topic("v1", Channel::Down).unwrap(),
            "fleet/v1/v1/down"
        );
    }

    #[test]
    fn bad_topics_are_refused() {
        let l = Layout::Embedded;
        assert_eq!(l.parse("fleet/v1/a/up"), Err(TopicError::WrongPrefix));
        assert_eq!(
            l.parse("/tenants/a/up/extra"),
            Err(TopicError::UnknownChannel)
        );
        assert_eq!(l.parse("/tenants/a"), Err(TopicError::UnknownChannel));
        assert_eq!(l.parse("/tenants//up"), Err(TopicError::BadDeviceId));
        assert_eq!(l.parse("/tenants/a+b/up"), Err(TopicError::BadDeviceId));
        assert_eq!(l.parse("/tenants/../up"), Err(TopicError::BadDeviceId));
        assert!(l.topic(&"x".repeat(65), Channel::Up).is_err());
        assert!(l.topic(&"x".repeat(64), Channel::Up).is_ok());
    }
}
