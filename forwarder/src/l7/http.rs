//! HTTP/1.1 message heads: strict parsing of requests (RFC 9112, with the ambiguities that
//! enable request smuggling refused), parsing of responses, and the heads weir writes on to
//! servers and back to clients.
//!
//! httparse does the tokenising (request line, header names and values, obs-fold refused);
//! this module adds what it leaves to the caller: size limits, bare LF, message framing
//! (`Content-Length` / `Transfer-Encoding`), `Host` and the request target, and the
//! hop-by-hop headers a proxy must not forward.
//!
//! Framing rules, where RFC 9112 allows a choice, take the strict side:
//! - `Transfer-Encoding` and `Content-Length` together → 400 (§6.1 allows TE to win; a
//!   front end that guesses differently from the server is how smuggling works);
//! - `Content-Length` twice, even with equal values, or anything but digits → 400;
//! - `Transfer-Encoding` other than exactly `chunked` → 501, and in HTTP/1.0 → 400;
//! - a bare LF anywhere in the head → 400.

use std::{borrow::Cow, io::Write as _, mem::MaybeUninit, net::SocketAddr};

use weir_config::ForwardedHeaders;

/// Limits on a request head (from `[l7]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_request_line: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// Why a request is refused: the status to answer (the connection then closes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct RequestError {
    pub status: u16,
    pub reason: &'static str,
}

const fn refuse(status: u16, reason: &'static str) -> RequestError {
    RequestError { status, reason }
}

/// How long a message body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyLength {
    /// No body.
    #[default]
    Empty,
    /// `Content-Length` bytes.
    Fixed(u64),
    /// `Transfer-Encoding: chunked`; relayed as is, decoded only to find its end.
    Chunked,
    /// Until the server closes the connection (responses only).
    UntilClose,
}

/// A request head, checked and ready to route.
///
/// A head can be parsed into again ([`parse_request_into`]): its strings and fields keep
/// their allocations, so a worker that reuses heads parses without allocating.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    /// The standard methods borrow a static name; others (extension methods) own theirs.
    pub method: Cow<'static, str>,
    /// In origin form (`/path?query`), or `*` for `OPTIONS *`.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields as received, minus the hop-by-hop ones.
    pub headers: Fields,
    /// Host name the request is for (lower case, no port, no trailing dot), from the
    /// absolute target or `Host`; `None` only for an HTTP/1.0 request without `Host`.
    pub host: Option<String>,
    /// The authority to send as `Host` (as the client wrote it).
    pub authority: Option<String>,
    pub body: BodyLength,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// The `Upgrade` value, when the client asked for one (`Connection: upgrade`).
    pub upgrade: Option<Vec<u8>>,
    pub expect_continue: bool,
    /// Bytes of the head, including the blank line.
    pub head_len: usize,
}

impl RequestHead {
    /// Safe to send again if a reused server connection failed before answering (RFC 9110
    /// §9.2.2), and only without a body, which is streamed and so not kept for a retry.
    pub fn retryable(&self) -> bool {
        matches!(
            self.method.as_ref(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ) && self.body == BodyLength::Empty
    }

    /// The value of the first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The value of cookie `name`, from any `Cookie` header.
    pub fn cookie(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(|&b| b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = pair.iter().position(|&b| b == b'=')?;
                (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
            })
    }
}

/// The header fields of a head, kept in one buffer: parsing a head costs two allocations,
/// not two per field (measured by the `http_parse` bench).
#[derive(Debug, Clone, Default)]
pub struct Fields {
    bytes: Vec<u8>,
    /// (name end, value end) in `bytes`; each field starts where the previous one ended.
    ends: Vec<(u32, u32)>,
}

impl Fields {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    fn push(&mut self, name: &str, value: &[u8]) {
        self.bytes.extend_from_slice(name.as_bytes());
        let name_end = self.bytes.len() as u32;
        self.bytes.extend_from_slice(value);
        self.ends.push((name_end, self.bytes.len() as u32));
    }

    /// The name of the field that starts at `start` and whose name ends at `name_end` (both
    /// taken from `ends`).
    ///
    /// Not checked again: every lookup of a header walks the names, and checking them was
    /// about 1% of a worker's CPU (decision 0032).
    #[inline]
    fn name_at(&self, start: usize, name_end: usize) -> &str {
        let name = &self.bytes[start..name_end];
        debug_assert!(std::str::from_utf8(name).is_ok());
        // SAFETY: the bytes from a field's start to its name's end are the name exactly as
        // `push` copied it from a `&str`: `ends` records those bounds as it copies, and
        // `retain`, the only other writer, moves whole fields and moves their bounds with
        // them. So they are UTF-8.
        unsafe { std::str::from_utf8_unchecked(name) }
    }

