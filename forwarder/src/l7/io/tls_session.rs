//! A TLS session over a client connection: rustls's state machine inside the [`Conn`], fed
//! with the ciphertext read from the socket and drained into it here, so the proxy reads and
//! writes plaintext as on a plain connection (decision 0019).
//!
//! Its borrows never span an await. Ciphertext leaves under one lock
//! ([`TlsSession::sending`]) because the records must go out in the order rustls made them,
//! and a tunnel reads (which may have to answer) while it writes. What rustls queues once
//! the handshake is done (session tickets, a key update) waits for the next response and
//! leaves in its send; a connection's last records leave with `close_notify` and the FIN
//! (decision 0030).

use std::{
    cell::RefCell,
    io::{self, BufRead, Write},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use compio::{
    BufResult,
    io::{AsyncRead, AsyncWriteExt},
    net::TcpStream,
};

use super::{Conn, HeldSend, timed_out};

/// Ciphertext read from a socket at a time: one whole TLS record and its header.
const TLS_READ_CHUNK: usize = 16 * 1024 + 256;
/// Plaintext rustls holds encrypted but not yet sent, at most: a write waits for the socket
/// beyond it.
const TLS_SEND_BUFFER: usize = 64 * 1024;
/// The outgoing ciphertext buffer an idle TLS connection keeps, at most: what small
/// responses need, so that serving them allocates nothing; a larger one is let go.
const IDLE_OUTGOING_KEPT: usize = 4 * 1024;

/// A TLS session over a client connection.
pub(super) struct TlsSession {
    state: RefCell<rustls::ServerConnection>,
    /// Held while ciphertext is being sent (see the module docs).
    sending: futures_util::lock::Mutex<()>,
    /// Reused buffers for ciphertext in and out (taken while the kernel holds them).
    incoming: RefCell<Vec<u8>>,
    outgoing: RefCell<Vec<u8>>,
    /// Ciphertext read that rustls has not taken yet (see [`feed_session`]); it is fed before
    /// the socket is read again. Empty but for a client that sends small records fast.
    unfed: RefCell<Vec<u8>>,
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

impl Conn {
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
            unfed: RefCell::new(Vec::new()),
        }));
        match super::deadline::timeout(timeout, conn.handshake()).await {
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
                return Err(if crate::l7::tls::take_unknown_name() {
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
            match super::deadline::timeout(timeout, read).await {
                Ok(done) => done,
                Err(_) => BufResult(Err(timed_out()), Vec::with_capacity(TLS_READ_CHUNK)),
            }
        };
        (result, cipher)
    }

    /// Hands `cipher` to rustls and processes it ([`feed_session`]).
    fn feed(&self, tls: &TlsSession, cipher: &[u8]) -> Result<(), rustls::Error> {
        feed_session(
            &mut tls.state.borrow_mut(),
            cipher,
            &mut tls.unfed.borrow_mut(),
        )
    }

    /// Feeds rustls the ciphertext it left for later, if there is any: what must come before
    /// anything read from the socket next.
    fn feed_unfed(&self, tls: &TlsSession) -> Option<Result<(), rustls::Error>> {
        if tls.unfed.borrow().is_empty() {
            return None;
        }
        let unfed = tls.unfed.take();
        Some(self.feed(tls, &unfed))
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
                match super::deadline::timeout(timeout, stream.write_all(out)).await {
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

    /// [`Conn::read_idle`] on a TLS connection: unless rustls already holds plaintext (or the
    /// stream's end), the session's own ciphertext buffers are let go — the incoming one
    /// entirely, the outgoing one when a large response grew it — and the next ciphertext
    /// is read through the ring and fed to rustls.
    pub(super) async fn read_idle_tls(
        &self,
        tls: &TlsSession,
        timeout: Duration,
    ) -> io::Result<()> {
        {
            let mut state = tls.state.borrow_mut();
            match state.reader().fill_buf() {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                _ => return Ok(()),
            }
        }
        let fed = match self.feed_unfed(tls) {
            Some(fed) => fed,
            None => {
                tls.incoming.take();
                if tls.outgoing.borrow().capacity() > IDLE_OUTGOING_KEPT {
                    tls.outgoing.take();
                }
                let Some(cipher) = self.read_into_ring(timeout).await? else {
                    return Ok(());
                };
                // The ring's buffer goes back as soon as rustls has its bytes.
                self.feed(tls, &cipher)
            }
        };
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
    pub(super) async fn read_plaintext(
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
            let fed = match self.feed_unfed(tls) {
                Some(fed) => fed,
                None => {
                    let (read, cipher) = self.read_ciphertext(tls, left).await;
                    let fed = match read {
                        // 0 bytes, the end of file, too: rustls tells a clean close from a cut
                        // one (above).
                        Ok(n) => self.feed(tls, &cipher[..n]),
                        Err(err) => {
                            tls.incoming.replace(cipher);
                            return BufResult(Err(err), buf);
                        }
                    };
                    tls.incoming.replace(cipher);
                    fed
                }
            };
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

    /// [`Conn::send_last`] on TLS: `buf` encrypted, `close_notify` queued after it, and what
    /// rustls then holds sent with `MSG_MORE`; [`Conn::finish`] sends what the socket did not
    /// take (its own `close_notify` is then a no-op). Left to the usual path when a write is
    /// in flight (the records must stay in order) and when rustls cannot take all of `buf` at
    /// once. ([`Conn::send_last`] has already checked that the client left nothing unread.)
    pub(super) fn send_last_tls(&self, tls: &TlsSession, buf: &mut Vec<u8>) {
        let Some(_sending) = tls.sending.try_lock() else {
            return;
        };
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

    /// Queues `close_notify` and sends it with whatever else rustls holds, waiting at most a
    /// second: the end of a connection, which must not hold its task longer.
    pub(super) async fn send_close_notify(&self, tls: &TlsSession) {
        tls.state.borrow_mut().send_close_notify();
        let _ = self.flush_tls(tls, Duration::from_secs(1)).await;
    }

    /// [`Conn::write_all`] and [`Conn::write_all_parts`] on a TLS connection: `parts`, one
    /// after the other, encrypted as much at a time as rustls buffers (its limit on queued
    /// ciphertext), each batch sent before the next is taken.
    pub(super) async fn write_plaintext<const N: usize>(
        &self,
        tls: &TlsSession,
        parts: [&[u8]; N],
        timeout: Duration,
    ) -> io::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let mut slices = parts.map(io::IoSlice::new);
        let mut left: &mut [io::IoSlice<'_>] = &mut slices;
        // Drops empty leading parts, so that `left` is empty exactly when all is written.
        io::IoSlice::advance_slices(&mut left, 0);
        while !left.is_empty() {
            let taken = tls.state.borrow_mut().writer().write_vectored(left)?;
            io::IoSlice::advance_slices(&mut left, taken);
            let time_left = deadline.saturating_duration_since(std::time::Instant::now());
            if time_left.is_zero() {
                return Err(timed_out());
            }
            self.flush_tls(tls, time_left).await?;
        }
        Ok(())
    }
}

/// Hands `cipher` to `session` and processes it; empty is the peer's end of file, which
/// rustls tells as a clean close (after `close_notify`) or a cut one. An error means the
/// session is dead (an alert may be queued for the peer).
///
/// rustls takes no ciphertext while it holds more than 16 KiB of decrypted plaintext, and
/// one read can decrypt to more than that: with the part of a record the read before left,
/// a read of 16 KiB in a client's small records (rustls decrypts each as it takes it) adds
/// up past the limit before the read is all taken. What rustls refuses then is appended to
/// `unfed`, to be fed once the plaintext has been read. Refusing it as an error would cut a
/// client that did nothing wrong (an upload sent in small pieces was cut that way until
/// 2026-11-28).
fn feed_session(
    session: &mut rustls::ServerConnection,
    mut cipher: &[u8],
    unfed: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    debug_assert!(
        unfed.is_empty(),
        "what was left comes before new ciphertext"
    );
    if cipher.is_empty() {
        let _ = session.read_tls(&mut cipher);
    }
    while !cipher.is_empty() {
        if session.read_tls(&mut cipher).is_err() {
            if session.process_new_packets()?.plaintext_bytes_to_read() > 0 {
                unfed.extend_from_slice(cipher);
                return Ok(());
            }
            // Not for want of room for plaintext: a record larger than TLS allows.
            return Err(rustls::Error::General("record buffer full".into()));
        }
        session.process_new_packets()?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::io::Read;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;

    /// A server session and a client session that trusts it, their handshake done in memory.
    fn sessions() -> (rustls::ServerConnection, rustls::ClientConnection) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["t.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        let mut client =
            rustls::ClientConnection::new(Arc::new(client), "t.test".try_into().unwrap()).unwrap();
        while server.is_handshaking() || client.is_handshaking() {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        (server, client)
    }

    /// What `session` has decrypted, all of it.
    fn plaintext(session: &mut rustls::ServerConnection) -> Vec<u8> {
        let mut plain = Vec::new();
        let mut buf = [0; 4096];
        loop {
            match session.reader().read(&mut buf) {
                Ok(n) if n > 0 => plain.extend_from_slice(&buf[..n]),
                _ => return plain,
            }
        }
    }

    #[test]
    fn ciphertext_rustls_has_no_room_for_waits_and_nothing_is_lost() {
        let (mut server, mut client) = sessions();
        // 20 KiB in records of 1000 bytes: one read's worth of ciphertext that decrypts to
        // more than the 16 KiB rustls holds.
        let sent: Vec<u8> = (0..20 * 1024u32).map(|i| (i % 251) as u8).collect();
        for piece in sent.chunks(1000) {
            client.writer().write_all(piece).unwrap();
        }
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();

        let mut unfed = Vec::new();
        feed_session(&mut server, &wire, &mut unfed)
            .expect("a client's small records are no error");
        assert!(!unfed.is_empty(), "rustls took all {} bytes", wire.len());
        let mut received = plaintext(&mut server);
        assert!(received.len() > 16 * 1024, "{}", received.len());
        let rest = std::mem::take(&mut unfed);
        feed_session(&mut server, &rest, &mut unfed).unwrap();
        assert!(unfed.is_empty());
        received.extend(plaintext(&mut server));
        assert_eq!(received, sent);
    }

    #[test]
    fn a_record_longer_than_tls_allows_is_an_error_not_a_wait() {
        let (mut server, _client) = sessions();
        // An application-data record header claiming 20 000 bytes (TLS allows 2^14 + 256
        // in TLS 1.3), and that many bytes.
        let mut wire = vec![23, 3, 3, (20_000u16 >> 8) as u8, 20_000u16 as u8];
        wire.resize(5 + 20_000, 0);
        let mut unfed = Vec::new();
        assert!(feed_session(&mut server, &wire, &mut unfed).is_err());
        assert!(unfed.is_empty());
    }
}
