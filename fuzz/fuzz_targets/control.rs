//! The control protocol decoder on any line: it never panics, and a request it accepts
//! survives being written and read again unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_config::control::{RequestEnvelope, parse_request};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_request(data) else {
        return;
    };
    let line = serde_json::to_vec(&RequestEnvelope::new(request.clone())).unwrap();
    assert_eq!(parse_request(&line).expect("its own encoding"), request);
});
