//! `l7-runtime-proxy`: the same minimal HTTP/1.1 reverse proxy on two io_uring runtimes, to
//! choose the L7 runtime by measurement (decision 0007). Not the product's proxy.
//!
//! Thread per core: each worker owns a runtime and a `SO_REUSEPORT` listener. Per client
//! connection: read a request head (httparse), send request and body to a kept-alive upstream
//! connection of its own, read the response head and its `Content-Length` body, relay it,
//! loop. Both runtimes run exactly this loop with owned buffers; only the I/O calls differ.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    thread,
};

use clap::{Parser, ValueEnum};
use socket2::{Domain, Socket, Type};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    runtime: Runtime,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
}

#[derive(Clone, Copy, ValueEnum)]
enum Runtime {
    TokioUring,
    Compio,
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let mut threads = Vec::new();
    for _ in 0..args.workers {
        let listener = reuseport_listener(args.listen)?;
        let (runtime, upstream) = (args.runtime, args.upstream);
        threads.push(thread::spawn(move || match runtime {
            Runtime::TokioUring => on_tokio_uring::worker(listener, upstream),
            Runtime::Compio => on_compio::worker(listener, upstream),
        }));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn reuseport_listener(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Where a message in `buf` ends, once its head is complete: head length plus
/// `Content-Length`. `Ok(None)` while more bytes are needed.
fn message_end(buf: &[u8], response: bool) -> io::Result<Option<usize>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let status = if response {
        httparse::Response::new(&mut headers).parse(buf)
    } else {
        httparse::Request::new(&mut headers).parse(buf)
    }
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let httparse::Status::Complete(head) = status else {
        return Ok(None);
    };
    let length = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))
        })
        .transpose()?
        .unwrap_or(0);
    Ok(Some(head + length))
}

mod on_tokio_uring {
    use super::*;
    use tokio_uring::net::{TcpListener, TcpStream};

    pub fn worker(listener: std::net::TcpListener, upstream: SocketAddr) {
        tokio_uring::start(async move {
            let listener = TcpListener::from_std(listener);
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio_uring::spawn(async move {
                    let _ = serve(client, upstream).await;
                });
            }
        });
    }

    /// Reads one message into `buf` (which may hold the start of it); returns its length.
    async fn read_message(
        stream: &TcpStream,
        mut buf: Vec<u8>,
        response: bool,
    ) -> io::Result<(usize, Vec<u8>)> {
        loop {
            if let Some(end) = message_end(&buf, response)?
                && buf.len() >= end
            {
                return Ok((end, buf));
            }
            let chunk = Vec::with_capacity(16 * 1024);
            let (read, chunk) = stream.read(chunk).await;
            if read? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk);
        }
    }

    async fn serve(client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
        let server = TcpStream::connect(upstream).await?;
        let mut pending = Vec::new();
        loop {
            let (end, mut request) = read_message(&client, pending, false).await?;
            pending = request.split_off(end);
            let (written, _) = server.write_all(request).await;
            written?;
            let (end, mut response) = read_message(&server, Vec::new(), true).await?;
            response.truncate(end);
            let (written, _) = client.write_all(response).await;
            written?;
        }
    }
}

mod on_compio {
    use super::*;
    use compio::{
        BufResult,
        io::{AsyncRead, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    pub fn worker(listener: std::net::TcpListener, upstream: SocketAddr) {
        let runtime = compio::runtime::Runtime::new().expect("io_uring runtime");
        runtime.block_on(async move {
            listener
                .set_nonblocking(true)
                .expect("non-blocking listener");
            let listener = TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                compio::runtime::spawn(async move {
                    if let Err(err) = serve(client, upstream).await
                        && std::env::var_os("L7_RUNTIME_DEBUG").is_some()
                    {
                        eprintln!("serve: {err:?}");
                    }
                })
                .detach();
            }
        });
    }

    async fn read_message(
        stream: &mut TcpStream,
        mut buf: Vec<u8>,
        response: bool,
    ) -> io::Result<(usize, Vec<u8>)> {
        loop {
            if let Some(end) = message_end(&buf, response)?
                && buf.len() >= end
            {
                return Ok((end, buf));
            }
            let chunk = Vec::with_capacity(16 * 1024);
            let BufResult(read, chunk) = stream.read(chunk).await;
            if read? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk);
        }
    }

    async fn serve(mut client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
        let side = |what: &'static str| {
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let mut server = TcpStream::connect(upstream)
            .await
            .map_err(side("connect"))?;
        let mut pending = Vec::new();
        let mut served = 0u64;
        loop {
            let (end, mut request) =
                read_message(&mut client, pending, false)
                    .await
                    .map_err(side(if served == 0 {
                        "client first read"
                    } else {
                        "client read"
                    }))?;
            pending = request.split_off(end);
            let BufResult(written, _) = server.write_all(request).await;
            written.map_err(side("server write"))?;
            let (end, mut response) = read_message(&mut server, Vec::new(), true)
                .await
                .map_err(side("server read"))?;
            response.truncate(end);
            let BufResult(written, _) = client.write_all(response).await;
            written.map_err(side("client write"))?;
            served += 1;
        }
    }
}
