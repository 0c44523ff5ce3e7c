//! Parsing one request head: weir's strict parser (httparse plus framing, Host and
//! hop-by-hop checks, and the owned head it builds, new or reused as a worker reuses it) next
//! to httparse alone, the floor.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use weir_forwarder::l7::http::{HeadLimits, RequestHead, parse_request, parse_request_into};

/// A browser's GET: 13 header fields, about 600 bytes.
const BROWSER_GET: &[u8] = b"GET /products/42?ref=home HTTP/1.1\r\n\
Host: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Referer: https://shop.example.com/\r\n\
Connection: keep-alive\r\n\
Cookie: session=4f1c2a9b7e; cart=3; theme=dark\r\n\
Upgrade-Insecure-Requests: 1\r\n\
Sec-Fetch-Dest: document\r\n\
Sec-Fetch-Mode: navigate\r\n\
Sec-Fetch-Site: same-origin\r\n\
Priority: u=0, i\r\n\r\n";

fn parse(c: &mut Criterion) {
    let limits = HeadLimits {
        max_request_line: 8192,
        max_header_bytes: 32768,
        max_headers: 100,
    };
    let mut group = c.benchmark_group("http_request_head");
    group.bench_function("weir parse_request", |b| {
        b.iter(|| parse_request(black_box(BROWSER_GET), &limits).unwrap())
    });
    group.bench_function("weir parse_request_into, a reused head", |b| {
        let mut head = RequestHead::default();
        b.iter(|| parse_request_into(black_box(BROWSER_GET), &limits, &mut head).unwrap())
    });
    group.bench_function("httparse alone", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; 100];
            let mut request = httparse::Request::new(&mut headers);
            request.parse(black_box(BROWSER_GET)).unwrap().is_complete()
        })
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
