//! Device connectivity: the embedded rumqttd broker and the TLS gateway in front of it.

pub mod embedded;
pub mod gateway;