    /// The fields in order, as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(name_end, value_end)| {
            let (name_end, value_end) = (name_end as usize, value_end as usize);
            let name = self.name_at(start, name_end);
            let value = &self.bytes[name_end..value_end];
            start = value_end;
            (name, value)
        })
    }

    /// Keeps the fields for which `keep(name)` holds, moving them down in place.
    fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let (mut start, mut written, mut kept) = (0, 0, 0);
        for i in 0..self.ends.len() {
            let (name_end, value_end) = (self.ends[i].0 as usize, self.ends[i].1 as usize);
            if keep(self.name_at(start, name_end)) {
                let moved_by = start - written;
                if moved_by > 0 {
                    self.bytes.copy_within(start..value_end, written);
                    self.ends[kept] = ((name_end - moved_by) as u32, (value_end - moved_by) as u32);
                }
                written += value_end - start;
                kept += 1;
            }
            start = value_end;
        }
        self.bytes.truncate(written);
        self.ends.truncate(kept);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The bytes the fields' buffer holds room for.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), and are never
/// forwarded as received. `transfer-encoding` is not among them: bodies are relayed in the
/// framing they arrived in (validated), so the header stays with its body.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Fields a `Connection` header can never make hop-by-hop: they frame the message (or route
/// it), and dropping them would make the next hop read a different message than weir did —
/// `Connection: Transfer-Encoding` on a chunked response made the client read it until
/// close (found by the fuzz target).
const NEVER_HOP_BY_HOP: [&str; 3] = ["content-length", "transfer-encoding", "host"];

/// Whether header `name` describes the connection (a [`HOP_BY_HOP`] one or one `Connection`
/// names), compared without allocating.
fn is_hop_by_hop(name: &str, connection_tokens: &[&[u8]]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || (connection_tokens
            .iter()
            .any(|t| name.as_bytes().eq_ignore_ascii_case(t))
            && !NEVER_HOP_BY_HOP
                .iter()
                .any(|f| name.eq_ignore_ascii_case(f)))
}

/// Forwarding headers weir writes itself; from clients they are dropped unless trusted.
const FORWARDING: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "forwarded"];

/// Header slots kept on the stack while parsing (the default `max_headers` is 100).
const STACK_HEADERS: usize = 128;

/// `N` header slots for httparse to fill, left uninitialised: a parse writes only the slots
/// it returns, where an array of `httparse::EMPTY_HEADER` was 4 KiB of stores per head
/// (128 slots of 32 bytes), before the parse and whatever the head's size (decision 0033).
fn header_slots<'b, const N: usize>() -> [MaybeUninit<httparse::Header<'b>>; N] {
    [MaybeUninit::uninit(); N]
}

