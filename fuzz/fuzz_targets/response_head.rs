//! The response-head parser on any bytes (the first byte picks the request's method): it never
//! panics, and a head it accepts goes to the client as one it would read the same way — same
//! status, same body framing. (Found with it: a status of `050`, read as 50 and written as a
//! two-digit status line.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_forwarder::l7::http::{MAX_RESPONSE_HEADERS, parse_response, write_client_head};

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
    // weir adds a few fields (`Via`, `Connection`): a head at the field limit may come out
    // past it, which a client's own limit decides about.
    if response.headers.len() + 4 > MAX_RESPONSE_HEADERS {
        return;
    }
    let mut out = Vec::new();
    write_client_head(&response, 1, false, false, true, b"", &mut out);
    let again = parse_response(&out, method)
        .unwrap_or_else(|err| panic!("weir refuses its own client head ({err:?}): {out:?}"))
        .expect("a whole head");
    assert_eq!(again.status, response.status);
    assert_eq!(again.body, response.body);
});
