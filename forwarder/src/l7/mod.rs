//! The L7 workers: an HTTP/1.1 reverse proxy routing by Host to per-vhost pools.
//!
//! One thread per core, each with its own io_uring runtime (compio, decision 0007) and its
//! own `SO_REUSEPORT` listener per L7 address, so the kernel spreads connections over
//! workers and nothing on the request path takes a lock: routing reads an immutable
//! [`L7Snapshot`] (swapped atomically by the daemon on every change), server choice and idle
//! upstream connections are per worker, counters are relaxed atomics.
//!
//! Rooms: [`http`] (heads: parsing, checks, rewriting), [`chunked`] (chunked framing),
//! [`tls`] (certificates by SNI, session resumption), [`passthrough`] (TLS relayed by SNI),
//! [`snapshot`] (routes and pools), [`balance`] (server choice), [`upstream`] (idle server
//! connections), [`proxy`] (one client connection, request after request, and the retry
//! policy), [`error`] (why an exchange ended early: side, answer, retry), [`worker`] (what a
//! worker thread keeps and lends: buffers, pipes, idle clients), [`io`] (the seam to the
//! runtime), [`cpus`] (each worker on a CPU of its own, taking the connections received
//! there).

pub mod access_log;
pub mod balance;
pub mod chunked;
pub mod cpus;
pub mod error;
pub mod http;
pub mod io;
pub mod passthrough;
pub mod proxy;
pub mod relay;
pub mod snapshot;
pub mod tls;
pub mod upstream;
pub mod worker;