/// Parses the response head in `buf` into `response`, its headers into `slots`
/// (`httparse::Response::parse` with slots left uninitialised).
fn parse_response_with_slots<'h, 'b>(
    response: &mut httparse::Response<'h, 'b>,
    buf: &'b [u8],
    slots: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> httparse::Result<usize> {
    httparse::ParserConfig::default().parse_response_with_uninit_headers(response, buf, slots)
}

/// Where the head in `buf` ends (after its blank line), if it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete and
/// within limits.
pub fn parse_request(buf: &[u8], limits: &HeadLimits) -> Result<Option<RequestHead>, RequestError> {
    let mut head = RequestHead::default();
    Ok(parse_request_into(buf, limits, &mut head)?.then_some(head))
}

/// [`parse_request`] into `head`, reusing its allocations: `Ok(true)` when `head` now holds
/// the request, `Ok(false)` while it is incomplete (`head` is then left in any state, as it
/// is after an error).
pub fn parse_request_into(
    buf: &[u8],
    limits: &HeadLimits,
    head: &mut RequestHead,
) -> Result<bool, RequestError> {
    // RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line.
    let skipped = if buf.starts_with(b"\r\n") { 2 } else { 0 };
    let rest = &buf[skipped..];
    let line_end = memchr::memchr(b'\n', rest);
    if line_end.unwrap_or(rest.len()) > limits.max_request_line {
        return Err(refuse(414, "request line too long"));
    }
    let Some(end) = head_end(rest) else {
        if rest.len() > limits.max_header_bytes {
            return Err(refuse(431, "request head too large"));
        }
        // A bare LF already received need not wait for the rest to be refused.
        if has_bare_lf(rest) {
            return Err(refuse(400, "bare LF in request head"));
        }
        return Ok(false);
    };
    if end > limits.max_header_bytes {
        return Err(refuse(431, "request head too large"));
    }
    let text = &rest[..end];
    if has_bare_lf(text) {
        return Err(refuse(400, "bare LF in request head"));
    }
    // The usual limit fits on the stack; a larger one configured takes the heap. The slots
    // are left uninitialised: httparse writes each one it returns (see `header_slots`).
    let mut on_stack = header_slots::<STACK_HEADERS>();
    let mut on_heap = Vec::new();
    let headers = if limits.max_headers <= STACK_HEADERS {
        &mut on_stack[..limits.max_headers]
    } else {
        on_heap.resize(limits.max_headers, MaybeUninit::uninit());
        &mut on_heap[..]
    };
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(text, headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(refuse(400, "malformed request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many header fields")),
        Err(httparse::Error::Version) => return Err(refuse(505, "HTTP version not supported")),
        Err(httparse::Error::HeaderName) => return Err(refuse(400, "invalid header name")),
        Err(httparse::Error::HeaderValue) => return Err(refuse(400, "invalid header value")),
        Err(_) => return Err(refuse(400, "malformed request line or header")),
    }
    let method = method_name(request.method.unwrap_or_default());
    let raw_target = request.path.unwrap_or_default();
    let minor_version = request.version.unwrap_or(1);

    let mut host_header: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut connection_tokens = ConnectionTokens::new();
    let mut upgrade: Option<&[u8]> = None;
    let mut expect_continue = false;
    let kept = &mut head.headers;
    kept.clear();
    for header in request.headers.iter() {
        let name = header.name;
        let value = header.value;
        if name.eq_ignore_ascii_case("host") {
            if host_header.replace(value).is_some() {
                return Err(refuse(400, "more than one Host header"));
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(refuse(400, "more than one Content-Length"));
            }
            content_length = Some(parse_content_length(value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked {
                return Err(refuse(400, "more than one Transfer-Encoding"));
            }
            if !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(refuse(501, "transfer coding other than chunked"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            connection_tokens.extend(tokens(value));
            continue;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = Some(value);
            continue;
        } else if name.eq_ignore_ascii_case("expect") {
            if value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
                continue;
            }
            return Err(refuse(417, "unsupported expectation"));
        }
        kept.push(name, value);
    }
    if chunked && content_length.is_some() {
        return Err(refuse(400, "both Content-Length and Transfer-Encoding"));
    }
    if chunked && minor_version == 0 {
        return Err(refuse(400, "Transfer-Encoding in an HTTP/1.0 request"));
    }
    if method == "CONNECT" {
        return Err(refuse(501, "CONNECT is not supported"));
    }
    // TRACE echoes a request back, cookies and credentials included (cross-site tracing);
    // a balancer has nothing to learn from it that a log does not show.
    if method == "TRACE" {
        return Err(refuse(501, "TRACE is not supported"));
    }

    // The target: origin form, asterisk form for OPTIONS, or absolute form whose authority
    // must agree with Host (RFC 9112 §3.2.2 makes the target win; weir refuses the mismatch).
    let origin_form = raw_target.starts_with('/') || (raw_target == "*" && method == "OPTIONS");
    head.target.clear();
    let target_authority = if origin_form {
        head.target.push_str(raw_target);
        None
    } else if let Some((authority, path)) = split_absolute(raw_target) {
        if !path.starts_with('/') {
            head.target.push('/');
        }
        head.target.push_str(path);
        Some(authority)
    } else {
        return Err(refuse(400, "invalid request target"));
    };
    let host_value = match host_header {
        Some(value) => Some(std::str::from_utf8(value).map_err(|_| refuse(400, "invalid Host"))?),
        None if minor_version == 1 => return Err(refuse(400, "missing Host header")),
        None => None,
    };
    let host_name = host_value.map(host_of).transpose()?;
    // The authority to send on, and the host it names.
    let (host, authority) = match target_authority {
        Some(authority) => {
            let from_target = host_of(authority)?;
            if host_name.is_some_and(|h| !h.eq_ignore_ascii_case(from_target)) {
                return Err(refuse(400, "Host disagrees with the request target"));
            }
            (Some(from_target), Some(authority))
        }
        None => (host_name, host_value),
    };
    refill_lowercase(&mut head.host, host);
    refill(&mut head.authority, authority);

    // Headers named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
    kept.retain(|name| !is_hop_by_hop(name, &connection_tokens));
    let has = |token: &str| {
        connection_tokens
            .iter()
            .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
    };
    let keep_alive = if minor_version == 1 {
        !has("close")
    } else {
        has("keep-alive")
    };
    // An upgrade to h2c (cleartext HTTP/2, deprecated by RFC 9113) is not passed on: weir
    // speaks HTTP/1.1 to clients and would tunnel an HTTP/2 connection it cannot see into.
    // The request goes on as a plain HTTP/1.1 one, which a server must accept.
    let h2c = upgrade.is_some_and(|u| tokens(u).any(|t| t.eq_ignore_ascii_case(b"h2c")));
    if h2c {
        kept.retain(|name| !name.eq_ignore_ascii_case("http2-settings"));
    }
    head.upgrade = upgrade
        .filter(|_| has("upgrade") && minor_version == 1 && !h2c)
        .map(<[u8]>::to_vec);
    head.body = match (chunked, content_length) {
        (true, _) => BodyLength::Chunked,
        (false, Some(0) | None) => BodyLength::Empty,
        (false, Some(length)) => BodyLength::Fixed(length),
    };
    head.method = method;
    head.minor_version = minor_version;
    head.keep_alive = keep_alive;
    head.expect_continue = expect_continue;
    head.head_len = skipped + end;
    Ok(true)
}

/// The tokens of a head's `Connection` headers, borrowed from the head: on the stack up to
/// eight (a head has one or two).
type ConnectionTokens<'a> = smallvec::SmallVec<[&'a [u8]; 8]>;

/// Sets `slot` to `value`, reusing the string already there.
fn refill(slot: &mut Option<String>, value: Option<&str>) {
    match value {
        Some(value) => {
            let string = slot.get_or_insert_with(String::new);
            string.clear();
            string.push_str(value);
        }
        None => *slot = None,
    }
}

/// [`refill`] with `value` in lower case.
fn refill_lowercase(slot: &mut Option<String>, value: Option<&str>) {
    refill(slot, value);
    if let Some(string) = slot {
        string.make_ascii_lowercase();
    }
}

/// A method's name: one of the standard ones without allocating, else a copy.
fn method_name(raw: &str) -> Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
    ];
    match STANDARD.iter().find(|m| **m == raw) {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(raw.to_string()),
    }
}

fn has_bare_lf(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}

/// `1*DIGIT`, nothing else, and small enough to count.
fn parse_content_length(value: &[u8]) -> Result<u64, RequestError> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return Err(refuse(400, "invalid Content-Length"));
    }
    Ok(value
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// The comma-separated tokens of a header value, trimmed, borrowed from it (compare them
/// without regard to case).
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// `http://authority/path` → (authority, `/path`); the path lacks its `/` when the target
/// starts it with `?` or ends at the authority.
fn split_absolute(target: &str) -> Option<(&str, &str)> {
    let scheme_end = target.find("://")?;
    if !target[..scheme_end].eq_ignore_ascii_case("http") {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let path_start = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(path_start);
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    Some((authority, path))
}

/// The host name of an authority (`name[:port]` or `[v6][:port]`), without the port and a
/// trailing dot; routing takes it in lower case.
fn host_of(authority: &str) -> Result<&str, RequestError> {
    let bad = || refuse(400, "invalid Host");
    let (host, port) = if authority.starts_with('[') {
        let close = authority.find(']').ok_or_else(bad)?;
        authority[1..close]
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad())?;
        authority.split_at(close + 1)
    } else {
        authority.split_at(authority.find(':').unwrap_or(authority.len()))
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = !host.is_empty()
        && host.len() <= 255
        && (host.starts_with('[')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b)));
    if !port_ok || !name_ok {
        return Err(bad());
    }
    Ok(host.strip_suffix('.').unwrap_or(host))
}

