//! A blocking HTTP/1.1 client for the L7 tests: keep-alive, bodies sent from [`pattern`]
//! in either framing, responses read in any framing and checked by length and xxh3 without
//! keeping large bodies in memory.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::http_origin::{BodySink, bad, pattern, read_fields, read_line, write_pattern};

/// How long the client waits for an answer before calling it a failure.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A response as received.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The first 64 KiB of the body.
    pub body: Vec<u8>,
    pub body_length: u64,
    pub body_xxh3: u64,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request body to send.
#[derive(Debug, Clone, Copy)]
pub enum Body {
    None,
    /// N pattern bytes with `Content-Length`.
    Fixed(u64),
    /// N pattern bytes, chunked.
    Chunked(u64),
}

/// One client connection.
pub struct HttpConn {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl HttpConn {
    pub fn connect(address: SocketAddr) -> io::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&address, HTTP_TIMEOUT)?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    /// Sends `method path` for `host` with `headers` (each `Name: value\r\n`) and `body`,
    /// then reads the response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        host: &str,
        headers: &str,
        body: Body,
    ) -> io::Result<Response> {
        self.send(method, path, host, headers, body)?;
        self.read_response(method == "HEAD")
    }

    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        host: &str,
        headers: &str,
        body: Body,
    ) -> io::Result<()> {
        write_request(&mut &self.stream, method, path, host, headers, body)
    }

    /// Writes `bytes` as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response (interim 1xx responses are skipped, except 101).
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        loop {
            let response = self.read_one(head_request)?;
            if !(100..200).contains(&response.status) || response.status == 101 {
                return Ok(response);
            }
        }
    }

    /// The status of the next response, interim (1xx) ones included.
    pub fn read_response_raw_status(&mut self) -> io::Result<u16> {
        self.read_one(false).map(|r| r.status)
    }

    /// Reads exactly `n` bytes (after an upgrade).
    pub fn read_exact_bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; n];
        self.reader.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    fn read_one(&mut self, head_request: bool) -> io::Result<Response> {
        read_response_from(&mut self.reader, head_request)
    }

    /// Whether the server closed the connection (end of file within `wait`).
    pub fn closed_by_peer(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).ok();
        let closed = matches!(
            self.reader.fill_buf().map(|b| b.is_empty()),
            Ok(true) | Err(_)
        );
        self.stream.set_read_timeout(Some(HTTP_TIMEOUT)).ok();
        closed
    }
}

/// Writes a request: `method path` for `host` with `headers` (each `Name: value\r\n`) and
/// `body`, through a buffer so that a large body goes out in large writes.
pub(crate) fn write_request(
    to: &mut impl Write,
    method: &str,
    path: &str,
    host: &str,
    headers: &str,
    body: Body,
) -> io::Result<()> {
    let framing = match body {
        Body::None => String::new(),
        Body::Fixed(n) => format!("Content-Length: {n}\r\n"),
        Body::Chunked(_) => "Transfer-Encoding: chunked\r\n".to_string(),
    };
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{headers}{framing}\r\n");
    let mut writer = io::BufWriter::with_capacity(256 * 1024, to);
    writer.write_all(head.as_bytes())?;
    match body {
        Body::None => {}
        Body::Fixed(n) => write_pattern(&mut writer, n, false)?,
        Body::Chunked(n) => write_pattern(&mut writer, n, true)?,
    }
    writer.flush()
}

/// Reads one response, interim ones included, its body in whatever framing it has (none
/// after a `HEAD`).
pub(crate) fn read_response_from(
    reader: &mut impl BufRead,
    head_request: bool,
) -> io::Result<Response> {
    let status_line =
        read_line(reader)?.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers = read_fields(reader)?;
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
        body_length: 0,
        body_xxh3: 0,
    };
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(response);
    }
    let mut sink = BodySink::new(64 * 1024);
    if response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        sink.read_chunked(reader)?;
    } else if let Some(length) = response.header("content-length") {
        let length: u64 = length.parse().map_err(|_| bad("bad Content-Length"))?;
        sink.read(reader, Some(length))?;
    } else {
        sink.read(reader, None)?;
    }
    response.body = sink.first;
    response.body_length = sink.length;
    response.body_xxh3 = sink.hasher.digest();
    Ok(response)
}

/// Sends `bytes` on a new connection and reads until the server closes it (or `wait`
/// passes): what a malformed-request test needs to see the answer and the close.
pub fn raw_exchange(
    address: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> io::Result<(String, bool)> {
    let mut stream = TcpStream::connect_timeout(&address, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(wait))?;
    stream.write_all(bytes)?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let closed = loop {
        match crate::read_some(&mut stream, &mut buf) {
            Ok(0) => break true,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    Ok((String::from_utf8_lossy(&answer).into_owned(), closed))
}

/// `GET path` on `address` on a connection of its own (HTTP/1.0, so the server closes it);
/// the body of a 200, anything else an error naming the status line. For the plain HTTP
/// endpoints beside the proxy: `/metrics`, Prometheus's API.
pub fn get_body(address: &str, path: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no response head"))?;
    let status = head.lines().next().unwrap_or("");
    if !matches!(status.split(' ').nth(1), Some("200")) {
        return Err(io::Error::other(format!(
            "{address}{path} answered {status}"
        )));
    }
    Ok(body.to_string())
}

/// The value of the unlabelled series `name` in a Prometheus exposition (what [`get_body`]
/// gets from `/metrics`), if it is there.
pub fn exposition_value(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The [`pattern`] byte check a test can use on a body prefix.
pub fn is_pattern(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(i as u64))
}
