//! The checks behind the fuzz targets (`fuzz/`) and the corpus replay in
//! the test suite (`tests/fuzz_corpus.rs`), in one place so both run the
//! same code. Each takes arbitrary bytes and panics only on a real bug:
//! a decoder that panics, or a frame that does not survive a round trip.

use crate::proto::{self, BoxFrame, DeviceFrame, Frame};
use crate::shell::admin::AdminRequest;
use std::path::Path;

/// A frame body as a device would send it to the box.
pub fn device_frame(data: &[u8]) {
    round_trip::<DeviceFrame>(data);
}

/// A frame body as a box would send it to a device (the client library).
pub fn box_frame(data: &[u8]) {
    round_trip::<BoxFrame>(data);
}

/// A request on the admin socket.
pub fn admin_request(data: &[u8]) {
    if let Ok(req) = proto::decode::<AdminRequest>(data) {
        // AdminRequest has no PartialEq: compare the encodings.
        let bytes = proto::encode(&req);
        let again: AdminRequest = proto::decode(&bytes[4..]).expect("re-decodes");
        assert_eq!(proto::encode(&again), bytes, "admin request round trip");
    }
}

/// A config file: parsed, then every value settled.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(f) = crate::shell::config::FileConfig::parse(text, Path::new("fuzz.toml")) {
        let _ =
            crate::shell::config::resolve(&crate::shell::config::ServeArgs::default(), &f, None);
    }
}

fn round_trip<T: Frame + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(frame) = proto::decode::<T>(data) {
        let bytes = proto::encode(&frame);
        let again: T = proto::decode(&bytes[4..]).expect("an encoded frame decodes");
        assert_eq!(again, frame, "round trip");
    }
}