/// A response head from a server.
#[derive(Debug, Clone, Default)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub minor_version: u8,
    /// Header fields as received, minus hop-by-hop ones (`Transfer-Encoding` kept).
    pub headers: Fields,
    pub body: BodyLength,
    /// The server keeps the connection open after this response.
    pub keep_alive: bool,
    /// The `Upgrade` value of a `101 Switching Protocols`.
    pub upgrade: Option<Vec<u8>>,
    pub head_len: usize,
}

/// Why a server's response cannot be relayed (the client gets 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid response from the server: {0}")]
pub struct ResponseError(pub &'static str);

/// Largest response head weir accepts from a server.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header fields weir accepts in a response head.
pub const MAX_RESPONSE_HEADERS: usize = 128;

/// Parses the response head at the start of `buf`, for a request with method `method`.
pub fn parse_response(buf: &[u8], method: &str) -> Result<Option<ResponseHead>, ResponseError> {
    let mut head = ResponseHead::default();
    Ok(parse_response_into(buf, method, &mut head)?.then_some(head))
}

/// [`parse_response`] into `head`, reusing its allocations (as [`parse_request_into`]).
pub fn parse_response_into(
    buf: &[u8],
    method: &str,
    head: &mut ResponseHead,
) -> Result<bool, ResponseError> {
    let Some(end) = head_end(buf) else {
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(ResponseError("head too large"));
        }
        // What has arrived must already read as the start of a response head: a server
        // answering something else (another protocol, garbage) is refused now, not when the
        // response timeout ends the wait for a blank line that never comes.
        let mut headers = header_slots::<MAX_RESPONSE_HEADERS>();
        let mut response = httparse::Response::new(&mut []);
        if parse_response_with_slots(&mut response, buf, &mut headers).is_err() {
            return Err(ResponseError("malformed head"));
        }
        return Ok(false);
    };
    if end > MAX_RESPONSE_HEAD {
        return Err(ResponseError("head too large"));
    }
    let mut headers = header_slots::<MAX_RESPONSE_HEADERS>();
    let mut response = httparse::Response::new(&mut []);
    match parse_response_with_slots(&mut response, &buf[..end], &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(ResponseError("malformed head")),
    }
    let status = response.code.unwrap_or_default();
    // Three digits, 100 to 599 (RFC 9110 §15): httparse reads `050` as 50, which weir would
    // write on as a status line no client can read (found by the fuzz target).
    if !(100..=599).contains(&status) {
        return Err(ResponseError("status code out of range"));
    }
    let minor_version = response.version.unwrap_or(1);
    head.reason.clear();
    head.reason.push_str(response.reason.unwrap_or_default());
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut connection_tokens = ConnectionTokens::new();
    let mut upgrade = None;
    let kept = &mut head.headers;
    kept.clear();
    for header in response.headers.iter() {
        let (name, value) = (header.name, header.value);
        if name.eq_ignore_ascii_case("content-length") {
            let length =
                parse_content_length(value).map_err(|_| ResponseError("bad Content-Length"))?;
            if content_length.replace(length).is_some_and(|l| l != length) {
                return Err(ResponseError("conflicting Content-Length"));
            }
            if kept
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            {
                continue;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked must be the last coding; anything else is read until close.
            let last = tokens(value).last();
            chunked = last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            other_coding = !chunked;
        } else if name.eq_ignore_ascii_case("connection") {
            connection_tokens.extend(tokens(value));
            continue;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = Some(value);
            continue;
        }
        kept.push(name, value);
    }
    if (chunked || other_coding) && content_length.is_some() {
        return Err(ResponseError("both Content-Length and Transfer-Encoding"));
    }
    kept.retain(|name| !is_hop_by_hop(name, &connection_tokens));
    let has = |token: &str| {
        connection_tokens
            .iter()
            .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
    };
    let no_body =
        method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
    let body = if no_body {
        BodyLength::Empty
    } else if chunked {
        BodyLength::Chunked
    } else if other_coding {
        BodyLength::UntilClose
    } else {
        match content_length {
            Some(0) => BodyLength::Empty,
            Some(length) => BodyLength::Fixed(length),
            None => BodyLength::UntilClose,
        }
    };
    let keep_alive = body != BodyLength::UntilClose
        && if minor_version == 1 {
            !has("close")
        } else {
            has("keep-alive")
        };
    head.status = status;
    head.minor_version = minor_version;
    head.body = body;
    head.keep_alive = keep_alive;
    head.upgrade = upgrade.filter(|_| status == 101).map(<[u8]>::to_vec);
    head.head_len = end;
    Ok(true)
}

/// Who sent a request, for the forwarding headers.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    /// It came over TLS: the protocol forwarded is `https`.
    pub tls: bool,
}

