//! A spoofed-source SYN flood of our own: TCP SYN frames from random sources, written straight
//! onto a link through an `AF_PACKET` socket, as fast as one thread can, for a bounded count.
//!
//! Sources are drawn from 198.19.0.0/16 (inside the 198.18.0.0/15 test range, outside every
//! subnet the topology uses), so the servers' SYN-ACKs go to addresses no namespace routes:
//! the balancer has no route for them and drops them there. Every frame carries correct IPv4
//! and TCP checksums, so the servers answer each SYN as they would a real one.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use weir_common::csum;

use crate::netns::{Netns, veth};

/// The balancer's interface towards the attacker (see [`attacker`]).
pub const ATTACK_LINK: &str = "a0";

/// A namespace of its own for the flood, linked to the balancer by `ATTACK_LINK`: the flood
/// does not queue in front of the legitimate client's packets on the client's link (on a real
/// edge they would arrive on different paths too), while the balancer's CPUs absorb both.
/// The balancer must attach its datapath to `ATTACK_LINK` as well.
pub fn attacker(name: &str, balancer: &Netns) -> anyhow::Result<Netns> {
    let attacker = Netns::new(name)?;
    veth(&attacker, "eth0", balancer, ATTACK_LINK)?;
    Ok(attacker)
}

/// What a flood sent.
#[derive(Debug, Clone, Copy)]
pub struct FloodReport {
    /// Frames the socket accepted.
    pub sent: u64,
    /// Frames it refused (a full queue): not sent.
    pub refused: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

/// Where the frames go.
pub struct FloodTarget {
    /// The interface to write to, in the calling thread's namespace.
    pub interface: String,
    pub src_mac: [u8; 6],
    /// The MAC of the next hop (the balancer's interface on the link).
    pub dst_mac: [u8; 6],
    /// Each frame goes to the next of these, in turn.
    pub destinations: Vec<SocketAddrV4>,
}

/// Sends `count` SYNs to `target` from random sources, or fewer if `limit` passes first. Must
/// run on a thread in the namespace of `target.interface`.
pub fn syn_flood(target: &FloodTarget, count: u64, limit: Duration) -> io::Result<FloodReport> {
    let ifindex = nix::net::if_::if_nametoindex(target.interface.as_str())?;
    let socket = PacketSocket::open(ifindex)?;
    let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut frame = [0u8; FRAME_LEN];
    let started = Instant::now();
    let (mut sent, mut refused) = (0u64, 0u64);
    while sent < count && started.elapsed() < limit {
        for _ in 0..1024 {
            let bits = random.next();
            let source = SocketAddrV4::new(
                Ipv4Addr::new(198, 19, (bits >> 8) as u8, bits as u8),
                1024 + ((bits >> 16) as u16 % 64_000),
            );
            let destination =
                target.destinations[(sent % target.destinations.len() as u64) as usize];
            syn_frame(&mut frame, target, source, destination, (bits >> 32) as u32);
            if socket.send(&frame) {
                sent += 1;
            } else {
                refused += 1;
            }
        }
    }
    Ok(FloodReport {
        sent,
        refused,
        elapsed: started.elapsed(),
    })
}

const FRAME_LEN: usize = 14 + 20 + 20;

/// Writes an Ethernet + IPv4 + TCP SYN frame with correct checksums into `frame`.
fn syn_frame(
    frame: &mut [u8; FRAME_LEN],
    target: &FloodTarget,
    source: SocketAddrV4,
    destination: SocketAddrV4,
    sequence: u32,
) {
    frame[..6].copy_from_slice(&target.dst_mac);
    frame[6..12].copy_from_slice(&target.src_mac);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut frame[14..34];
    ip.copy_from_slice(&[
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[12..16].copy_from_slice(&source.ip().octets());
    ip[16..20].copy_from_slice(&destination.ip().octets());
    let ip_check = !csum::fold(sum16(ip));
    ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    let tcp = &mut frame[34..54];
    tcp.fill(0);
    tcp[0..2].copy_from_slice(&source.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&destination.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&sequence.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    // Pseudo-header: addresses, protocol, TCP length.
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&source.ip().octets());
    pseudo[4..8].copy_from_slice(&destination.ip().octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_check = !csum::fold(sum16(&pseudo) + sum16(tcp));
    tcp[16..18].copy_from_slice(&tcp_check.to_ne_bytes());
}

/// One's-complement sum of native-order 16-bit words (see `weir_common::csum` on byte order).
fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|pair| u16::from_ne_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

/// Marsaglia's xorshift64: cheap, and good enough to spread sources and ports.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// An `AF_PACKET` raw socket bound to one interface.
struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    fn open(ifindex: u32) -> io::Result<PacketSocket> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero `sockaddr_ll` is valid; the fields that matter are set.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = ifindex as i32;
        use std::os::fd::AsRawFd;
        // SAFETY: `address` is a valid `sockaddr_ll` of the length given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd })
    }

    /// Writes one frame; `false` if the kernel refused it (queue full).
    fn send(&self, frame: &[u8]) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: `frame` is valid for `frame.len()` bytes for the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        n == frame.len() as isize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_correct_checksums() {
        let target = FloodTarget {
            interface: "eth0".into(),
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            destinations: vec![],
        };
        let mut frame = [0u8; FRAME_LEN];
        let source = "198.19.7.9:40000".parse().unwrap();
        let destination = "198.18.100.10:80".parse().unwrap();
        syn_frame(&mut frame, &target, source, destination, 77);
        let sliced = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
            panic!("IPv4")
        };
        let header = ip.header().to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        let Some(etherparse::TransportSlice::Tcp(tcp)) = &sliced.transport else {
            panic!("TCP")
        };
        let tcp_header = tcp.to_header();
        assert!(tcp_header.syn && !tcp_header.ack);
        assert_eq!(
            tcp_header.checksum,
            tcp_header.calc_checksum_ipv4(&header, &[]).unwrap()
        );
        assert_eq!(tcp_header.sequence_number, 77);
    }
}
