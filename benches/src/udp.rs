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
        client.run(move || self.run_here())?
    }

    /// Runs the load from this thread's namespace (the client threads inherit it).
    pub fn run_here(self) -> Result<LoadReport> {
        let deadline = Instant::now() + Duration::from_secs(self.seconds.into());
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
        let requests = latencies_us.len() as u64;
        Ok(LoadReport {
            requests_per_sec: requests as f64 / f64::from(self.seconds),
            requests,
            p50_us: quantile(&latencies_us, 0.5),
            p99_us: quantile(&latencies_us, 0.99),
            p999_us: quantile(&latencies_us, 0.999),
            errors,
            error_kinds: String::new(),
        })
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
    /// Echo servers on `addresses`, bound in namespace `server`.
    pub fn start(server: &Netns, addresses: &[SocketAddr]) -> Result<UdpEcho> {
        let sockets = addresses
            .iter()
            .map(|&address| {
                server
                    .run(move || UdpSocket::bind(address))?
                    .with_context(|| format!("bind UDP {address}"))
            })
            .collect::<Result<Vec<_>>>()?;
        UdpEcho::serve(sockets)
    }

    /// Echoes every datagram on `sockets` back to its sender until dropped. A socket belongs
    /// to the namespace it was created in, whichever thread serves it.
    pub fn serve(sockets: Vec<UdpSocket>) -> Result<UdpEcho> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for socket in sockets {
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

/// The `p` quantile (0 to 1) of `sorted`; 0 when it is empty.
fn quantile(sorted: &[u32], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    f64::from(sorted[((sorted.len() as f64 * p) as usize).min(last)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(target: SocketAddr, new_flow_per_request: bool) -> UdpLoad {
        UdpLoad {
            target,
            clients: 2,
            seconds: 1,
            new_flow_per_request,
        }
    }

    #[test]
    fn every_request_to_an_echo_is_answered_and_timed() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = socket.local_addr().unwrap();
        let _echo = UdpEcho::serve(vec![socket]).unwrap();
        for new_flow_per_request in [false, true] {
            let report = load(target, new_flow_per_request).run_here().unwrap();
            assert!(report.requests > 100, "{report:?}");
            assert_eq!(report.errors, 0, "{report:?}");
            assert!(
                report.p50_us > 0.0 && report.p50_us <= report.p99_us,
                "{report:?}"
            );
            assert!(report.p99_us <= report.p999_us, "{report:?}");
        }
    }

    #[test]
    fn requests_nobody_answers_are_errors() {
        // A bound socket that never answers: every request times out.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let report = load(silent.local_addr().unwrap(), false)
            .run_here()
            .unwrap();
        assert_eq!(report.requests, 0, "{report:?}");
        assert!(report.errors >= 2, "{report:?}");
    }

    #[test]
    fn quantiles_pick_from_the_sorted_values() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&values, 0.5), 51.0);
        assert_eq!(quantile(&values, 0.99), 100.0);
        assert_eq!(quantile(&values, 0.999), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
