//! The response-head parser on any bytes (the first byte picks the request's method): it never
//! panics, and a head it accepts goes to the client as one it would read the same way — same
//! status, same body framing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_forwarder::l7::http::{parse_response, write_client_head};

const METHODS: [&str; 4] = ["GET", "HEAD", "POST", "OPTIONS"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, buf)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(pick) % METHODS.len()];
    let Ok(Some(response)) = parse_response(buf, method) else {
        return;
    };
    assert!(response.head_len <= buf.len());
    let mut out = Vec::new();
    write_client_head(&response, 1, false, false, true, &mut out);
    let again = parse_response(&out, method)
        .unwrap_or_else(|err| panic!("weir refuses its own client head ({err:?}): {out:?}"))
        .expect("a whole head");
    assert_eq!(again.status, response.status);
    assert_eq!(again.body, response.body);
});