use std::{
    net::{SocketAddr, TcpListener},
    num::NonZero,
    os::fd::OwnedFd,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use weir_config::control::{ListenerStatus, RefusalCount, TlsHandshakes};

pub use snapshot::L7Snapshot;

use access_log::{AccessLog, LogFile};

use io::HandshakeFailure;
use tls::ListenerTls;
use worker::Worker;

/// How often a worker closes idle server connections that expired or whose server left
/// the rotation: the bound on how long a drain leaves idle connections open.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);
/// How often a stopping worker looks at its remaining connections.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// How long a stopping worker leaves kept-alive connections idle between requests open, so
/// that a request their clients are sending gets its answer (see `drain`).
const IDLE_LINGER: Duration = Duration::from_secs(1);
/// Buffers in each worker's provided-buffer ring (of [`proxy::READ_CHUNK`] bytes: 2 MiB a
/// worker), which client connections waiting for their next request read into (decision
/// 0023). It bounds how many such reads can complete at once, between two turns of the
/// worker's loop; past it a read finds no buffer and is made again with one of its own.
const READ_RING_BUFFERS: NonZero<u16> = NonZero::new(128).unwrap();
/// How long a worker at its connection limit waits before looking again.
const FULL_BACKOFF: Duration = Duration::from_millis(5);

/// Counters one worker keeps for one listener. Only that worker writes them (relaxed adds on
/// its own cache line); status readers sum the workers.
#[derive(Default)]
#[repr(align(64))]
pub struct WorkerCounters {
    connections: AtomicU64,
    /// Client connections open now.
    open: AtomicU64,
    requests: AtomicU64,
    /// Requests refused because of the client, by (status, reason). A refusal is rare and
    /// already costs a response, so a lock (never contended: status readers only) and a short
    /// list are enough; the reasons are the proxy's static texts, so the list stays short.
    refusals: std::sync::Mutex<Vec<(u16, &'static str, u64)>>,
    /// TLS handshakes completed in full and resumed, ClientHellos passed through (on a
    /// passthrough listener), and handshakes failed by [`HandshakeFailure`].
    tls_full: AtomicU64,
    tls_resumed: AtomicU64,
    tls_passed: AtomicU64,
    tls_failures: [AtomicU64; HandshakeFailure::ALL.len()],
}

impl WorkerCounters {
    /// Counts a TLS handshake (or passthrough ClientHello) that failed.
    pub(crate) fn tls_failed(&self, failure: HandshakeFailure) {
        self.tls_failures[failure as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request refused with `status` for `reason`.
    pub(crate) fn refused(&self, status: u16, reason: &'static str) {
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        match refusals
            .iter_mut()
            .find(|(s, r, _)| *s == status && *r == reason)
        {
            Some((_, _, count)) => *count += 1,
            None => refusals.push((status, reason, 1)),
        }
    }
}

struct Listener {
    address: SocketAddr,
    /// One slot per worker.
    counters: Vec<WorkerCounters>,
}

/// The running workers, their listeners and the snapshot they route with. Dropping it stops
/// the workers at once (their connections end with them); [`L7Workers::shut_down`] lets the
/// exchanges under way finish first.
pub struct L7Workers {
    listeners: Arc<[Listener]>,
    workers: usize,
    snapshot: Arc<ArcSwap<L7Snapshot>>,
    /// The access log file the workers append to.
    access_log: Arc<AccessLog>,
    stopping: Arc<AtomicBool>,
    /// How long stopping workers wait for their connections, in milliseconds.
    grace_ms: Arc<AtomicU64>,
    /// One per worker: a message (or the sender's drop) wakes it to stop accepting.
    stop_handles: Vec<flume::Sender<()>>,
    /// A second descriptor of every listening socket, for handing them to the next daemon
    /// ([`L7Workers::listening_sockets`]).
    listening: Vec<OwnedFd>,
    /// Each returns the connections its worker had open when it stopped accepting.
    threads: Vec<thread::JoinHandle<usize>>,
}

impl L7Workers {
    /// Binds every listener address of `snapshot` once per worker (so bind errors surface
    /// here, before the daemon reports ready), then starts the worker threads.
    /// `workers == 0` means one per CPU; `pin` pins each to a CPU of its own ([`cpus`]).
    pub fn start(snapshot: L7Snapshot, workers: usize, pin: bool) -> std::io::Result<L7Workers> {
        L7Workers::start_with(snapshot, workers, pin, Vec::new())
    }

    /// Like [`L7Workers::start`], adopting `inherited` listening sockets (a previous daemon's,
    /// see [`crate::handover`]) before binding new ones: an inherited socket keeps the
    /// connections waiting in its backlog, and accepting from it is what makes a restart
    /// refuse nothing. Each address's inherited sockets are spread over the workers, and a
    /// worker left without one gets a new `SO_REUSEPORT` socket. An inherited socket for an
    /// address this config no longer listens on is closed (its waiting connections with it).
    pub fn start_with(
        snapshot: L7Snapshot,
        workers: usize,
        pin: bool,
        inherited: Vec<TcpListener>,
    ) -> std::io::Result<L7Workers> {
        let workers = worker_count(workers);
        let worker_cpus = cpus::worker_cpus(workers, pin);
        let addresses: Vec<SocketAddr> = snapshot.listeners.iter().map(|l| l.address).collect();
        let listeners: Arc<[Listener]> = addresses
            .iter()
            .map(|&address| Listener {
                address,
                counters: (0..workers).map(|_| WorkerCounters::default()).collect(),
            })
            .collect();
        let mut inherited = inherited;
        let mut sockets: Vec<Vec<(usize, TcpListener)>> =
            (0..workers).map(|_| Vec::new()).collect();
        for (index, address) in addresses.iter().enumerate() {
            let (mine, rest): (Vec<_>, Vec<_>) = inherited
                .into_iter()
                .partition(|socket| socket.local_addr().ok() == Some(*address));
            inherited = rest;
            let adopted = mine.len();
            for (i, socket) in mine.into_iter().enumerate() {
                sockets[i % workers].push((index, socket));
            }
            for worker_sockets in sockets.iter_mut().skip(adopted) {
                worker_sockets.push((index, reuseport_listener(*address)?));
            }
            if adopted > 0 {
                tracing::info!(%address, adopted, "L7 listening sockets taken over");
            }
        }
        for socket in inherited {
            tracing::warn!(address = ?socket.local_addr().ok(), "an inherited listening socket is no longer configured: closed");
        }
        for (worker_sockets, &cpu) in sockets.iter().zip(&worker_cpus) {
            for (_, socket) in worker_sockets {
                tune_listener(socket)?;
                cpus::prefer_incoming_cpu(socket, cpu)?;
            }
        }
        let listening = sockets
            .iter()
            .flatten()
            .map(|(_, socket)| socket.try_clone().map(OwnedFd::from))
            .collect::<std::io::Result<_>>()?;
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let access_log = Arc::new(AccessLog::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let grace_ms = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let mut stop_handles = Vec::new();
        for (index, (worker_sockets, cpu)) in sockets.into_iter().zip(worker_cpus).enumerate() {
            let (stop_handle, stop) = flume::bounded(1);
            stop_handles.push(stop_handle);
            let shared = Shared {
                listeners: Arc::clone(&listeners),
                snapshot: Arc::clone(&snapshot),
                access_log: Arc::clone(&access_log),
                stopping: Arc::clone(&stopping),
                grace_ms: Arc::clone(&grace_ms),
            };
            threads.push(
                thread::Builder::new()
                    .name(format!("weir-l7-{index}"))
                    .spawn(move || run_worker(index, cpu, worker_sockets, stop, shared))?,
            );
        }
        Ok(L7Workers {
            listeners,
            workers,
            snapshot,
            access_log,
            stopping,
            grace_ms,
            stop_handles,
            listening,
            threads,
        })
    }

    /// Sets the access log file (`None`: none); workers write their next lines to it. The
    /// file was opened by the caller, so nothing changes if opening fails.
    pub fn set_access_log(&self, file: Option<LogFile>) {
        self.access_log.set(file);
    }

    /// The access log file being written, if any.
    pub fn access_log(&self) -> Option<Arc<LogFile>> {
        self.access_log.current()
    }

    /// Every listening socket (a second descriptor of each), to hand to the next daemon. The
    /// sockets stay open while the value lives, whatever the workers do.
    pub fn listening_sockets(&self) -> &[OwnedFd] {
        &self.listening
    }

    /// Makes `next` what new requests route with. Requests under way finish with the
    /// snapshot they started with. Listener addresses cannot change (they are bound).
    pub fn publish(&self, mut next: L7Snapshot) {
        next.generation = self.snapshot.load().generation + 1;
        self.snapshot.store(Arc::new(next));
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<L7Snapshot> {
        self.snapshot.load_full()
    }

    /// Each listener with its counters summed over workers.
    pub fn status(&self) -> Vec<ListenerStatus> {
        let snapshot = self.snapshot.load();
        self.listeners
            .iter()
            .enumerate()
            .map(|(index, listener)| {
                let total = |f: fn(&WorkerCounters) -> &AtomicU64| {
                    listener
                        .counters
                        .iter()
                        .map(|c| f(c).load(Ordering::Relaxed))
                        .sum()
                };
                let mut refusals: Vec<RefusalCount> = Vec::new();
                for counters in &listener.counters {
                    let worker = counters.refusals.lock().unwrap_or_else(|e| e.into_inner());
                    for &(status, reason, count) in worker.iter() {
                        match refusals
                            .iter_mut()
                            .find(|r| r.status == status && r.reason == reason)
                        {
                            Some(r) => r.count += count,
                            None => refusals.push(RefusalCount {
                                status,
                                reason: reason.to_string(),
                                count,
                            }),
                        }
                    }
                }
                refusals.sort_by(|a, b| (a.status, &a.reason).cmp(&(b.status, &b.reason)));
                let speaks_tls = !matches!(snapshot.tls.listener(index), ListenerTls::Plain);
                let tls = speaks_tls.then(|| TlsHandshakes {
                    full: total(|c| &c.tls_full),
                    resumed: total(|c| &c.tls_resumed),
                    passed_through: total(|c| &c.tls_passed),
                    failures: HandshakeFailure::ALL
                        .iter()
                        .enumerate()
                        .map(|(i, failure)| {
                            let count = listener
                                .counters
                                .iter()
                                .map(|c| c.tls_failures[i].load(Ordering::Relaxed))
                                .sum();
                            (failure.label().to_string(), count)
                        })
                        .filter(|&(_, count)| count > 0)
                        .collect(),
                });
                ListenerStatus {
                    address: listener.address,
                    workers: self.workers,
                    connections: total(|c| &c.connections),
                    connections_by_worker: listener
                        .counters
                        .iter()
                        .map(|c| c.connections.load(Ordering::Relaxed))
                        .collect(),
                    open_connections: total(|c| &c.open),
                    requests: total(|c| &c.requests),
                    refusals,
                    tls,
                }
            })
            .collect()
    }
}

impl L7Workers {
    /// Stops gracefully: no new connection is accepted, idle kept-alive connections close at
    /// once, and each exchange under way may finish (its response says `Connection: close`)
    /// for up to `grace`; what is still open then is cut. Returns the connections that were
    /// still open when the workers stopped accepting.
    pub fn shut_down(&mut self, grace: Duration) -> usize {
        self.stop(grace)
    }

    /// Stops the workers (see [`L7Workers::shut_down`]); the connections they had open when
    /// they stopped accepting.
    fn stop(&mut self, grace: Duration) -> usize {
        if self.threads.is_empty() {
            return 0;
        }
        self.grace_ms
            .store(grace.as_millis() as u64, Ordering::Relaxed);
        self.stopping.store(true, Ordering::Relaxed);
        // Each worker drops its accept loops, which wait for readiness and never hold a
        // connection: the sockets and the connections in their backlogs are left as they are,
        // for a daemon that took them over.
        for handle in self.stop_handles.drain(..) {
            let _ = handle.send(());
        }
        // With the workers' descriptors, these were the last of this daemon's: a socket no
        // other daemon took over closes, and new connections are refused, not queued.
        self.listening.clear();
        self.threads
            .drain(..)
            .map(|thread| thread.join().unwrap_or(0))
            .sum()
    }
}

impl Drop for L7Workers {
    fn drop(&mut self) {
        let _ = self.stop(Duration::ZERO);
    }
}

/// The worker threads `[l7] workers` asks for: 0 means one per CPU.
pub fn worker_count(configured: usize) -> usize {
    match configured {
        0 => thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// What every worker thread shares with the others and with the daemon.
struct Shared {
    listeners: Arc<[Listener]>,
    snapshot: Arc<ArcSwap<L7Snapshot>>,
    access_log: Arc<AccessLog>,
    stopping: Arc<AtomicBool>,
    grace_ms: Arc<AtomicU64>,
}

fn reuseport_listener(address: SocketAddr) -> std::io::Result<TcpListener> {
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

/// Sets what every connection a listening socket accepts inherits, or waits for: sockets
/// this daemon bound and ones a previous daemon handed over alike (decision 0020).
/// - `TCP_NODELAY`: an accepted socket starts with it, so no `setsockopt` per connection.
/// - `TCP_DEFER_ACCEPT` (1 s): the kernel signals a connection only once its first bytes
///   arrived (HTTP and TLS clients speak first), so the first read completes at once instead
///   of arming a poll and waking the worker twice. A client that stays silent is accepted
///   after the period anyway and meets `header_timeout_ms` as before.
fn tune_listener(socket: &TcpListener) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(socket);
    sock.set_tcp_nodelay(true)?;
    let seconds: libc::c_int = 1;
    // SAFETY: a plain setsockopt on a descriptor `socket` owns, with an int option value
    // that outlives the call.
    let done = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs worker `index` until it is stopped; returns the connections it had open when it
/// stopped accepting.
fn run_worker(
    index: usize,
    cpu: Option<usize>,
    sockets: Vec<(usize, TcpListener)>,
    stop: flume::Receiver<()>,
    shared: Shared,
) -> usize {
    if let Some(cpu) = cpu
        && let Err(err) = cpus::pin_current_thread(cpu)
    {
        tracing::warn!(worker = index, cpu, %err, "cannot pin the worker to its CPU");
    }
    // Cooperative task running: completions are processed when the worker next enters the
    // kernel instead of interrupting it with an IPI (measured: without it, reschedule IPIs
    // and socket-lock contention took about a fifth of a worker's CPU under keep-alive load).
    let mut proactor = compio::driver::ProactorBuilder::new();
    proactor.coop_taskrun(true).taskrun_flag(true);
    // The provided-buffer ring idle client connections read into (decision 0023).
    proactor
        .buffer_pool_size(READ_RING_BUFFERS)
        .buffer_pool_buffer_len(proxy::READ_CHUNK);
    let runtime = match compio::runtime::Runtime::builder()
        .with_proactor(proactor)
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(worker = index, %err, "cannot create the io_uring runtime");
            return 0;
        }
    };
    let Shared {
        listeners,
        snapshot,
        access_log,
        stopping,
        grace_ms,
    } = shared;
    let mut worker = Worker::new(index, snapshot, stopping).with_access_log(access_log);
    match runtime.enter(|| compio::runtime::Runtime::with_current(|rt| rt.buffer_pool())) {
        Ok(_) => worker = worker.with_read_ring(),
        Err(err) => tracing::warn!(
            worker = index,
            %err,
            "no provided-buffer ring: idle client connections keep a read buffer each"
        ),
    }
    let worker = Rc::new(worker);
    io::run_to_completion(&runtime, async move {
        let sweeper = {
            let worker = Rc::clone(&worker);
            compio::runtime::spawn(async move {
                loop {
                    io::sleep(SWEEP_INTERVAL).await;
                    let snapshot = worker.snapshot.load();
                    let max_idle =
                        Duration::from_millis(snapshot.settings.upstream_idle_timeout_ms);
                    worker.upstreams.sweep(&snapshot, max_idle);
                    worker.log.flush(&worker.access_log);
                }
            })
        };
        let mut accept_loops = Vec::new();
        for (listener, socket) in sockets {
            let listeners = Arc::clone(&listeners);
            let worker = Rc::clone(&worker);
            accept_loops.push(compio::runtime::spawn(async move {
                if let Err(err) = accept_loop(worker, listener, socket, listeners).await {
                    tracing::error!(worker = index, %err, "L7 listener stopped");
                }
            }));
        }
        // A stop message, or the handle dropped with the workers.
        let _ = stop.recv_async().await;
        // Dropping the loops cancels their readiness waits; nothing was accepted by them.
        drop(accept_loops);
        let open = worker.connections.get();
        let grace = Duration::from_millis(grace_ms.load(Ordering::Relaxed));
        drain(&worker, grace).await;
        drop(sweeper);
        worker.log.flush(&worker.access_log);
        open
    })
}

/// A stopping worker's last duty: wait, up to `grace`, for its client connections to end.
///
/// Exchanges under way finish (their responses say `Connection: close`). Kept-alive
/// connections waiting for their next request get [`IDLE_LINGER`] to send it — it is then
/// answered, with `Connection: close` — before they are closed: closing an idle connection
/// the moment its client sends a request on it would fail that request (the client sees a
/// reset), which on a restart is a failed request a client should never see. Runs on the
/// worker's thread, so the descriptors it shuts down are open.
async fn drain(worker: &Worker, grace: Duration) {
    let started = std::time::Instant::now();
    let deadline = started + grace;
    while worker.connections.get() > 0 && std::time::Instant::now() < deadline {
        if started.elapsed() >= IDLE_LINGER.min(grace) {
            worker.close_idle_clients();
        }
        io::sleep(DRAIN_POLL).await;
    }
}

/// The accepted `stream` as the proxy talks to it: as it is, or once its TLS handshake
/// completed if listener `index` terminates TLS (`None` if the handshake failed: counted).
async fn client_conn(
    worker: &Worker,
    index: usize,
    stream: compio::net::TcpStream,
    counters: &WorkerCounters,
) -> Option<io::Conn> {
    let (config, timeout) = {
        let snapshot = worker.snapshot.load();
        let Some(config) = snapshot.tls.config_for(index) else {
            return Some(io::Conn::accepted(stream));
        };
        let timeout = Duration::from_millis(snapshot.settings.tls_handshake_timeout_ms);
        (Arc::clone(config), timeout)
    };
    // Boxed: a handshake's state is kilobytes, and a future awaited inline is laid out in the
    // connection's task for its whole life, plain connections' included.
    match Box::pin(io::Conn::accept_tls(stream, config, timeout)).await {
        Ok(conn) => {
            let completed = if conn.resumed() {
                &counters.tls_resumed
            } else {
                &counters.tls_full
            };
            completed.fetch_add(1, Ordering::Relaxed);
            Some(conn)
        }
        Err(failure) => {
            counters.tls_failed(failure);
            None
        }
    }
}

/// One connection from `socket`'s backlog, already non-blocking and close-on-exec
/// (`accept4`), so [`io::Conn::accepted`] needs no further system call.
fn accept(socket: &TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    let (accepted, peer) =
        socket2::SockRef::from(socket).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = peer
        .as_socket()
        .ok_or_else(|| std::io::Error::other("an accepted peer that is not an IP address"))?;
    Ok((accepted.into(), peer))
}

/// Accepts connections on `socket` for listener `index` until the task is dropped.
///
/// It waits for the socket to be readable, then takes what its backlog holds with plain
/// non-blocking `accept`s. Waiting for readiness rather than submitting an accept means a
/// stopping worker cancels nothing that may already hold a connection: the backlog stays
/// whole for whoever accepts next (the daemon that took the socket over).
async fn accept_loop(
    worker: Rc<Worker>,
    index: usize,
    socket: TcpListener,
    listeners: Arc<[Listener]>,
) -> std::io::Result<()> {
    let socket = compio::runtime::fd::PollFd::new(socket)?;
    let limit = || worker.snapshot.load().settings.max_connections_per_worker;
    let ceiling = || limit() + (limit() / 4).max(1);
    loop {
        // Past the limit, connections are accepted to be answered 503 (`refuse_over_limit`).
        // Those answers hold descriptors too, a quarter of the limit at most (one at least):
        // beyond that, new connections wait in the backlog until one closes.
        while worker.connections.get() + worker.refusing.get() >= ceiling() {
            io::sleep(FULL_BACKOFF).await;
        }
        if let Err(err) = socket.accept_ready().await {
            tracing::warn!(worker = worker.index, %err, "waiting to accept failed");
            io::sleep(FULL_BACKOFF).await;
            continue;
        }
        loop {
            let (stream, peer) = match accept(&socket) {
                Ok(accepted) => accepted,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    // Out of descriptors or a connection reset before accept: not fatal.
                    tracing::warn!(worker = worker.index, %err, "accept failed");
                    io::sleep(FULL_BACKOFF).await;
                    break;
                }
            };
            let stream = compio::net::TcpStream::from_std(stream)?;
            let listeners = Arc::clone(&listeners);
            if worker.connections.get() >= limit() {
                worker.refusing.set(worker.refusing.get() + 1);
                let refusing = Rc::clone(&worker);
                let tls = !matches!(
                    worker.snapshot.load().tls.listener(index),
                    ListenerTls::Plain
                );
                compio::runtime::spawn(async move {
                    let counters = &listeners[index].counters[refusing.index];
                    let client = io::Conn::accepted(stream);
                    if tls {
                        // A 503 would need a handshake first, which an overloaded worker
                        // should not spend: the connection is closed, and counted.
                        counters.refused(503, "connection limit reached");
                    } else {
                        let refusing = Rc::clone(&refusing);
                        proxy::refuse_over_limit(refusing, index, client, peer, counters).await;
                    }
                    refusing.refusing.set(refusing.refusing.get() - 1);
                })
                .detach();
                if worker.connections.get() + worker.refusing.get() >= ceiling() {
                    break;
                }
                continue;
            }
            let worker = Rc::clone(&worker);
            worker.connections.set(worker.connections.get() + 1);
            let at_limit = worker.connections.get() + worker.refusing.get() >= ceiling();
            // The connection's task: its future is copied into the task's allocation, which
            // it keeps for the connection's life (4.4 KiB, from 8.0 before the TLS handshake
            // and passthrough were boxed).
            let connection = async move {
                let counters = &listeners[index].counters[worker.index];
                counters.connections.fetch_add(1, Ordering::Relaxed);
                counters.open.fetch_add(1, Ordering::Relaxed);
                let passthrough = matches!(
                    worker.snapshot.load().tls.listener(index),
                    ListenerTls::Passthrough
                );
                if passthrough {
                    // Boxed, like the TLS handshake (`client_conn`): its state stays out of
                    // every other connection's task.
                    Box::pin(passthrough::serve(&worker, index, stream, peer, counters)).await;
                } else if let Some(client) = client_conn(&worker, index, stream, counters).await {
                    proxy::serve_client(Rc::clone(&worker), index, client, peer, counters).await;
                }
                counters.open.fetch_sub(1, Ordering::Relaxed);
                worker.connections.set(worker.connections.get() - 1);
            };
            compio::runtime::spawn(connection).detach();
            if at_limit {
                break;
            }
        }
    }
}
