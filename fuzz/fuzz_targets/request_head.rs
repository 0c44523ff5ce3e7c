//! The request-head parser on any bytes: it never panics, and a head it accepts is written on
//! to the server as one weir would accept again, with the same method, target, host and body
//! framing — weir never sends a server a head it would refuse or read differently itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_config::ForwardedHeaders;
use weir_forwarder::l7::http::{ClientInfo, HeadLimits, parse_request, write_server_head};

const LIMITS: HeadLimits = HeadLimits {
    max_request_line: 8 * 1024,
    max_header_bytes: 32 * 1024,
    max_headers: 100,
};

fuzz_target!(|data: &[u8]| {
    let Ok(Some(request)) = parse_request(data, &LIMITS) else {
        return;
    };
    assert!(request.head_len <= data.len());
    let mut out = Vec::new();
    let client = ClientInfo {
        peer: "198.18.0.1:40000".parse().unwrap(),
        tls: data.len() % 2 == 1,
    };
    write_server_head(&request, client, &ForwardedHeaders::default(), &mut out);
    // An HTTP/1.0 request without Host goes on without one, which HTTP/1.1 requires.
    if request.authority.is_none() {
        return;
    }
    let unbounded = HeadLimits {
        max_request_line: usize::MAX,
        max_header_bytes: usize::MAX,
        max_headers: 1024,
    };
    let again = parse_request(&out, &unbounded)
        .unwrap_or_else(|err| panic!("weir refuses its own server head ({err}): {out:?}"))
        .expect("a whole head");
    assert_eq!(again.head_len, out.len());
    assert_eq!(again.method, request.method);
    assert_eq!(again.target, request.target);
    assert_eq!(again.host, request.host);
    assert_eq!(again.body, request.body);
});
