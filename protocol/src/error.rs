//! The protocol's error type.

use core::fmt;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The input was empty.
    Empty,
    /// The frame is larger than [`crate::limits::MAX_FRAME_BYTES`] (or the buffer given).
    TooLarge {
        /// Bytes in the frame (or needed).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The version byte is not one this build speaks.
    UnsupportedVersion(u8),
    /// The message bytes do not decode (truncated, bad tag, over a limit, bad value).
    Malformed(postcard::Error),
    /// A message decoded but bytes were left after it.
    TrailingBytes(usize),
    /// The output buffer is too small.
    BufferFull,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Empty => f.write_str("empty frame"),
            Error::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max}")
            }
            Error::UnsupportedVersion(v) => write!(f, "unsupported frame version {v}"),
            Error::Malformed(e) => write!(f, "malformed message: {e}"),
            Error::TrailingBytes(n) => write!(f, "{n} bytes left after the message"),
            Error::BufferFull => f.write_str("output buffer too small"),
        }
    }
}

impl core::error::Error for Error {}
