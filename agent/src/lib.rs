//! fleetsync-agent: the in-vehicle agent.
//!
//! Data flow: sources (local API, GPS) -> [`store`] (durable, two lanes) -> uplink (MQTT/TLS)
//! -> hub; hub acks delete from the store.

pub mod store;
