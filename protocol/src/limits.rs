//! Every size limit of the wire format in one place. Decoding refuses input past these
//! before storing it, so the largest allocation a frame can cause is bounded by them.

/// Largest frame (version byte + message) either side accepts.
pub const MAX_FRAME_BYTES: usize = 128 * 1024;
/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 256;
/// Longest device id (bytes). Device ids are `[A-Za-z0-9._-]`.
pub const MAX_DEVICE_ID_LEN: usize = 64;
/// Longest id (shipment, stop, fence, POD, assignment, command).
pub const MAX_ID_LEN: usize = 64;
/// Longest code (reason, exception).
pub const MAX_CODE_LEN: usize = 32;
/// Longest name (recipient, stop).
pub const MAX_NAME_LEN: usize = 128;
/// Longest free text (notes, exception text, address).
pub const MAX_TEXT_LEN: usize = 512;
/// Most photos on one POD.
pub const MAX_PHOTOS: usize = 8;
/// Largest blob chunk payload.
pub const MAX_CHUNK_BYTES: usize = 16 * 1024;
/// Most seq ranges in one ack.
pub const MAX_ACK_RANGES: usize = 64;
/// Most stops in one assignment.
pub const MAX_STOPS: usize = 32;
/// Most shipments at one stop.
pub const MAX_STOP_SHIPMENTS: usize = 16;
/// Most vertices of a polygon fence.
pub const MAX_POLYGON_POINTS: usize = 32;