/// Writes the head of `request` as it goes to a server: HTTP/1.1, the hop-by-hop headers
/// gone, the forwarding headers the config asks for.
pub fn write_server_head(
    request: &RequestHead,
    client: ClientInfo,
    forwarded: &ForwardedHeaders,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(request.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(request.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut saw_host = false;
    let mut prior_xff: Vec<&[u8]> = Vec::new();
    let mut prior_forwarded: Vec<&[u8]> = Vec::new();
    let mut prior_via: Vec<&[u8]> = Vec::new();
    for (name, value) in request.headers.iter() {
        if name.eq_ignore_ascii_case("host") {
            // The target's authority wins over Host (they agree, or the request was refused).
            saw_host = true;
            let authority = request.authority.as_deref().unwrap_or_default();
            push_header(out, "Host", authority.as_bytes());
            continue;
        }
        if FORWARDING.iter().any(|f| name.eq_ignore_ascii_case(f)) {
            if forwarded.trust_incoming {
                if name.eq_ignore_ascii_case("x-forwarded-for") {
                    prior_xff.push(value);
                } else if name.eq_ignore_ascii_case("forwarded") {
                    prior_forwarded.push(value);
                } else {
                    push_header(out, name, value);
                }
            }
            continue;
        }
        if name.eq_ignore_ascii_case("via") {
            prior_via.push(value);
            continue;
        }
        push_header(out, name, value);
    }
    if !saw_host && let Some(authority) = &request.authority {
        push_header(out, "Host", authority.as_bytes());
    }
    if let Some(upgrade) = &request.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
        push_header(out, "Upgrade", upgrade);
    }
    let ip = client.peer.ip();
    if forwarded.x_forwarded_for {
        // Written in place (as the status line and `Via`): no allocation per request.
        out.extend_from_slice(b"X-Forwarded-For: ");
        write_list(out, &prior_xff);
        if !prior_xff.is_empty() {
            out.extend_from_slice(b", ");
        }
        push_ip(out, ip);
        out.extend_from_slice(b"\r\n");
    }
    // A trusted proxy in front already said which protocol the client used.
    let proto_known = forwarded.trust_incoming && request.header("x-forwarded-proto").is_some();
    if forwarded.x_forwarded_proto && !proto_known {
        out.extend_from_slice(if client.tls {
            b"X-Forwarded-Proto: https\r\n"
        } else {
            b"X-Forwarded-Proto: http\r\n"
        });
    }
    if forwarded.forwarded {
        let node = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let mut value = join(&prior_forwarded);
        if !value.is_empty() {
            value.extend_from_slice(b", ");
        }
        let proto = if client.tls { "https" } else { "http" };
        value.extend_from_slice(format!("for={node};proto={proto}").as_bytes());
        if let Some(host) = &request.authority {
            let quoted = host.contains([':', '[']);
            if quoted {
                value.extend_from_slice(format!(";host=\"{host}\"").as_bytes());
            } else {
                value.extend_from_slice(format!(";host={host}").as_bytes());
            }
        }
        push_header(out, "Forwarded", &value);
    }
    write_via(out, &prior_via, request.minor_version, forwarded.via);
    out.extend_from_slice(b"\r\n");
}

/// Writes the head of `response` as it goes back to a client speaking HTTP/1.`client_minor`.
/// `close` says weir closes the client connection after this response; `dechunk` that the
/// body is decoded from chunked (for an HTTP/1.0 client), so `Transfer-Encoding` goes;
/// `added` is whole header lines the vhost adds (HSTS), written after the server's.
pub fn write_client_head(
    response: &ResponseHead,
    client_minor: u8,
    close: bool,
    dechunk: bool,
    via: bool,
    added: &[u8],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, response.status.into());
    out.push(b' ');
    out.extend_from_slice(response.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut prior_via: Vec<&[u8]> = Vec::new();
    for (name, value) in response.headers.iter() {
        if name.eq_ignore_ascii_case("via") {
            prior_via.push(value);
            continue;
        }
        if dechunk && name.eq_ignore_ascii_case("transfer-encoding") {
            continue;
        }
        push_header(out, name, value);
    }
    out.extend_from_slice(added);
    if let Some(upgrade) = &response.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
        push_header(out, "Upgrade", upgrade);
    } else if close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if client_minor == 0 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    write_via(out, &prior_via, response.minor_version, via);
    out.extend_from_slice(b"\r\n");
}

