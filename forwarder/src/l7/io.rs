//! The I/O seam between the proxy and its io_uring runtime (compio, see decision 0007).
//!
//! Everything the proxy does to a socket goes through [`Conn`], with owned buffers moved in
//! and handed back (completion-based I/O owns a buffer while the kernel fills it). Changing
//! runtime means changing this file and the worker loop in `mod.rs`, not the proxy.
//!
//! A client connection may carry TLS ([`Conn::accept_tls`]): rustls's state machine sits in
//! the `Conn`, fed with the ciphertext read here and drained into the socket here, so the
//! proxy reads and writes plaintext the same way on both kinds. Its borrows never span an
//! await; ciphertext leaves under one lock ([`TlsSession::sending`]) because the records
//! must go out in the order rustls made them, and a tunnel reads (which may have to answer)
//! while it writes.
//!
//! Large bodies of known length can instead move socket → [`Pipe`] → socket with `splice(2)`,
//! never copied through user space (decision 0012). io_uring's own splice op always runs on
//! a blocking kernel worker thread, so splices here are non-blocking system calls made when
//! io_uring reports the socket ready: the sockets are `O_NONBLOCK`, which io_uring's own
//! socket ops ignore (they arm a poll when a socket is not ready either way).

use std::{
    cell::RefCell,
    io::{self, BufRead, Write},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Arc,
    time::Duration,
};

use compio::{
    BufResult,
    buf::{IntoInner, IoBuf},
    driver::BufferRef,
    io::{AsyncRead, AsyncReadManaged, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Tick after tick of woken tasks the worker runs before it reaps completions anyway, so that
/// tasks that keep waking each other cannot hold back the I/O of the others.
const TICKS_BEFORE_REAPING: usize = 16;

/// Runs `future` on `runtime` until it completes, as `Runtime::block_on` does, except that the
/// tasks woken while tasks ran are run before the worker asks the kernel for completions.
///
/// compio's executor runs each woken task once per tick, and a task woken by the last one
/// run in a tick (the connection task the accept loop spawned, a handshake its read woke)
/// waits for the next. `block_on` then reaps completions with a zero timeout, which
/// compio-driver 0.12 makes a blocking `io_uring_enter` with a zero timespec: the kernel arms
/// a timer and puts the thread to sleep until it fires. That was half a sleep per TLS
/// connection and a tenth of its CPU (decision 0027). Here the driver is entered to wait only
/// when no task is left to run.
pub fn run_to_completion<F: std::future::Future>(
    runtime: &compio::runtime::Runtime,
    future: F,
) -> F::Output {
    use std::task::{Context, Poll};
    runtime.enter(|| {
        let waker = runtime.waker();
        let mut context = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                runtime.run();
                return output;
            }
            let mut ticks = 1;
            let mut woken = runtime.run();
            while woken && ticks < TICKS_BEFORE_REAPING {
                woken = runtime.run();
                ticks += 1;
            }
            if woken {
                runtime.poll_with(Some(Duration::ZERO));
            } else {
                runtime.poll();
            }
        }
    })
}

/// A TCP connection (to a client or to a server), with TLS on a client's if its listener
/// terminates TLS.
pub struct Conn {
    stream: TcpStream,
    /// The socket is non-blocking and carries no TLS, so it may be spliced (see the module
    /// docs).
    spliceable: bool,
    tls: Option<Box<TlsSession>>,
}

/// Ciphertext read from a socket at a time: one whole TLS record and its header.
const TLS_READ_CHUNK: usize = 16 * 1024 + 256;
/// Plaintext rustls holds encrypted but not yet sent, at most: a write waits for the socket
/// beyond it.
const TLS_SEND_BUFFER: usize = 64 * 1024;
/// The outgoing ciphertext buffer an idle TLS connection keeps, at most: what small
/// responses need, so that serving them allocates nothing; a larger one is let go.
const IDLE_OUTGOING_KEPT: usize = 4 * 1024;

/// A TLS session over a client connection.
struct TlsSession {
    state: RefCell<rustls::ServerConnection>,
    /// Held while ciphertext is being sent (see the module docs).
    sending: futures_util::lock::Mutex<()>,
    /// Reused buffers for ciphertext in and out (taken while the kernel holds them).
    incoming: RefCell<Vec<u8>>,
    outgoing: RefCell<Vec<u8>>,
}

