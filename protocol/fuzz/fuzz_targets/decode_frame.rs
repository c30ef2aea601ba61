//! Any bytes on a device topic go through `frame::decode`. It must never panic, and what
//! it accepts must re-encode to a frame that decodes to the same message.
#![no_main]

use fleetsync_protocol::frame;
use fleetsync_protocol::{Downlink, Uplink};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = frame::decode::<Uplink>(data) {
        let again = frame::encode(&msg).expect("a decoded message re-encodes");
        assert_eq!(frame::decode::<Uplink>(&again).expect("re-encoded frame decodes"), msg);
    }
    if let Ok(msg) = frame::decode::<Downlink>(data) {
        let again = frame::encode(&msg).expect("a decoded message re-encodes");
        assert_eq!(frame::decode::<Downlink>(&again).expect("re-encoded frame decodes"), msg);
    }
});