fn write_via(out: &mut Vec<u8>, prior: &[&[u8]], minor: u8, add: bool) {
    if prior.is_empty() && !add {
        return;
    }
    out.extend_from_slice(b"Via: ");
    write_list(out, prior);
    if add {
        if !prior.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(b"1.");
        push_decimal(out, minor.into());
        out.extend_from_slice(b" weir");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `values` separated by `, `, as one field value.
fn write_list(out: &mut Vec<u8>, values: &[&[u8]]) {
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(value);
    }
}

fn join(values: &[&[u8]]) -> Vec<u8> {
    values.join(&b", "[..])
}

/// Writes `n` in decimal. The status code, the HTTP minor version and the client's address go
/// into every head; `write!` took about 1% of a worker's CPU for them (decision 0032).
fn push_decimal(out: &mut Vec<u8>, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Writes `ip` as its text form: IPv4 by hand (see [`push_decimal`]), IPv6 (whose shortest
/// form takes more) through `Display`.
fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, octet.into());
            }
        }
        // Writing into a Vec cannot fail.
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A complete response weir writes itself (errors, 404): a short text body, and the
/// connection closed unless `keep_alive`.
pub fn local_response(status: u16, message: &str, keep_alive: bool) -> Vec<u8> {
    let reason = reason_phrase(status);
    let body = format!("{status} {reason}: {message}\n");
    let connection = if keep_alive { "keep-alive" } else { "close" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nServer: weir\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_request_line: 100,
        max_header_bytes: 400,
        max_headers: 10,
    };

    fn parse(head: &str) -> Result<Option<RequestHead>, RequestError> {
        parse_request(head.as_bytes(), &LIMITS)
    }

    #[test]
    fn numbers_and_addresses_written_by_hand_read_as_display_writes_them() {
        let numbers: [u32; 13] = [
            0, 1, 9, 10, 99, 100, 101, 200, 308, 999, 1000, 65535, 4294967295,
        ];
        for n in numbers {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        let addresses = [
            "0.0.0.0",
            "9.10.99.100",
            "198.18.0.1",
            "255.255.255.255",
            "fd00::1",
            "::ffff:198.18.0.1",
        ];
        for address in addresses {
            let ip: std::net::IpAddr = address.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(out, address.as_bytes());
        }
    }

    #[test]
    fn a_head_parsed_into_again_is_the_head_parsed_afresh() {
        // Each request sets what the one before left behind: absolute target, upgrade,
        // hop-by-hop fields, HTTP/1.0 without Host, expectation.
        let requests = [
            "GET http://Shop.Test:81?q HTTP/1.1\r\nHost: shop.test:81\r\nConnection: upgrade, X-A\r\nUpgrade: websocket\r\nX-A: 1\r\nX-B: 2\r\n\r\n",
            "POST /upload HTTP/1.1\r\nHost: b.test\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.0\r\nX-C: 3\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: c.test\r\nConnection: close\r\n\r\n",
            "GET http://d.test/x HTTP/1.1\r\nHost: D.test\r\n\r\n",
        ];
        let mut reused = RequestHead::default();
        for text in requests.iter().chain(requests.iter().rev()) {
            assert!(parse_request_into(text.as_bytes(), &LIMITS, &mut reused).unwrap());
            let fresh = parse(text).unwrap().unwrap();
            assert_eq!(format!("{reused:?}"), format!("{fresh:?}"), "{text:?}");
        }
        let responses = [
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Gone\r\nX-Gone: 1\r\nX-Kept: 2\r\n\r\n",
            "HTTP/1.0 404 Not Found\r\n\r\n",
        ];
        let mut reused = ResponseHead::default();
        for text in responses.iter().chain(responses.iter().rev()) {
            assert!(parse_response_into(text.as_bytes(), "GET", &mut reused).unwrap());
            let fresh = parse_response(text.as_bytes(), "GET").unwrap().unwrap();
            assert_eq!(format!("{reused:?}"), format!("{fresh:?}"), "{text:?}");
        }
    }

    #[test]
    fn fields_left_out_close_up_and_the_rest_keep_their_order_and_values() {
        let mut fields = Fields::default();
        for (name, value) in [
            ("a", "1"),
            ("gone", "x"),
            ("b", "22"),
            ("gone", ""),
            ("c", ""),
        ] {
            fields.push(name, value.as_bytes());
        }
        fields.retain(|name| name != "gone");
        let kept: Vec<(&str, &[u8])> = fields.iter().collect();
        assert_eq!(kept, [("a", &b"1"[..]), ("b", &b"22"[..]), ("c", &b""[..])]);
        fields.retain(|_| false);
        assert!(fields.is_empty() && fields.iter().next().is_none());
    }

    #[test]
    fn a_request_head_gives_its_framing_host_and_connection_intent() {
        let request = parse("POST /a?b HTTP/1.1\r\nHost: Shop.Test:8080\r\nContent-Length: 12\r\nConnection: close, X-Gone\r\nX-Gone: 1\r\nX-Kept: 2\r\n\r\nbody")
            .unwrap()
            .unwrap();
        assert_eq!(
            (request.method.as_ref(), request.target.as_str()),
            ("POST", "/a?b")
        );
        assert_eq!(request.host.as_deref(), Some("shop.test"));
        assert_eq!(request.authority.as_deref(), Some("Shop.Test:8080"));
        assert_eq!(request.body, BodyLength::Fixed(12));
        assert!(!request.keep_alive);
        assert!(request.header("x-gone").is_none() && request.header("x-kept").is_some());
        assert_eq!(request.head_len, request.head_len.min(200));
        assert!(!request.retryable());

        let old = parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(old.keep_alive && old.host.is_none() && old.retryable());
        let chunked = parse("PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(chunked.body, BodyLength::Chunked);
        let ipv6 = parse("GET / HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(ipv6.host.as_deref(), Some("[fd00::1]"));
    }

    #[test]
    fn an_incomplete_head_waits_within_limits_and_is_refused_past_them() {
        assert!(parse("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        assert_eq!(
            parse(&format!("GET /{} HTTP/1.1", "a".repeat(120)))
                .unwrap_err()
                .status,
            414
        );
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(500)))
                .unwrap_err()
                .status,
            431
        );
        assert_eq!(parse("GET / HTTP/1.1\nHost").unwrap_err().status, 400);
    }

    #[test]
    fn the_server_head_carries_forwarding_headers_and_no_hop_by_hop_ones() {
        let request = parse("GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 6.6.6.6\r\nVia: 1.0 front\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        let client = ClientInfo {
            peer: "[fd00::7]:5000".parse().unwrap(),
            tls: false,
        };
        let forwarded = ForwardedHeaders {
            forwarded: true,
            ..ForwardedHeaders::default()
        };
        write_server_head(&request, client, &forwarded, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "GET /x HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\nX-Forwarded-For: fd00::7\r\nX-Forwarded-Proto: http\r\nForwarded: for=\"[fd00::7]\";proto=http;host=a.test\r\nVia: 1.0 front, 1.1 weir\r\n\r\n"
        );
        let trusting = ForwardedHeaders {
            trust_incoming: true,
            ..ForwardedHeaders::default()
        };
        let mut out = Vec::new();
        write_server_head(&request, client, &trusting, &mut out);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("X-Forwarded-For: 6.6.6.6, fd00::7\r\n")
        );
    }

    #[test]
    fn connection_cannot_strip_the_fields_that_frame_a_message() {
        let response = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: Transfer-Encoding, X-A\r\nX-A: 1\r\n\r\n",
            "GET",
        )
        .unwrap()
        .unwrap();
        let mut out = Vec::new();
        write_client_head(&response, 1, false, false, false, b"", &mut out);
        let again = parse_response(&out, "GET").unwrap().unwrap();
        assert_eq!(
            (response.body, again.body),
            (BodyLength::Chunked, BodyLength::Chunked)
        );
        assert!(
            !String::from_utf8_lossy(&out).contains("X-A"),
            "named fields still go"
        );
        let request = parse(
            "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nConnection: Content-Length, Host\r\n\r\nabc",
        )
        .unwrap()
        .unwrap();
        let mut out = Vec::new();
        let client = ClientInfo {
            peer: "198.18.0.1:1".parse().unwrap(),
            tls: false,
        };
        write_server_head(&request, client, &ForwardedHeaders::default(), &mut out);
        let limits = HeadLimits {
            max_request_line: 8192,
            max_header_bytes: 65536,
            max_headers: 100,
        };
        let again = parse_request(&out, &limits).unwrap().unwrap();
        assert_eq!(again.body, BodyLength::Fixed(3));
        assert_eq!(again.host.as_deref(), Some("a.test"));
    }

    #[test]
    fn a_request_that_came_over_tls_is_forwarded_as_https_and_hsts_lines_are_added() {
        let request = parse("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .unwrap()
            .unwrap();
        let client = ClientInfo {
            peer: "198.18.0.1:1".parse().unwrap(),
            tls: true,
        };
        let forwarded = ForwardedHeaders {
            forwarded: true,
            ..ForwardedHeaders::default()
        };
        let mut out = Vec::new();
        write_server_head(&request, client, &forwarded, &mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("X-Forwarded-Proto: https\r\n"), "{text}");
        assert!(
            text.contains("Forwarded: for=198.18.0.1;proto=https;host=a.test\r\n"),
            "{text}"
        );
        let response = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "GET")
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        let hsts = b"Strict-Transport-Security: max-age=600\r\n";
        write_client_head(&response, 1, false, false, false, hsts, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nStrict-Transport-Security: max-age=600\r\n\r\n"
        );
    }

    #[test]
    fn a_status_code_outside_100_to_599_is_refused() {
        for line in [
            "HTTP/1.1 050 X",
            "HTTP/1.1 099 X",
            "HTTP/1.1 600 X",
            "HTTP/1.1 000 X",
        ] {
            let head = format!("{line}\r\nContent-Length: 0\r\n\r\n");
            assert!(parse_response(head.as_bytes(), "GET").is_err(), "{line}");
        }
        for line in ["HTTP/1.1 100 Continue", "HTTP/1.1 599 X"] {
            let head = format!("{line}\r\n\r\n");
            assert!(parse_response(head.as_bytes(), "GET").is_ok(), "{line}");
        }
    }

    #[test]
    fn response_framing_follows_the_method_and_status() {
        let head = |text: &str, method| parse_response(text.as_bytes(), method).unwrap().unwrap();
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "GET").body,
            BodyLength::Fixed(5)
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD").body,
            BodyLength::Empty
        );
        assert_eq!(
            head("HTTP/1.1 304 Not Modified\r\n\r\n", "GET").body,
            BodyLength::Empty
        );
        let close = head("HTTP/1.1 200 OK\r\n\r\n", "GET");
        assert_eq!(
            (close.body, close.keep_alive),
            (BodyLength::UntilClose, false)
        );
        let old = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", "GET");
        assert!(!old.keep_alive);
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "GET"
            )
            .is_err()
        );
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "GET"
            )
            .is_err()
        );
    }
}