/// Why a TLS handshake did not complete; the label is what counters and logs say. In the
/// order of [`HandshakeFailure::ALL`], which `as usize` indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// It took longer than `tls_handshake_timeout_ms`.
    Timeout,
    /// The client closed or reset the connection before it finished.
    Closed,
    /// The client spoke plain HTTP to the TLS port (it got a 400 saying so).
    Plaintext,
    /// No certificate for the name the client asked for (SNI).
    UnknownName,
    /// Anything else the TLS protocol refused: a malformed or unsupported ClientHello, no
    /// common version, cipher or ALPN protocol, a bad record.
    Protocol,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 5] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Closed,
        HandshakeFailure::Plaintext,
        HandshakeFailure::UnknownName,
        HandshakeFailure::Protocol,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Plaintext => "plaintext_http",
            HandshakeFailure::UnknownName => "unknown_name",
            HandshakeFailure::Protocol => "protocol",
        }
    }
}

/// What plain HTTP sent to a TLS port is told, as nginx does, before the connection closes.
pub const PLAINTEXT_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 48\r\nConnection: close\r\n\r\nThis port speaks HTTPS: use https:// to reach it\n";

/// A read or write that did not finish in time.
pub fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        // Heads and small bodies go out as soon as they are written.
        let _ = stream.set_nodelay(true);
        // For splices (see the module docs); a socket left blocking is never spliced.
        let spliceable = socket2::SockRef::from(&stream)
            .set_nonblocking(true)
            .is_ok();
        Conn {
            stream,
            spliceable,
            tls: None,
        }
    }

    /// A client connection from a listener the workers tuned and `accept4`ed non-blocking
    /// (`l7::tune_listener`): it has `TCP_NODELAY` and `O_NONBLOCK` already, so it costs no
    /// system call here (two per connection otherwise).
    pub fn accepted(stream: TcpStream) -> Conn {
        Conn {
            stream,
            spliceable: true,
            tls: None,
        }
    }

    /// Completes a TLS handshake on a freshly accepted client connection under `config`,
    /// within `timeout`. A failed handshake has sent the client its alert (or, to plain HTTP,
    /// a 400) and closes the connection when the error is dropped.
    pub async fn accept_tls(
        stream: TcpStream,
        config: Arc<rustls::ServerConfig>,
        timeout: Duration,
    ) -> Result<Conn, HandshakeFailure> {
        let mut session =
            rustls::ServerConnection::new(config).map_err(|_| HandshakeFailure::Protocol)?;
        session.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let mut conn = Conn::accepted(stream);
        conn.spliceable = false;
        conn.tls = Some(Box::new(TlsSession {
            state: RefCell::new(session),
            sending: futures_util::lock::Mutex::new(()),
            incoming: RefCell::new(Vec::with_capacity(TLS_READ_CHUNK)),
            outgoing: RefCell::new(Vec::new()),
        }));
        match compio::time::timeout(timeout, conn.handshake()).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(HandshakeFailure::Timeout),
        }
    }

    async fn handshake(&self) -> Result<(), HandshakeFailure> {
        let tls = self.tls.as_deref().expect("a TLS connection");
        let mut first = true;
        loop {
            if handshake_done_but_tickets(&tls.state.borrow()) {
                return Ok(());
            }
            self.flush_tls(tls, Duration::MAX)
                .await
                .map_err(|_| HandshakeFailure::Closed)?;
            if !tls.state.borrow().is_handshaking() {
                return Ok(());
            }
            let (read, cipher) = self.read_ciphertext(tls, Duration::MAX).await;
            let n = match read {
                Ok(0) | Err(_) => return Err(HandshakeFailure::Closed),
                Ok(n) => n,
            };
            // A TLS connection starts with a handshake record (22); an HTTP method is letters.
            if first && cipher[0].is_ascii_uppercase() {
                tls.incoming.replace(cipher);
                let mut stream = &self.stream;
                let _ = stream.write_all(PLAINTEXT_ANSWER).await;
                return Err(HandshakeFailure::Plaintext);
            }
            first = false;
            let fed = self.feed(tls, &cipher[..n]);
            tls.incoming.replace(cipher);
            if fed.is_err() {
                // The alert rustls queued goes out before the connection closes.
                let _ = self.flush_tls(tls, Duration::from_secs(1)).await;
                return Err(if super::tls::take_unknown_name() {
                    HandshakeFailure::UnknownName
                } else {
                    HandshakeFailure::Protocol
                });
            }
        }
    }

    /// Reads the next ciphertext from the socket into the session's incoming buffer, which
    /// is handed back with the result (the caller puts it back). `Duration::MAX` sets no
    /// deadline of its own: the handshake runs under one deadline for the whole, and a step
    /// timing out at the same instant would be counted as the client closing, not as
    /// `timeout` (the same for [`Conn::flush_tls`]).
    async fn read_ciphertext(
        &self,
        tls: &TlsSession,
        timeout: Duration,
    ) -> (io::Result<usize>, Vec<u8>) {
        let mut cipher = std::mem::take(&mut *tls.incoming.borrow_mut());
        cipher.clear();
        cipher.reserve(TLS_READ_CHUNK);
        let mut stream = &self.stream;
        let read = stream.read(cipher);
        let BufResult(result, cipher) = if timeout == Duration::MAX {
            read.await
        } else {
            match compio::time::timeout(timeout, read).await {
                Ok(done) => done,
                Err(_) => BufResult(Err(timed_out()), Vec::with_capacity(TLS_READ_CHUNK)),
            }
        };
        (result, cipher)
    }

    /// Hands `cipher` to rustls and processes it; empty is the peer's end of file, which
    /// rustls tells as a clean close (after `close_notify`) or a cut one. An error means the
    /// session is dead (an alert may be queued for the peer).
    fn feed(&self, tls: &TlsSession, mut cipher: &[u8]) -> Result<(), rustls::Error> {
        let mut state = tls.state.borrow_mut();
        if cipher.is_empty() {
            let _ = state.read_tls(&mut cipher);
        }
        while !cipher.is_empty() {
            if state.read_tls(&mut cipher).is_err() {
                return Err(rustls::Error::General("record buffer full".into()));
            }
            state.process_new_packets()?;
        }
        Ok(())
    }

    /// Sends whatever ciphertext rustls has queued, within `timeout` (`Duration::MAX`: none of
    /// its own, see [`Conn::read_ciphertext`]).
    async fn flush_tls(&self, tls: &TlsSession, timeout: Duration) -> io::Result<()> {
        let _sending = tls.sending.lock().await;
        loop {
            let out = {
                let mut state = tls.state.borrow_mut();
                if !state.wants_write() {
                    return Ok(());
                }
                let mut out = std::mem::take(&mut *tls.outgoing.borrow_mut());
                out.clear();
                // Writing into a Vec takes everything queued.
                state.write_tls(&mut out)?;
                out
            };
            let mut stream = &self.stream;
            let BufResult(written, out) = if timeout == Duration::MAX {
                stream.write_all(out).await
            } else {
                match compio::time::timeout(timeout, stream.write_all(out)).await {
                    Ok(done) => done,
                    Err(_) => BufResult(Err(timed_out()), Vec::new()),
                }
            };
            tls.outgoing.replace(out);
            written?;
        }
    }

    /// The name the client asked for in its TLS handshake (SNI), if any.
    pub fn server_name(&self) -> Option<String> {
        let tls = self.tls.as_deref()?;
        tls.state.borrow().server_name().map(str::to_string)
    }

    /// Whether this connection carries TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether the TLS handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.tls.as_deref().is_some_and(|tls| {
            tls.state.borrow().handshake_kind() == Some(rustls::HandshakeKind::Resumed)
        })
    }

    /// The socket's descriptor, to shut it down from outside its task.
    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Makes the close that follows a reset (`SO_LINGER` 0) instead of an orderly end: the
    /// peer learns the exchange was aborted rather than finished.
    pub fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }

    /// Whether bodies may be spliced to or from this connection.
    pub fn spliceable(&self) -> bool {
        self.spliceable
    }

    /// Connects to `address`, giving up after `timeout`.
    pub async fn connect(address: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        within(timeout, TcpStream::connect(address))
            .await
            .map(Conn::new)
    }

    /// Appends what the peer sent next to `buf`, at most `at_most` bytes (the buffer grows
    /// when it has less room), waiting at most `timeout`. 0 bytes read means the peer closed
    /// its side.
    pub async fn read_more(
        &self,
        mut buf: Vec<u8>,
        at_most: usize,
        timeout: Duration,
    ) -> BufResult<usize, Vec<u8>> {
        if let Some(tls) = self.tls.as_deref() {
            return self.read_plaintext(tls, buf, at_most, timeout).await;
        }
        // A buffer reused across reads and requests keeps its allocation. The bound matters
        // to what follows a response head: bytes read with it are copied, the rest of a long
        // body is spliced.
        buf.reserve(at_most);
        let start = buf.len();
        let end = buf.capacity().min(start + at_most);
        let mut stream = &self.stream;
        match compio::time::timeout(timeout, stream.read(buf.slice(start..end))).await {
            Ok(result) => result.map_buffer(IntoInner::into_inner),
            // The cancelled read keeps the buffer; the connection is given up anyway.
            Err(_) => BufResult(Err(timed_out()), Vec::new()),
        }
    }

    /// Waits for what the peer sends next while holding no buffer: the kernel takes one from
    /// the runtime's provided-buffer ring only when bytes arrive, so a connection idle
    /// between requests costs no read buffer (decision 0023). The bytes stay in the ring
    /// until the returned buffer drops.
    ///
    /// `Ok(None)` when the caller is to read with [`Conn::read_more`], which then does not
    /// wait long: on a TLS connection, whose ciphertext came through the ring and went to
    /// rustls, what rustls has decrypted or its end; when the peer closed its side (which
    /// that read reports); or when the read failed, and [`Conn::read_more`] reports the
    /// socket's own error if it has one. A read fails here when the ring had no free buffer:
    /// more connections became readable at once than it holds.
    pub async fn read_idle(&self, timeout: Duration) -> io::Result<Option<BufferRef>> {
        if let Some(tls) = self.tls.as_deref() {
            return self.read_idle_tls(tls, timeout).await.map(|()| None);
        }
        self.read_into_ring(timeout).await
    }

    /// One read into a buffer of the ring; `Ok(None)` when it read nothing (see
    /// [`Conn::read_idle`]).
    async fn read_into_ring(&self, timeout: Duration) -> io::Result<Option<BufferRef>> {
        let mut stream = &self.stream;
        // Length 0: as much as one of the ring's buffers holds.
        match compio::time::timeout(timeout, stream.read_managed(0)).await {
            Ok(Ok(bytes)) => Ok(bytes.filter(|bytes| !bytes.is_empty())),
            Ok(Err(_)) => Ok(None),
            Err(_) => Err(timed_out()),
        }
    }

    /// [`Conn::read_idle`] on a TLS connection: unless rustls already holds plaintext (or the
    /// stream's end), the session's own ciphertext buffers are let go — the incoming one
    /// entirely, the outgoing one when a large response grew it — and the next ciphertext
    /// is read through the ring and fed to rustls.
    async fn read_idle_tls(&self, tls: &TlsSession, timeout: Duration) -> io::Result<()> {
        {
            let mut state = tls.state.borrow_mut();
            match state.reader().fill_buf() {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                _ => return Ok(()),
            }
        }
        tls.incoming.take();
        if tls.outgoing.borrow().capacity() > IDLE_OUTGOING_KEPT {
            tls.outgoing.take();
        }
        let Some(cipher) = self.read_into_ring(timeout).await? else {
            return Ok(());
        };
        let fed = self.feed(tls, &cipher);
        drop(cipher);
        if let Err(err) = fed {
            // The alert rustls queued goes out before the connection closes.
            let _ = self.flush_tls(tls, timeout).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, err));
        }
        // What rustls has queued to send meanwhile (a handshake's session tickets, a key
        // update the client asked for) goes with the response, in the same send: the client
        // needs neither before its answer (RFC 8446 §4.6.3 asks the key update before the
        // next application data, which is where it goes).
        Ok(())
    }

    /// [`Conn::read_more`] on a TLS connection: what rustls has decrypted, else ciphertext
    /// read and fed to it until it has some. A peer that closes without `close_notify` reads
    /// as a close, as from a plain socket: HTTP's own framing tells a cut body.
    async fn read_plaintext(
        &self,
        tls: &TlsSession,
        mut buf: Vec<u8>,
        at_most: usize,
        timeout: Duration,
    ) -> BufResult<usize, Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let mut state = tls.state.borrow_mut();
                let mut reader = state.reader();
                match reader.fill_buf() {
                    Ok(plain) => {
                        let n = plain.len().min(at_most);
                        buf.extend_from_slice(&plain[..n]);
                        reader.consume(n);
                        return BufResult(Ok(n), buf);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                        return BufResult(Ok(0), buf);
                    }
                    Err(err) => return BufResult(Err(err), buf),
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return BufResult(Err(timed_out()), buf);
            }
            let (read, cipher) = self.read_ciphertext(tls, left).await;
            let fed = match read {
                // 0 bytes, the end of file, too: rustls tells a clean close from a cut one
                // (above).
                Ok(n) => self.feed(tls, &cipher[..n]),
                Err(err) => {
                    tls.incoming.replace(cipher);
                    return BufResult(Err(err), buf);
                }
            };
            tls.incoming.replace(cipher);
            // Something to answer (an alert, a key update), or nothing: sent either way.
            let flushed = self.flush_tls(tls, left).await;
            if let Err(err) = fed {
                return BufResult(Err(io::Error::new(io::ErrorKind::InvalidData, err)), buf);
            }
            if let Err(err) = flushed {
                return BufResult(Err(err), buf);
            }
        }
    }

    /// Writes all of `buf`, giving up (the connection is then cut) when that takes longer
    /// than `timeout`: a peer that stops reading cannot hold a connection.
    pub async fn write_all(&self, buf: Vec<u8>, timeout: Duration) -> BufResult<(), Vec<u8>> {
        if let Some(tls) = self.tls.as_deref() {
            let result = self.write_plaintext(tls, &buf, timeout).await;
            return BufResult(result, buf);
        }
        let mut stream = &self.stream;
        match compio::time::timeout(timeout, stream.write_all(buf)).await {
            Ok(result) => result,
            Err(_) => BufResult(Err(timed_out()), Vec::new()),
        }
    }

    /// Sends what it can of the connection's last bytes at once, its close to follow with
    /// nothing to read before it; drains what was sent from `buf`, and what is left (all of
    /// it when the send buffer is full, or on TLS when the guard below says no) goes through
    /// [`Conn::write_all`] as usual.
    ///
    /// The bytes go with `MSG_MORE`: the kernel holds a tail shorter than a segment until the
    /// close, and sends it with the FIN in one segment, where the tail and the FIN took a
    /// segment each. One packet fewer per connection, and fewer for the kernel to process on
    /// both sides: 15% less CPU per request with a new connection per request (decision 0030).
    /// The send is the socket's plain non-blocking one, from the worker's thread, so the
    /// caller's future holds no second write. On TLS the last records and `close_notify` go
    /// out together this way (see [`Conn::send_last_tls`]), three segments made one.
    ///
    /// The held tail leaves with the close, so the caller must close the connection next —
    /// and must not call this when the peer may still send: a close with unread bytes is a
    /// reset, which discards what was held.
    pub fn send_last(&self, buf: &mut Vec<u8>) {
        if buf.as_slice().is_empty() {
            return;
        }
        if let Some(tls) = self.tls.as_deref() {
            return self.send_last_tls(tls, buf);
        }
        if let Ok(sent) = send_held(self.stream.as_raw_fd(), &[io::IoSlice::new(buf)]) {
            buf.drain(..sent);
        }
    }

    /// [`Conn::send_last`] on TLS: `buf` encrypted, `close_notify` queued after it, and what
    /// rustls then holds sent with `MSG_MORE`; [`Conn::finish`] sends what the socket did not
    /// take (its own `close_notify` is then a no-op). Left to the usual path when a write is
    /// in flight (the records must stay in order), when rustls cannot take all of `buf` at
    /// once, and when the client has sent anything unread: a TLS client may end its side with
    /// `close_notify` as soon as its request is out, and those bytes would turn the close into
    /// a reset. The check costs one `recv(MSG_PEEK)`, little beside a TLS connection's
    /// handshake.
    fn send_last_tls(&self, tls: &TlsSession, buf: &mut Vec<u8>) {
        let Some(_sending) = tls.sending.try_lock() else {
            return;
        };
        if !self.is_idle_and_open() {
            return;
        }
        let mut state = tls.state.borrow_mut();
        let Ok(taken) = state.writer().write(buf) else {
            return;
        };
        buf.drain(..taken);
        if !buf.as_slice().is_empty() {
            // The part taken goes first, with the rest, through `write_all`.
            return;
        }
        state.send_close_notify();
        let mut socket = HeldSend(self.stream.as_raw_fd());
        while state.wants_write() {
            match state.write_tls(&mut socket) {
                Ok(sent) if sent > 0 => {}
                _ => break,
            }
        }
    }

    /// [`Conn::write_all`] on a TLS connection: encrypted a buffer's worth at a time, each
    /// sent before the next is taken.
    async fn write_plaintext(
        &self,
        tls: &TlsSession,
        mut plain: &[u8],
        timeout: Duration,
    ) -> io::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while !plain.is_empty() {
            let taken = tls.state.borrow_mut().writer().write(plain)?;
            plain = &plain[taken..];
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            self.flush_tls(tls, left).await?;
        }
        Ok(())
    }

    /// Ends a connection whose last exchange is complete: on TLS, `close_notify` tells the
    /// client the end is genuine (a response delimited by the close was not truncated, and
    /// its session stays resumable, which OpenSSL forgets after an unclean end). A plain
    /// connection needs nothing before it is dropped. Never called on a cut exchange: there
    /// the missing `close_notify` is what tells the client it was cut.
    pub async fn finish(&self) {
        if let Some(tls) = self.tls.as_deref() {
            tls.state.borrow_mut().send_close_notify();
            let _ = self.flush_tls(tls, Duration::from_secs(1)).await;
        }
    }

    /// Closes the sending side (the peer reads end of file), keeping the receiving side.
    pub async fn shutdown_write(&self) {
        if let Some(tls) = self.tls.as_deref() {
            tls.state.borrow_mut().send_close_notify();
            let _ = self.flush_tls(tls, Duration::from_secs(1)).await;
        }
        let mut stream = &self.stream;
        let _ = stream.shutdown().await;
    }

    /// Moves what the peer sent next, up to `len` bytes, into the empty `pipe`, waiting at
    /// most `timeout` for it. 0 bytes means the peer closed its side.
    pub async fn splice_into(
        &self,
        pipe: &Pipe,
        len: usize,
        timeout: Duration,
    ) -> io::Result<usize> {
        let len = len.min(pipe.capacity);
        loop {
            match splice(self.stream.as_raw_fd(), pipe.write.as_raw_fd(), len) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    let poll = self.stream.to_poll_fd()?;
                    within(timeout, poll.read_ready()).await?
                }
                done => return done,
            }
        }
    }

    /// Sends the `len` bytes held in `pipe` to the peer, waiting at most `timeout` each
    /// time the peer's receive window and our send buffer are full.
    pub async fn splice_from(
        &self,
        pipe: &Pipe,
        mut len: usize,
        timeout: Duration,
    ) -> io::Result<()> {
        while len > 0 {
            match splice(pipe.read.as_raw_fd(), self.stream.as_raw_fd(), len) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => len -= n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    let poll = self.stream.to_poll_fd()?;
                    within(timeout, poll.write_ready()).await?
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Whether the peer has neither closed the connection nor sent anything that is unread:
    /// whether an idle pooled connection can carry another request (it catches the common
    /// race of reusing a connection the server already closed), and whether a closing TLS
    /// connection's last records may wait for its close ([`Conn::send_last_tls`]). One
    /// non-blocking `recv(MSG_PEEK)`.
    pub fn is_idle_and_open(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: a valid fd owned by `self.stream`, a one-byte buffer that outlives the call.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }
}

/// `operation`'s result, or a timed-out error once `timeout` has passed.
async fn within<T>(
    timeout: Duration,
    operation: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    compio::time::timeout(timeout, operation)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

/// A pipe that splices pass through: what was moved in from one socket and not yet out to
/// the other stays in its kernel buffers. Reusable once empty; one with bytes left in it
/// (a failed relay) must be dropped, never reused.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes one splice may move into it.
    capacity: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid two-element array for the kernel to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The kernel's default size (16 buffer slots, 64 KiB with 4 KiB pages) is kept: what a
        // pipe holds is read from the server but not yet taken by the client, on top of the
        // socket buffers, so a larger one costs memory per slow client. One slot holds one
        // received fragment, so a splice moves 16 segments or more (~23 KiB at a 1500-byte MTU).
        // SAFETY: a plain fcntl call on a descriptor we own.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read,
            write,
            capacity: capacity as usize,
        })
    }
}

