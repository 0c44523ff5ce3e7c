//! A mock HTTP/1.1 origin for the L7 tests: keep-alive, bodies in both framings, upgrades,
//! and a record of every request it parsed, so tests can assert on what reached the server
//! side (headers added by the proxy, connection reuse, and that a smuggled request never
//! arrived).
//!
//! Its parser is written here, line by line, independently of the proxy's. It is strict
//! where a mismatch with the proxy would show (CRLF only, one framing header).
//!
//! Paths:
//! - `/bytes/N`: N bytes of [`pattern`], with `Content-Length`; `/chunked/N`: the same
//!   chunked; `/close/N`: the same, delimited by closing the connection; `/truncated/N`:
//!   announces N bytes, sends half, closes (a server dying mid-response).
//! - `/upload` (any method with a body): answers `<length> <xxh3 hex>` of the body it read.
//! - `/ws` with `Upgrade`: `101`, then echoes every byte.
//! - `/status/NNN`: answers that status; `/slow/MS`: waits, then answers.
//! - anything else: `<name>\n` and `X-Served-By: <name>`.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use xxhash_rust::xxh3::Xxh3;

/// Byte `i` of every generated body: a pattern a receiver can check without a copy.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(7) % 251) as u8
}

/// Length and xxh3 of `n` bytes of [`pattern`].
pub fn pattern_digest(n: u64) -> (u64, u64) {
    let mut hasher = Xxh3::new();
    let mut chunk = Vec::with_capacity(64 * 1024);
    let mut at = 0;
    while at < n {
        chunk.clear();
        let len = (n - at).min(64 * 1024);
        chunk.extend((at..at + len).map(pattern));
        hasher.update(&chunk);
        at += len;
    }
    (n, hasher.digest())
}

/// A request as the origin received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body_length: u64,
    /// Which of the origin's connections carried it (1, 2, ...).
    pub connection: u64,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// [`HttpOrigin`] answers normally.
const ANSWERS: u8 = 0;
/// [`HttpOrigin`] answers `503`.
const FAILS: u8 = 1;
/// [`HttpOrigin`] sends half a response head and closes.
const BREAKS: u8 = 2;

/// A running origin; stops (closes its listener and connections) when dropped.
pub struct HttpOrigin {
    pub address: SocketAddr,
    pub name: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    connections: Arc<AtomicU64>,
    stopped: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// How it answers: [`ANSWERS`], [`FAILS`] or [`BREAKS`].
    mode: Arc<AtomicU8>,
}

impl HttpOrigin {
    /// Listens on `address` (port 0 picks one) and serves until dropped.
    pub fn start(address: SocketAddr, name: &str) -> io::Result<HttpOrigin> {
        let listener = TcpListener::bind(address)?;
        let address = listener.local_addr()?;
        let origin = HttpOrigin {
            address,
            name: name.to_string(),
            seen: Arc::default(),
            connections: Arc::default(),
            stopped: Arc::default(),
            open: Arc::default(),
            mode: Arc::default(),
        };
        let (seen, connections, stopped, open, mode) = (
            Arc::clone(&origin.seen),
            Arc::clone(&origin.connections),
            Arc::clone(&origin.stopped),
            Arc::clone(&origin.open),
            Arc::clone(&origin.mode),
        );
        let name = name.to_string();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let id = connections.fetch_add(1, Ordering::Relaxed) + 1;
                if let Ok(clone) = stream.try_clone() {
                    open.lock().unwrap().push(clone);
                }
                let seen = Arc::clone(&seen);
                let mode = Arc::clone(&mode);
                let name = name.clone();
                thread::spawn(move || {
                    // The clone kept in `open` holds the socket: close it explicitly.
                    let closer = stream.try_clone();
                    let _ = serve(stream, &name, id, &seen, &mode);
                    if let Ok(closer) = closer {
                        let _ = closer.shutdown(Shutdown::Both);
                    }
                });
            }
        });
        Ok(origin)
    }

    /// From now on, answer every request with `503` (a broken deploy), or stop doing so.
    pub fn set_failing(&self, failing: bool) {
        self.mode
            .store(if failing { FAILS } else { ANSWERS }, Ordering::Relaxed);
    }

    /// From now on, answer every request with the first bytes of a response head and close (a
    /// server killed while it answers), or stop doing so.
    pub fn set_breaking(&self, breaking: bool) {
        self.mode
            .store(if breaking { BREAKS } else { ANSWERS }, Ordering::Relaxed);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connections that are still open (from the origin's side).
    pub fn open_connections(&self) -> usize {
        let mut open = self.open.lock().unwrap();
        open.retain(|s| {
            let mut byte = [0u8; 1];
            s.set_nonblocking(true).ok();
            let alive = match s.peek(&mut byte) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            };
            s.set_nonblocking(false).ok();
            alive
        });
        open.len()
    }
}

