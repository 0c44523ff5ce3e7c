//! The I/O seam between the proxy and its io_uring runtime (compio, see decision 0007).
//!
//! Everything the proxy does to a socket goes through [`Conn`], with owned buffers moved in
//! and handed back (completion-based I/O owns a buffer while the kernel fills it). Changing
//! runtime means changing this module and the worker loop in `l7/mod.rs`, not the proxy.
//!
//! The rooms:
//! - here, a connection's reads and writes, the same calls on both kinds of connection;
//! - [`tls_session`]: a client connection that carries TLS ([`Conn::accept_tls`]), whose
//!   plaintext those calls read and write through rustls;
//! - [`splice`]: large bodies moved socket → [`Pipe`] → socket, never copied through user
//!   space;
//! - [`run_loop`]: how a worker turns the runtime;
//! - [`deadline`]: the timeouts of those reads and writes, kept by the worker.

mod deadline;
mod run_loop;
mod splice;
mod tls_session;

use std::{
    io::{self, Write},
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use compio::{
    BufResult,
    buf::{IntoInner, IoBuf},
    driver::BufferRef,
    io::{AsyncRead, AsyncReadManaged, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

pub(crate) use deadline::{sleep, timeout, turn_clock};
pub use run_loop::run_to_completion;
pub use splice::Pipe;
use tls_session::TlsSession;
pub use tls_session::{HandshakeFailure, PLAINTEXT_ANSWER};

/// A TCP connection (to a client or to a server), with TLS on a client's if its listener
/// terminates TLS.
pub struct Conn {
    stream: TcpStream,
    /// The socket is non-blocking and carries no TLS, so it may be spliced (see [`splice`]).
    spliceable: bool,
    tls: Option<Box<TlsSession>>,
}

/// A read or write that did not finish in time.
pub fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        // Heads and small bodies go out as soon as they are written.
        let _ = stream.set_nodelay(true);
        // For splices (see `splice`); a socket left blocking is never spliced.
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
        match deadline::timeout(timeout, stream.read(buf.slice(start..end))).await {
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
        match deadline::timeout(timeout, stream.read_managed(0)).await {
            Ok(Ok(bytes)) => Ok(bytes.filter(|bytes| !bytes.is_empty())),
            Ok(Err(_)) => Ok(None),
            Err(_) => Err(timed_out()),
        }
    }

    /// Writes all of `buf`, giving up (the connection is then cut) when that takes longer
    /// than `timeout`: a peer that stops reading cannot hold a connection.
    pub async fn write_all(&self, buf: Vec<u8>, timeout: Duration) -> BufResult<(), Vec<u8>> {
        if let Some(tls) = self.tls.as_deref() {
            let result = self.write_plaintext(tls, [buf.as_slice()], timeout).await;
            return BufResult(result, buf);
        }
        let mut stream = &self.stream;
        match deadline::timeout(timeout, stream.write_all(buf)).await {
            Ok(result) => result,
            Err(_) => BufResult(Err(timed_out()), Vec::new()),
        }
    }

    /// Writes `parts` one after the other, as one write of several buffers, giving up as
    /// [`Conn::write_all`] does: a head and the body bytes read with it go out without being
    /// copied into one buffer first (decision 0034). On TLS rustls takes the parts as one
    /// stream of plaintext (a record may span two), and what it encrypted goes out in one
    /// send, as [`Conn::write_all`]'s would.
    pub async fn write_all_parts<const N: usize>(
        &self,
        parts: [Vec<u8>; N],
        timeout: Duration,
    ) -> BufResult<(), [Vec<u8>; N]> {
        if let Some(tls) = self.tls.as_deref() {
            let result = self
                .write_plaintext(tls, parts.each_ref().map(Vec::as_slice), timeout)
                .await;
            return BufResult(result, parts);
        }
        let mut stream = &self.stream;
        match deadline::timeout(timeout, stream.write_vectored_all(parts)).await {
            Ok(result) => result,
            Err(_) => BufResult(Err(timed_out()), std::array::from_fn(|_| Vec::new())),
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
    /// The held tail leaves with the close, so the caller must close the connection next,
    /// and must not call this when the peer may still send: a close with unread bytes is a
    /// reset, which discards what was held. A client that sent something all the same (it
    /// must not after asking to close, RFC 9112 §9.6; a TLS client may end its session with
    /// `close_notify` as soon as its request is out) is caught by one `recv(MSG_PEEK)` first,
    /// and then the bytes go the usual way; only bytes that land in the microseconds between
    /// that check and the close can still reset it.
    pub fn send_last(&self, buf: &mut Vec<u8>) {
        if buf.as_slice().is_empty() || !self.is_idle_and_open() {
            return;
        }
        if let Some(tls) = self.tls.as_deref() {
            return self.send_last_tls(tls, buf);
        }
        if let Ok(sent) = send_held(self.stream.as_raw_fd(), &[io::IoSlice::new(buf)]) {
            buf.drain(..sent);
        }
    }

    /// Ends a connection whose last exchange is complete: on TLS, `close_notify` tells the
    /// client the end is genuine (a response delimited by the close was not truncated, and
    /// its session stays resumable, which OpenSSL forgets after an unclean end). A plain
    /// connection needs nothing before it is dropped. Never called on a cut exchange: there
    /// the missing `close_notify` is what tells the client it was cut.
    pub async fn finish(&self) {
        if let Some(tls) = self.tls.as_deref() {
            self.send_close_notify(tls).await;
        }
    }

    /// Closes the sending side (the peer reads end of file), keeping the receiving side.
    pub async fn shutdown_write(&self) {
        if let Some(tls) = self.tls.as_deref() {
            self.send_close_notify(tls).await;
        }
        let mut stream = &self.stream;
        let _ = stream.shutdown().await;
    }

    /// Whether the peer has neither closed the connection nor sent anything that is unread:
    /// whether an idle pooled connection can carry another request (it catches the common
    /// race of reusing a connection the server already closed), and whether a closing
    /// connection's last bytes may wait for its close ([`Conn::send_last`]). One non-blocking
    /// `recv(MSG_PEEK)`.
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
    deadline::timeout(timeout, operation)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
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

#[cfg(test)]
mod tests {
    use std::{io::Write, net::TcpListener};

    use super::*;

    /// A connected TCP pair on loopback: the runtime's end as a `Conn`, the other as a plain
    /// socket for a helper thread.
    pub(super) fn pair() -> (Conn, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (Conn::new(TcpStream::from_std(ours).unwrap()), peer)
    }

    pub(super) fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    /// Runs `future` as a task on a worker's run loop, as a connection runs: polled only when
    /// woken, its deadlines ([`deadline`]) expired by the loop. Under a watchdog of compio's
    /// own timers: a deadline that never wakes its task fails the test instead of hanging it.
    pub(super) fn on_a_worker<F: std::future::Future<Output = ()> + 'static>(future: F) {
        let runtime = compio::runtime::Runtime::new().unwrap();
        let task = async { compio::runtime::spawn(future).await.expect("the task ran") };
        let watched = compio::time::timeout(Duration::from_secs(30), task);
        run_to_completion(&runtime, watched).expect("done within 30 s")
    }

    #[test]
    fn parts_written_apart_arrive_whole_and_in_order_and_come_back() {
        on_a_worker(async {
            let (conn, mut peer) = pair();
            let whole = pattern(300 * 1024);
            // Larger than the socket buffers take at once, so the write goes round again.
            let (head, body) = whole.split_at(100);
            let parts = [head.to_vec(), body.to_vec()];
            let reader = std::thread::spawn(move || {
                let mut received = vec![0; 300 * 1024];
                std::io::Read::read_exact(&mut peer, &mut received).unwrap();
                received
            });
            let BufResult(written, [head_back, body_back]) =
                conn.write_all_parts(parts, Duration::from_secs(5)).await;
            written.unwrap();
            assert_eq!((head_back.len(), body_back.len()), (100, 300 * 1024 - 100));
            assert_eq!(reader.join().unwrap(), whole);
        });
    }

    #[test]
    fn a_read_takes_no_more_than_its_bound() {
        on_a_worker(async {
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
