//! The I/O seam between the proxy and its io_uring runtime (compio, see decision 0007).
//!
//! Everything the proxy does to a socket goes through [`Conn`], with owned buffers moved in
//! and handed back (completion-based I/O owns a buffer while the kernel fills it). Changing
//! runtime means changing this file and the worker loop in `mod.rs`, not the proxy.

use std::{io, net::SocketAddr, ops::Range, os::fd::AsRawFd, time::Duration};

use compio::{
    BufResult,
    buf::{IntoInner, IoBuf},
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// A TCP connection (to a client or to a server).
pub struct Conn {
    stream: TcpStream,
}

/// A read or write that did not finish in time.
pub fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        // Heads and small bodies go out as soon as they are written.
        let _ = stream.set_nodelay(true);
        Conn { stream }
    }

    /// Connects to `address`, giving up after `timeout`.
    pub async fn connect(address: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        match compio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(stream) => Ok(Conn::new(stream?)),
            Err(_) => Err(timed_out()),
        }
    }

    /// Appends what the peer sent next to `buf` (up to its spare capacity, grown to about
    /// `at_most` when less than a quarter of that is left), waiting at most `timeout`. 0 bytes read means the peer closed its side.
    pub async fn read_more(
        &self,
        mut buf: Vec<u8>,
        at_most: usize,
        timeout: Duration,
    ) -> BufResult<usize, Vec<u8>> {
        // Grow only when little room is left: a buffer reused across reads and requests
        // keeps its allocation.
        if buf.capacity() - buf.len() < at_most / 4 {
            buf.reserve(at_most);
        }
        let mut stream = &self.stream;
        match compio::time::timeout(timeout, stream.append(buf)).await {
            Ok(result) => result,
            // The cancelled read keeps the buffer; the connection is given up anyway.
            Err(_) => BufResult(Err(timed_out()), Vec::new()),
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, buf: Vec<u8>) -> BufResult<(), Vec<u8>> {
        let mut stream = &self.stream;
        stream.write_all(buf).await
    }

    /// Writes `buf[range]`.
    pub async fn write_range(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<(), Vec<u8>> {
        let mut stream = &self.stream;
        let BufResult(result, slice) = stream.write_all(buf.slice(range)).await;
        BufResult(result, slice.into_inner())
    }

    /// Closes the sending side (the peer reads end of file), keeping the receiving side.
    pub async fn shutdown_write(&self) {
        let mut stream = &self.stream;
        let _ = stream.shutdown().await;
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