/// Whether a TLS 1.3 handshake is complete, so that what rustls has queued since is only its
/// session tickets. Those wait for the connection's first response, which takes them along
/// in the same send: one send and one segment fewer per connection, and the client, which
/// sends its request without waiting for tickets, has them with its answer. (Under TLS 1.2
/// the server's last flight may follow the client's, and the client waits for it: that is
/// flushed at once.)
fn handshake_done_but_tickets(state: &rustls::ServerConnection) -> bool {
    !state.is_handshaking() && state.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
}

/// One non-blocking `sendmsg` of `bytes` with `MSG_MORE`, for a connection's last bytes
/// ([`Conn::send_last`]): the bytes the socket took.
fn send_held(fd: RawFd, bytes: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero `msghdr` is valid (no name, no control data); the iovec array is
    // `bytes`, which `IoSlice` guarantees to be laid out as `iovec`s, and outlives the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = bytes.as_ptr() as *mut libc::iovec;
    message.msg_iovlen = bytes.len();
    // SAFETY: a valid fd owned by the caller's `Conn`, and the message built above.
    let sent = unsafe {
        libc::sendmsg(
            fd,
            &message,
            libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// What rustls writes a connection's last records to: [`send_held`], never waiting.
struct HeldSend(RawFd);

impl Write for HeldSend {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        send_held(self.0, &[io::IoSlice::new(bytes)])
    }

    fn write_vectored(&mut self, bytes: &[io::IoSlice<'_>]) -> io::Result<usize> {
        send_held(self.0, bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One non-blocking `splice(2)` of up to `len` bytes from `from` to `to` (one of them a pipe).
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (owned by the caller's
    // `Conn` and `Pipe`); null offsets, as pipes and sockets have no position.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpListener,
        thread,
    };

    use super::*;

    /// A connected TCP pair on loopback: the runtime's end as a `Conn`, the other as a plain
    /// socket for a helper thread.
    fn pair() -> (Conn, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (Conn::new(TcpStream::from_std(ours).unwrap()), peer)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    #[test]
    fn splices_carry_a_body_intact_to_a_receiver_that_is_slow_to_read() {
        // More than the socket buffers of both connections hold, so sending has to wait.
        const LEN: usize = 32 << 20;
        compio::runtime::Runtime::new().unwrap().block_on(async {
            let (from, mut sender) = pair();
            let (to, mut receiver) = pair();
            assert!(from.spliceable() && to.spliceable());
            let send = thread::spawn(move || sender.write_all(&pattern(LEN)).unwrap());
            let receive = thread::spawn(move || {
                thread::sleep(Duration::from_millis(300));
                let mut got = Vec::new();
                receiver.read_to_end(&mut got).unwrap();
                got
            });
            let pipe = Pipe::new().unwrap();
            let (mut moved, mut splices) = (0, 0);
            while moved < LEN {
                let n = from
                    .splice_into(&pipe, LEN - moved, Duration::from_secs(10))
                    .await
                    .unwrap();
                assert!(n > 0 && n <= pipe.capacity, "{n}");
                to.splice_from(&pipe, n, Duration::from_secs(10))
                    .await
                    .unwrap();
                moved += n;
                splices += 1;
            }
            assert_eq!(moved, LEN);
            assert!(splices >= LEN / pipe.capacity, "{splices}");
            drop(to);
            send.join().unwrap();
            assert!(receive.join().unwrap() == pattern(LEN));
        });
    }

    #[test]
    fn a_splice_from_a_silent_peer_times_out() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            let (from, _silent) = pair();
            let pipe = Pipe::new().unwrap();
            let err = from
                .splice_into(&pipe, 1024, Duration::from_millis(100))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        });
    }

    #[test]
    fn a_splice_from_a_closed_peer_moves_nothing() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            let (from, closed) = pair();
            drop(closed);
            let pipe = Pipe::new().unwrap();
            let n = from
                .splice_into(&pipe, 1024, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(n, 0);
        });
    }

    #[test]
    fn a_read_takes_no_more_than_its_bound() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            let (conn, mut peer) = pair();
            peer.write_all(&pattern(64 * 1024)).unwrap();
            // A recycled buffer with room for all of it still reads only the bound.
            let buf = Vec::with_capacity(256 * 1024);
            let BufResult(read, buf) = conn.read_more(buf, 16 * 1024, Duration::from_secs(5)).await;
            let n = read.unwrap();
            assert!(n > 0 && n <= 16 * 1024, "{n}");
            assert_eq!(buf, pattern(64 * 1024)[..n]);
        });
    }
}
