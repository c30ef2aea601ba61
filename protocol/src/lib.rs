//! fleetsync-protocol: the wire format agents, the hub and (one day) microcontroller
//! trackers speak.
//!
//! - [`frame`]: one version byte + a postcard message; the only entry points for bytes.
//! - [`message`]: [`Uplink`] (event batches, blob chunks) and [`Downlink`] (acks,
//!   assignments, config, commands, blob acks). Append-only enums.
//! - [`batch`]: a batch of events with consecutive seqs; positions are delta-coded.
//! - [`topic`]: the MQTT topic layout for the embedded and external broker.
//! - [`limits`]: every size limit; decoding never allocates past them.
//! - [`json`] (feature `json`): the one JSON shape of an event used by both HTTP APIs.
//!
//! Without the default `std` feature this crate is `no_std` and needs no allocator:
//! collections are `heapless` with the same limits and the same bytes on the wire.

#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod batch;
pub mod bounded;
pub mod error;
pub mod frame;
#[cfg(feature = "json")]
pub mod json;
pub mod limits;
pub mod message;
pub mod topic;

pub use batch::Batch;
pub use bounded::{BoundedString, BoundedVec};
pub use error::Error;
pub use message::*;
