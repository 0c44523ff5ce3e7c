//! Sending a rewritten packet on: next hop from the kernel's FIB, MACs set, redirected
//! through the device map — the kernel stack never sees it.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use weir_common::{Stat, l4::FAMILY_IPV4};

use crate::{
    maps::WEIR_TX_PORTS,
    parse::{ETH_HLEN, Packet, write},
    rewrite, verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
/// The route exists but the next hop's MAC is not resolved yet.
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
/// The packet is larger than the egress MTU.
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// How the packet is passed on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// As a router (NAT): the TTL is decremented, and when the next hop is not resolved yet or
    /// the packet exceeds the egress MTU, the rewritten packet goes to the kernel, which
    /// forwards it the slow way (resolving the neighbour, or answering "fragmentation needed").
    Routed,
    /// At L2 (DSR): only the MACs change. The kernel must not see it — its destination is a
    /// local VIP — so what the fast path cannot send is dropped.
    Bridged,
}

/// Sends `packet` (already rewritten, addressed `src` → `dst`) to its next hop, counting it
/// under `stat` when it leaves.
#[inline(always)]
pub fn to_next_hop(
    ctx: &XdpContext,
    packet: &Packet,
    src: &[u32; 4],
    dst: &[u32; 4],
    hop: Hop,
    stat: Stat,
    len: u64,
) -> u32 {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid value (plain integers and unions of
    // integers).
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.l4_protocol = packet.protocol;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // For the MTU check: the IP packet's length (the frame without its Ethernet header).
    fib.__bindgen_anon_1.tot_len = (len as usize).saturating_sub(ETH_HLEN) as u16;
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
    match (rc, hop) {
        (BPF_FIB_LKUP_RET_SUCCESS, _) => {}
        (BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED, Hop::Routed) => {
            return verdict::pass(Stat::PassSlowPath, len);
        }
        (BPF_FIB_LKUP_RET_NO_NEIGH, Hop::Bridged) => {
            return verdict::drop(Stat::DropNoNeighbor, len);
        }
        _ => return verdict::drop(Stat::DropNoRoute, len),
    }
    if hop == Hop::Routed && rewrite::decrement_ttl(ctx, packet).is_none() {
        return verdict::drop(Stat::DropMalformed, len);
    }
    if write(ctx, 0, fib.dmac).is_none() || write(ctx, 6, fib.smac).is_none() {
        return verdict::drop(Stat::DropMalformed, len);
    }
    // The egress must be an interface weir is attached to (it is in the device map). If it is
    // not, the packet already carries the next hop's MACs, which the kernel would refuse as
    // "not for this host": drop it and count it as unroutable.
    match WEIR_TX_PORTS.redirect(fib.ifindex, xdp_action::XDP_DROP as u64) {
        Ok(action) => verdict::count_as(stat, len, action),
        Err(_) => verdict::drop(Stat::DropNoRoute, len),
    }
}