impl Drop for HttpOrigin {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag and drops the listener.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

pub(crate) fn bad(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

/// What a test-bed peer takes in of a body it reads: its length, its XXH3 hash, and its first
/// `keep` bytes (what tests look at), never more.
pub(crate) struct BodySink {
    pub first: Vec<u8>,
    pub length: u64,
    pub hasher: Xxh3,
    keep: usize,
    buf: Vec<u8>,
}

impl BodySink {
    pub(crate) fn new(keep: usize) -> BodySink {
        BodySink {
            first: Vec::new(),
            length: 0,
            hasher: Xxh3::new(),
            keep,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Reads `length` bytes of body from `from`, or up to end of file for `None`.
    pub(crate) fn read(&mut self, from: &mut impl Read, length: Option<u64>) -> io::Result<()> {
        let mut from = from.take(length.unwrap_or(u64::MAX));
        let mut read = 0u64;
        loop {
            let n = crate::read_some(&mut from, &mut self.buf)?;
            if n == 0 {
                break;
            }
            let bytes = &self.buf[..n];
            self.hasher.update(bytes);
            let kept = self.keep.saturating_sub(self.first.len()).min(n);
            self.first.extend_from_slice(&bytes[..kept]);
            read += n as u64;
        }
        if length.is_some_and(|length| read != length) {
            return Err(bad("body cut short"));
        }
        self.length += read;
        Ok(())
    }

    /// Reads a chunked body from `reader`: its chunks, its trailers and the blank line.
    pub(crate) fn read_chunked(&mut self, reader: &mut impl BufRead) -> io::Result<()> {
        loop {
            let line = read_line(reader)?.ok_or_else(|| bad("end of file in chunk size"))?;
            let size_text = line.split(';').next().unwrap_or_default();
            let size = u64::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                while !read_line(reader)?
                    .ok_or_else(|| bad("end of file in trailers"))?
                    .is_empty()
                {}
                return Ok(());
            }
            self.read(reader, Some(size))?;
            if !read_line(reader)?.is_some_and(|l| l.is_empty()) {
                return Err(bad("chunk data longer than its size"));
            }
        }
    }
}

/// Reads one CRLF-terminated line (without the CRLF); `None` at end of file.
pub(crate) fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad("line not ended by CRLF"));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| bad("not UTF-8"))
}

/// Reads header field lines up to the blank line that ends a head.
pub(crate) fn read_fields(reader: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut fields = Vec::new();
    loop {
        let line = read_line(reader)?.ok_or_else(|| bad("end of file in head"))?;
        if line.is_empty() {
            return Ok(fields);
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("header without colon"))?;
        fields.push((name.to_string(), value.trim().to_string()));
    }
}

