//! Device connectivity: the embedded rumqttd broker and the TLS gateway in front of it, or
//! an external broker (its configuration is generated here; the link is the ingest's).

pub mod embedded;
pub mod external;
pub mod gateway;
