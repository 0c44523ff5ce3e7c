//! The I/O seam between the proxy and its io_uring runtime (compio, see decision 0007).
//!
//! Everything the proxy does to a socket goes through [`Conn`], with owned buffers moved in
//! and handed back (completion-based I/O owns a buffer while the kernel fills it). Changing
//! runtime means changing this file and the worker loop in `mod.rs`, not the proxy.
//!
//! Large bodies of known length can instead move socket → [`Pipe`] → socket with `splice(2)`,
//! never copied through user space (decision 0012). io_uring's own splice op always runs on
//! a blocking kernel worker thread, so splices here are non-blocking system calls made when
//! io_uring reports the socket ready: the sockets are `O_NONBLOCK`, which io_uring's own
//! socket ops ignore (they arm a poll when a socket is not ready either way).

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use compio::{
    BufResult,
    buf::{IntoInner, IoBuf},
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// A TCP connection (to a client or to a server).
pub struct Conn {
    stream: TcpStream,
    /// The socket is non-blocking, so it may be spliced (see the module docs).
    spliceable: bool,
}

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
        Conn { stream, spliceable }
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

    /// Writes all of `buf`, giving up (the connection is then cut) when that takes longer
    /// than `timeout`: a peer that stops reading cannot hold a connection.
    pub async fn write_all(&self, buf: Vec<u8>, timeout: Duration) -> BufResult<(), Vec<u8>> {
        let mut stream = &self.stream;
        match compio::time::timeout(timeout, stream.write_all(buf)).await {
            Ok(result) => result,
            Err(_) => BufResult(Err(timed_out()), Vec::new()),
        }
    }

    /// Closes the sending side (the peer reads end of file), keeping the receiving side.
    pub async fn shutdown_write(&self) {
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

    /// Whether an idle pooled connection can carry another request: the server has neither
    /// closed it nor sent anything unasked. One non-blocking `recv(MSG_PEEK)`; it catches
    /// the common race of reusing a connection the server already closed.
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
