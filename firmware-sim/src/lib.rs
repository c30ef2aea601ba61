//! fleetsync-sim: simulated vehicles, drivers and faults for the demo, load tests and the
//! chaos harness.
//!
//! - [`route`]: generated drives between waypoints, 1 Hz.
//! - [`nmea`]: the NMEA sentences a receiver would print for them (agents read them
//!   through their real `nmea+tcp://` source).

pub mod nmea;
pub mod route;
