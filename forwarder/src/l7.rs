//! The L7 workers: one thread per core, each with its own io_uring runtime (compio) and its own
//! `SO_REUSEPORT` listener per L7 address, so the kernel spreads connections over workers and no
//! lock sits on the request path.
//!
//! In this first form a worker answers every request itself (a small `200` naming the listener
//! and worker) and closes the connection; Host routing and proxying to per-vhost pools replace
//! [`respond`] when the reverse proxy lands. Requests are still read up to the end of their head
//! and bounded, so the listener never reacts to a half-read or oversized request.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use compio::{
    BufResult,
    io::{AsyncRead, AsyncWriteExt},
    net::TcpStream,
};
use socket2::{Domain, Socket, Type};
use weir_config::control::ListenerStatus;

/// Largest request head a worker reads before answering 431.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Counters one worker keeps for one listener. Only that worker writes them (relaxed adds on
/// its own cache line); status readers sum the workers.
#[derive(Default)]
#[repr(align(64))]
struct WorkerCounters {
    connections: AtomicU64,
    requests: AtomicU64,
}

struct Listener {
    address: SocketAddr,
    /// One slot per worker.
    counters: Vec<WorkerCounters>,
}

/// The running workers and their listeners.
pub struct L7Workers {
    listeners: Arc<[Listener]>,
    workers: usize,
}

impl L7Workers {
    /// Binds every address once per worker (so bind errors surface here, before the daemon
    /// reports ready), then starts the worker threads. `workers == 0` means one per CPU.
    pub fn start(addresses: &[SocketAddr], workers: usize) -> io::Result<L7Workers> {
        let workers = if workers == 0 {
            thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            workers
        };
        let listeners: Arc<[Listener]> = addresses
            .iter()
            .map(|&address| Listener {
                address,
                counters: (0..workers).map(|_| WorkerCounters::default()).collect(),
            })
            .collect();
        let mut sockets: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
        for address in addresses {
            for worker_sockets in &mut sockets {
                worker_sockets.push(reuseport_listener(*address)?);
            }
        }
        for (worker, worker_sockets) in sockets.into_iter().enumerate() {
            let listeners = Arc::clone(&listeners);
            thread::Builder::new()
                .name(format!("weir-l7-{worker}"))
                .spawn(move || run_worker(worker, worker_sockets, listeners))?;
        }
        Ok(L7Workers { listeners, workers })
    }

    /// Each listener with its counters summed over workers.
    pub fn status(&self) -> Vec<ListenerStatus> {
        self.listeners
            .iter()
            .map(|listener| {
                let total = |f: fn(&WorkerCounters) -> &AtomicU64| {
                    listener
                        .counters
                        .iter()
                        .map(|c| f(c).load(Ordering::Relaxed))
                        .sum()
                };
                ListenerStatus {
                    address: listener.address,
                    workers: self.workers,
                    connections: total(|c| &c.connections),
                    requests: total(|c| &c.requests),
                }
            })
            .collect()
    }
}

fn reuseport_listener(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // A VIP may be configured before the address is up on an interface.
    match address {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn run_worker(worker: usize, sockets: Vec<TcpListener>, listeners: Arc<[Listener]>) {
    let runtime = match compio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(worker, %err, "cannot create the io_uring runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let mut accept_loops = Vec::new();
        for (index, socket) in sockets.into_iter().enumerate() {
            let listeners = Arc::clone(&listeners);
            accept_loops.push(compio::runtime::spawn(async move {
                if let Err(err) = accept_loop(worker, index, socket, listeners).await {
                    tracing::error!(worker, %err, "L7 listener stopped");
                }
            }));
        }
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
    });
}

async fn accept_loop(
    worker: usize,
    index: usize,
    socket: TcpListener,
    listeners: Arc<[Listener]>,
) -> io::Result<()> {
    let listener = compio::net::TcpListener::from_std(socket)?;
    loop {
        let (stream, _peer) = listener.accept().await?;
        let listeners = Arc::clone(&listeners);
        compio::runtime::spawn(async move {
            let entry = &listeners[index];
            let counters = &entry.counters[worker];
            counters.connections.fetch_add(1, Ordering::Relaxed);
            if let Err(err) = serve_connection(stream, entry.address, worker, counters).await {
                tracing::debug!(worker, %err, "L7 connection ended with an error");
            }
        })
        .detach();
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    address: SocketAddr,
    worker: usize,
    counters: &WorkerCounters,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if head.len() >= MAX_REQUEST_HEAD {
            let (result, _) = stream.write_all(too_large()).await.into();
            return result;
        }
        let buf = Vec::with_capacity(4096);
        let BufResult(read, buf) = stream.read(buf).await;
        if read? == 0 {
            // The client went away before finishing its request: nothing to answer.
            return Ok(());
        }
        head.extend_from_slice(&buf);
    }
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let (result, _) = stream.write_all(respond(address, worker)).await.into();
    result
}

/// The answer of the listener while proxying is not built: which listener and worker served.
fn respond(address: SocketAddr, worker: usize) -> Vec<u8> {
    let body = format!("weir L7 listener {address}, worker {worker}\n");
    format!(
        "HTTP/1.1 200 OK\r\nServer: weir\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn too_large() -> &'static [u8] {
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nServer: weir\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
}