fn serve(
    stream: TcpStream,
    name: &str,
    id: u64,
    seen: &Mutex<Vec<SeenRequest>>,
    mode: &AtomicU8,
) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    // Responses go out in one write each (flushed below): no Nagle stalls on small pieces.
    stream.set_nodelay(true)?;
    let mut writer = io::BufWriter::with_capacity(64 * 1024, stream);
    loop {
        let Some(request_line) = read_line(&mut reader)? else {
            return Ok(());
        };
        let mut parts = request_line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("bad request line"));
        };
        let headers = read_fields(&mut reader)?;
        let mut request = SeenRequest {
            method: method.to_string(),
            target: target.to_string(),
            version: version.to_string(),
            headers,
            body_length: 0,
            connection: id,
        };
        let content_length = request.header("content-length").map(|v| v.parse::<u64>());
        let chunked = request
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked && content_length.is_some() {
            return Err(bad("both framings"));
        }
        let mut body = BodySink::new(0);
        if chunked {
            body.read_chunked(&mut reader)?;
        } else if let Some(length) = content_length {
            let length = length.map_err(|_| bad("bad Content-Length"))?;
            body.read(&mut reader, Some(length))?;
        }
        request.body_length = body.length;
        seen.lock().unwrap().push(request.clone());
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let keep = !close;
        let path = request.target.as_str();
        if path == "/ws" && request.header("upgrade").is_some() {
            write!(
                writer,
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {}\r\n\r\n",
                request.header("upgrade").unwrap_or_default()
            )?;
            // Echo what the reader already buffered, then the rest of the stream.
            let buffered = reader.buffer().to_vec();
            writer.write_all(&buffered)?;
            writer.flush()?;
            reader.consume(buffered.len());
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = crate::read_some(reader.get_mut(), &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                writer.write_all(&buf[..n])?;
                writer.flush()?;
            }
        }
        let connection = if keep { "keep-alive" } else { "close" };
        let mode = mode.load(Ordering::Relaxed);
        if mode == BREAKS {
            writer.write_all(b"HTTP/1.1 200 OK\r\nContent-")?;
            writer.flush()?;
            return Ok(());
        }
        if mode == FAILS {
            let body = format!("{name} failing\n");
            write!(
                writer,
                "HTTP/1.1 503 Service Unavailable\r\nX-Served-By: {name}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            )?;
        } else if let Some(n) = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            write!(
                writer,
                "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: {connection}\r\n\r\n"
            )?;
            write_pattern(&mut writer, n, false)?;
        } else if let Some(n) = path
            .strip_prefix("/chunked/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            write!(
                writer,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: {connection}\r\n\r\n"
            )?;
            write_pattern(&mut writer, n, true)?;
        } else if let Some(n) = path
            .strip_prefix("/truncated/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            // Announces `n` bytes, sends half, and closes: a server dying mid-response.
            write!(
                writer,
                "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: keep-alive\r\n\r\n"
            )?;
            write_pattern(&mut writer, n / 2, false)?;
            writer.flush()?;
            return Ok(());
        } else if let Some(n) = path
            .strip_prefix("/close/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            write!(writer, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
            write_pattern(&mut writer, n, false)?;
            return Ok(());
        } else if path == "/upload" {
            let body = format!("{} {:016x}\n", body.length, body.hasher.digest());
            write!(
                writer,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            )?;
        } else if let Some(code) = path
            .strip_prefix("/status/")
            .and_then(|n| n.parse::<u16>().ok())
        {
            let body = format!("{name} {code}\n");
            write!(
                writer,
                "HTTP/1.1 {code} Whatever\r\nX-Served-By: {name}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            )?;
        } else {
            if let Some(ms) = path
                .strip_prefix("/slow/")
                .and_then(|n| n.parse::<u64>().ok())
            {
                thread::sleep(Duration::from_millis(ms));
            }
            let body = format!("{name}\n");
            write!(
                writer,
                "HTTP/1.1 200 OK\r\nX-Served-By: {name}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            )?;
        }
        writer.flush()?;
        if !keep {
            return Ok(());
        }
    }
}

/// Writes `n` pattern bytes, as 64 KiB chunks when `chunked`.
pub fn write_pattern(writer: &mut impl Write, n: u64, chunked: bool) -> io::Result<()> {
    let mut at = 0;
    let mut chunk = Vec::with_capacity(64 * 1024);
    while at < n {
        let len = (n - at).min(64 * 1024);
        chunk.clear();
        chunk.extend((at..at + len).map(pattern));
        if chunked {
            write!(writer, "{len:x}\r\n")?;
            writer.write_all(&chunk)?;
            writer.write_all(b"\r\n")?;
        } else {
            writer.write_all(&chunk)?;
        }
        at += len;
    }
    if chunked {
        writer.write_all(b"0\r\n\r\n")?;
    }
    Ok(())
}
