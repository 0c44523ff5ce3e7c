//! Sending a rewritten packet on: next hop from the kernel's FIB, MACs set, redirected
//! through the device map — the kernel stack never sees it.
//!
//! The FIB lookup (route and neighbour) is the most expensive step of an established flow
//! (about 110 ns for IPv4 and 230 ns for IPv6 of a 260/370 ns DSR hit, measured by removing
//! it), so packets towards a server use the per-CPU next-hop cache `WEIR_NEXT_HOPS` (see
//! `weir_common::l4::NextHop` for when an entry is trusted). Replies to clients, whose next
//! hops are as many as the clients, still ask the FIB.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use weir_common::{
    Stat,
    l4::{FAMILY_IPV4, NEXT_HOP_TTL_NS, NextHop},
};

use crate::{
    maps::{WEIR_NEXT_HOPS, WEIR_TX_PORTS},
    parse::{ETH_HLEN, Packet, Words},
    rewrite, verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// The destination and source MACs, the bytes a forwarded frame's Ethernet header changes.
const ETH_MACS: usize = 12;
pub const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
/// The route exists but the next hop's MAC is not resolved yet.
pub const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
/// The packet is larger than the egress MTU.
pub const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// How the packet is passed on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// As a router (NAT): the caller has decremented the TTL with its rewrite. When the next
    /// hop is not resolved yet or the packet exceeds the egress MTU, the TTL is put back and
    /// the rewritten packet goes to the kernel, which forwards it the slow way (resolving the
    /// neighbour, or answering "fragmentation needed") and decrements the TTL itself.
    Routed,
    /// At L2 (DSR): only the MACs change. The kernel must not see it — its destination is a
    /// local VIP — so what the fast path cannot send is dropped.
    Bridged,
}

/// Where a rewritten packet is going, and how.
pub struct Route<'a> {
    pub src: &'a [u32; 4],
    pub dst: &'a [u32; 4],
    pub hop: Hop,
    /// The id of the server `dst` is, whose next hop may come from the cache; `None` towards
    /// clients.
    pub server: Option<u32>,
    /// The packet's timestamp (`crate::clock`), for the next-hop cache.
    pub now: u64,
}

/// Sends `packet` (already rewritten, addressed as `route` says) to its next hop, counting it
/// under `stat` when it leaves.
#[inline(always)]
pub fn to_next_hop(ctx: &XdpContext, packet: &Packet, route: Route, stat: Stat, len: u64) -> u32 {
    let Route {
        src,
        dst,
        hop,
        server,
        now,
    } = route;
    let ip_len = (len as usize).saturating_sub(ETH_HLEN) as u16;
    let cache = server.and_then(|id| WEIR_NEXT_HOPS.get_ptr_mut(id));
    // SAFETY: the pointer is from a per-CPU map lookup and valid for this run; only this CPU
    // touches its copy. Read in place: the fields are checked, then the MACs copied.
    let cached = cache.map(|entry| unsafe { &*entry }).filter(|entry| {
        entry.ifindex != 0
            && entry.addr == *dst
            && ip_len <= entry.ok_len
            && now.saturating_sub(entry.checked_ns) < NEXT_HOP_TTL_NS
    });
    let fresh;
    let next = match cached {
        Some(entry) => entry,
        None => match fib_next_hop(
            ctx,
            ctx.ingress_ifindex() as u32,
            packet,
            src,
            dst,
            ip_len,
            now,
        ) {
            Ok(next) => {
                if let Some(entry) = cache {
                    // SAFETY: as above.
                    unsafe { *entry = next };
                }
                fresh = next;
                &fresh
            }
            Err(rc) => {
                return match (rc, hop) {
                    (BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED, Hop::Routed) => {
                        if rewrite::set_ttl(ctx, packet, packet.ttl).is_none() {
                            return verdict::drop(Stat::DropMalformed, len);
                        }
                        verdict::pass(Stat::PassSlowPath, len)
                    }
                    (BPF_FIB_LKUP_RET_NO_NEIGH, Hop::Bridged) => {
                        verdict::drop(Stat::DropNoNeighbor, len)
                    }
                    _ => verdict::drop(Stat::DropNoRoute, len),
                };
            }
        },
    };
    let Some(ethernet) = Words::<ETH_MACS>::of(ctx) else {
        return verdict::drop(Stat::DropMalformed, len);
    };
    for (at, mac) in [(0, &next.dmac), (6, &next.smac)] {
        let mac = mac as *const [u8; 6] as *const u16;
        for i in 0..3 {
            // SAFETY: `mac` points to 6 bytes at an even offset of the 8-aligned `NextHop`
            // (`weir_common::l4` fixes the layout), so each 16-bit read is in bounds and
            // aligned.
            ethernet.set(at + 2 * i, unsafe { mac.add(i).read() });
        }
    }
    // Out of the interface it came in on (a one-armed balancer): XDP_TX, which skips the
    // device map and the redirect's flush.
    if next.ifindex == ctx.ingress_ifindex() as u32 {
        return verdict::count_as(stat, len, xdp_action::XDP_TX);
    }
    // The egress must be an interface weir is attached to (it is in the device map). If it is
    // not, the packet already carries the next hop's MACs, which the kernel would refuse as
    // "not for this host": drop it and count it as unroutable.
    match WEIR_TX_PORTS.redirect(next.ifindex, xdp_action::XDP_DROP as u64) {
        Ok(action) => verdict::count_as(stat, len, action),
        Err(_) => verdict::drop(Stat::DropNoRoute, len),
    }
}

/// Asks the kernel's FIB for the next hop of a packet `src` → `dst` that came in on
/// `ifindex`; the FIB's return code when it has no usable answer. `ip_len` is the IP length
/// the MTU check uses; 0 (TC only) lets the kernel check the buffer itself, which for a
/// merged (GSO) buffer means the size of the segments it will be split into.
#[inline(always)]
pub fn fib_next_hop(
    ctx: &impl EbpfContext,
    ifindex: u32,
    packet: &Packet,
    src: &[u32; 4],
    dst: &[u32; 4],
    ip_len: u16,
    now: u64,
) -> Result<NextHop, i64> {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid value (plain integers and unions of
    // integers).
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.l4_protocol = packet.protocol;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_1.tot_len = ip_len;
    if packet.family == FAMILY_IPV4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = src[0];
        fib.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = *src;
        fib.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: `fib` is a valid, writable `bpf_fib_lookup` of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return Err(rc);
    }
    Ok(NextHop {
        addr: *dst,
        checked_ns: now,
        ifindex: fib.ifindex,
        ok_len: ip_len,
        dmac: fib.dmac,
        smac: fib.smac,
        _pad: [0; 6],
    })
}
