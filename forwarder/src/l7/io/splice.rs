//! Large bodies of known length moved socket → [`Pipe`] → socket with `splice(2)`, never
//! copied through user space (decision 0012).
//!
//! io_uring's own splice op always runs on a blocking kernel worker thread, so splices here
//! are non-blocking system calls made when io_uring reports the socket ready: the sockets are
//! `O_NONBLOCK`, which io_uring's own socket ops ignore (they arm a poll when a socket is not
//! ready either way).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use super::{Conn, within};

impl Conn {
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
        thread,
    };

    use super::*;
    use crate::l7::io::tests::{on_a_worker, pair, pattern};

    #[test]
    fn splices_carry_a_body_intact_to_a_receiver_that_is_slow_to_read() {
        // More than the socket buffers of both connections hold, so sending has to wait.
        const LEN: usize = 32 << 20;
        on_a_worker(async {
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
        on_a_worker(async {
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
        on_a_worker(async {
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
}
