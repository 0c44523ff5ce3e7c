//! UDP request/response load for the L4 comparison, where wrk cannot go: a closed loop of
//! clients, each sending a datagram and waiting for its echo before sending the next (as a
//! DNS resolver does), and the echo servers that answer them.
//!
//! Either each client keeps one socket (one flow per client for the whole run), or it opens a
//! new socket, so a new source port and a new flow at the balancer, for every request. A
//! request that gets no answer within [`TIMEOUT`] counts as an error and the client moves on;
//! an answer to an earlier, timed-out request is skipped, not taken for the current one.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use weir_tests::netns::Netns;

use crate::wrk::LoadReport;

/// How long a client waits for an answer before counting the request lost.
pub const TIMEOUT: Duration = Duration::from_millis(200);

/// Bytes of a request: the client's number and the request's sequence number, padded.
const REQUEST_LEN: usize = 32;

/// A closed-loop UDP load against one address.
#[derive(Debug, Clone, Copy)]
pub struct UdpLoad {
    pub target: SocketAddr,
    pub clients: u32,
    pub seconds: u32,
    /// A new socket (source port) for every request instead of one per client.
    pub new_flow_per_request: bool,
}

impl UdpLoad {
    /// Runs the load from namespace `client`; every answer is checked against its request.
    pub fn run(self, client: &Netns) -> Result<LoadReport> {
        client.run(move || -> Result<LoadReport> {
            let deadline = Instant::now() + Duration::from_secs(self.seconds.into());
            // Threads spawned here inherit the namespace of this one.
            let clients: Vec<_> = (0..self.clients)
                .map(|id| thread::spawn(move || self.client_loop(id, deadline)))
                .collect();
            let mut latencies_us = Vec::new();
            let mut errors = 0;
            for client in clients {
                let (latencies, lost) = client.join().expect("UDP client thread")?;
                latencies_us.extend(latencies);
                errors += lost;
            }
            latencies_us.sort_unstable();
            let percentile = |p: f64| {
                latencies_us
                    .get(
                        ((latencies_us.len() as f64 * p) as usize)
                            .min(latencies_us.len().max(1) - 1),
                    )
                    .map_or(0.0, |&us| f64::from(us))
            };
            let requests = latencies_us.len() as u64;
            Ok(LoadReport {
                requests_per_sec: requests as f64 / f64::from(self.seconds),
                requests,
                p50_us: percentile(0.5),
                p99_us: percentile(0.99),
                p999_us: percentile(0.999),
                errors,
            })
        })?
    }

    /// One client until `deadline`: the latency of each answered request (µs) and the number
    /// of requests that went unanswered.
    fn client_loop(self, id: u32, deadline: Instant) -> Result<(Vec<u32>, u64)> {
        let mut latencies = Vec::new();
        let mut lost = 0;
        let mut socket = None;
        let mut answer = [0u8; 2048];
        let mut sequence = 0u64;
        while Instant::now() < deadline {
            if socket.is_none() || self.new_flow_per_request {
                socket = Some(connected_socket(self.target)?);
            }
            let socket = socket.as_ref().expect("opened above");
            sequence += 1;
            let mut request = [0u8; REQUEST_LEN];
            request[..4].copy_from_slice(&id.to_be_bytes());
            request[4..12].copy_from_slice(&sequence.to_be_bytes());
            let sent = Instant::now();
            match socket.send(&request) {
                Ok(_) => {}
                // An unreachable port (ICMP from an earlier request) is a lost request.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    lost += 1;
                    continue;
                }
                Err(e) => return Err(e).context("UDP send"),
            }
            loop {
                let left = TIMEOUT.saturating_sub(sent.elapsed());
                if left.is_zero() {
                    lost += 1;
                    break;
                }
                socket.set_read_timeout(Some(left))?;
                match socket.recv(&mut answer) {
                    Ok(n) if answer[..n] == request => {
                        latencies.push(sent.elapsed().as_micros() as u32);
                        break;
                    }
                    // A late answer to an earlier request: wait on for this one.
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::WouldBlock
                                | ErrorKind::TimedOut
                                | ErrorKind::ConnectionRefused
                        ) =>
                    {
                        lost += 1;
                        break;
                    }
                    Err(e) => return Err(e).context("UDP receive"),
                }
            }
        }
        Ok((latencies, lost))
    }
}

fn connected_socket(target: SocketAddr) -> Result<UdpSocket> {
    let any: IpAddr = if target.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).context("UDP bind")?;
    socket.connect(target).context("UDP connect")?;
    Ok(socket)
}

/// UDP echo servers in a namespace, one thread per address; stopped and joined when dropped,
/// so nothing holds the namespace after the benchmark.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(server: &Netns, addresses: &[SocketAddr]) -> Result<UdpEcho> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &address in addresses {
            // Bound inside the namespace; the socket belongs to it wherever it is served from.
            let socket = server.run(move || UdpSocket::bind(address))??;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        Ok(UdpEcho { stop, threads })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
