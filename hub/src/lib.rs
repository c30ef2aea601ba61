//! fleetsync-hub.
