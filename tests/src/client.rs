//! Clients of the demo backends ([`crate::origin`]) that check what they get back: the e2e
//! tests count on them to notice a broken or misrouted connection.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// How long a client waits to connect or for an answer before calling it a failure.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// One HTTP request on a new connection; the name of the server that answered.
pub fn http_get(vip: SocketAddr) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&vip, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: l4.test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .lines()
        .last()
        .filter(|_| response.starts_with("HTTP/1.1 200"))
        .map(str::to_string)
        .ok_or_else(|| io::Error::other(format!("bad response {response:?}")))
}

/// A long-lived connection to an echo backend, which greets with its name.
pub struct EchoConnection {
    stream: TcpStream,
    /// The backend that greeted.
    pub server: String,
    /// Exchanges done so far.
    pub round: u64,
}

impl EchoConnection {
    pub fn open(vip: SocketAddr) -> io::Result<EchoConnection> {
        EchoConnection::from_stream(TcpStream::connect_timeout(&vip, TIMEOUT)?)
    }

    /// Reads the greeting on a connection opened elsewhere.
    pub fn from_stream(stream: TcpStream) -> io::Result<EchoConnection> {
        stream.set_read_timeout(Some(TIMEOUT))?;
        let mut greeting = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            (&stream).read_exact(&mut byte)?;
            greeting.push(byte[0]);
        }
        let server = String::from_utf8_lossy(&greeting).trim().to_string();
        Ok(EchoConnection {
            stream,
            server,
            round: 0,
        })
    }

    /// Waits up to `timeout` instead of [`TIMEOUT`] for each answer: for a connection that must
    /// ride out a failover, while a lost route is being withdrawn.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))
    }

    /// Streams `bytes` of varied data to the echo server while reading the echo back, and
    /// checks that every byte came back in order (by xxh3 of both streams): a bulk transfer
    /// in both directions at once.
    pub fn stream_through(&mut self, bytes: usize) -> io::Result<()> {
        let data: Vec<u8> = (0..bytes as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let sent = xxhash_rust::xxh3::xxh3_64(&data);
        // A stalled transfer must fail, not hang: writes time out like reads, and a failed
        // read shuts the socket so the sender stops too.
        self.stream.set_write_timeout(Some(TIMEOUT))?;
        let mut writer = self.stream.try_clone()?;
        let sender = std::thread::spawn(move || writer.write_all(&data));
        let mut back = vec![0u8; bytes];
        let read = self.stream.read_exact(&mut back);
        if read.is_err() {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
        sender
            .join()
            .map_err(|_| io::Error::other("sender panicked"))??;
        read?;
        if xxhash_rust::xxh3::xxh3_64(&back) != sent {
            return Err(io::Error::other("streamed data came back different"));
        }
        Ok(())
    }

    /// Sends 4 KiB of round-specific data and checks it comes back intact.
    pub fn exchange(&mut self) -> io::Result<()> {
        self.round += 1;
        let data: Vec<u8> = (0..4096u64).map(|i| (i * 31 + self.round) as u8).collect();
        self.stream.write_all(&data)?;
        let mut back = vec![0u8; data.len()];
        self.stream.read_exact(&mut back)?;
        if back != data {
            return Err(io::Error::other("echoed data differs"));
        }
        Ok(())
    }
}
