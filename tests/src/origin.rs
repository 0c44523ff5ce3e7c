//! Mock origins that say which backend answered.
//!
//! - HTTP: each response carries the backend's name in the body and in `X-Served-By`, so a
//!   client can tell where the balancer sent it. It reads the request head only (no bodies)
//!   and closes the connection after answering: enough for routing and spread tests.
//! - TCP echo: sends `<name>\n`, then echoes every byte back — long-lived connections whose
//!   data a test can verify.
//! - UDP: answers each datagram with `<name> <datagram>`.

use std::{
    io::{self, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

/// Serves `listener` until the process ends, answering every request with `name`. Returns the
/// count of requests served, shared with the serving threads.
pub fn serve(listener: TcpListener, name: String) -> Arc<AtomicU64> {
    let served = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&served);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            let counter = Arc::clone(&counter);
            thread::spawn(move || {
                if answer(stream, &name).is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    served
}

fn answer(mut stream: TcpStream, name: &str) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = crate::read_some(&mut stream, &mut buf)?;
        if n == 0 || head.len() > 64 * 1024 {
            return Err(io::ErrorKind::InvalidData.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = format!("{name}\n");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nX-Served-By: {name}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serves TCP echo on `listener` until the process ends (see the module docs).
pub fn serve_echo(listener: TcpListener, name: String) {
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let greeting = format!("{name}\n");
            thread::spawn(move || -> io::Result<()> {
                stream.write_all(greeting.as_bytes())?;
                let mut buf = [0u8; 16 * 1024];
                loop {
                    let n = crate::read_some(&mut stream, &mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    stream.write_all(&buf[..n])?;
                }
            });
        }
    });
}

/// Answers datagrams on `socket` until the process ends (see the module docs).
pub fn serve_udp(socket: UdpSocket, name: String) {
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let mut reply = format!("{name} ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from);
        }
    });
}
