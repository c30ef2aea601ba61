//! Frames: one version byte, then one postcard-encoded [`Uplink`] or [`Downlink`].
//!
//! ```text
//! Frame { version: u8 = 1, message: postcard(Uplink | Downlink) }   // at most MAX_FRAME_BYTES
//! ```
//!
//! Decoding never panics and never allocates past the limits in [`crate::limits`]: the
//! frame length is checked first, every collection is bounded, and trailing bytes after a
//! message are an error (so two frames glued together are not silently half-read).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::limits::MAX_FRAME_BYTES;
use crate::message::{Downlink, Uplink};

/// The frame version this build writes and reads.
pub const VERSION: u8 = 1;

/// A message that travels in a frame.
pub trait Message: Serialize + DeserializeOwned + sealed::Sealed {}
impl Message for Uplink {}
impl Message for Downlink {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::message::Uplink {}
    impl Sealed for crate::message::Downlink {}
}

/// Encodes `msg` into `buf`, returning the used prefix.
pub fn encode_into<'b, M: Message>(msg: &M, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    let (first, rest) = buf.split_first_mut().ok_or(Error::BufferFull)?;
    *first = VERSION;
    let len = match postcard::to_slice(msg, rest) {
        Ok(body) => body.len(),
        Err(postcard::Error::SerializeBufferFull) => return Err(Error::BufferFull),
        Err(e) => return Err(Error::Malformed(e)),
    };
    let total = len + 1;
    if total > MAX_FRAME_BYTES {
        return Err(Error::TooLarge {
            len: total,
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(&mut buf[..total])
}

/// Encodes `msg` into a new vector.
#[cfg(feature = "alloc")]
pub fn encode<M: Message>(msg: &M) -> Result<alloc::vec::Vec<u8>, Error> {
    let mut out = alloc::vec![VERSION];
    out = postcard::to_extend(msg, out).map_err(Error::Malformed)?;
    if out.len() > MAX_FRAME_BYTES {
        return Err(Error::TooLarge {
            len: out.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(out)
}

/// Decodes one frame.
pub fn decode<M: Message>(frame: &[u8]) -> Result<M, Error> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(Error::TooLarge {
            len: frame.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let (&version, body) = frame.split_first().ok_or(Error::Empty)?;
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    let (msg, rest) = postcard::take_from_bytes::<M>(body).map_err(Error::Malformed)?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes(rest.len()));
    }
    Ok(msg)
}
