//! The NAT return path: a server's reply gets its VIP back as the source and goes on to the
//! client.
//!
//! It runs at TC ingress, after the kernel's GRO, not in XDP: XDP sees a bulk response one
//! wire frame at a time, while by TC GRO has merged a TCP stream's frames into buffers of up
//! to 64 KiB. Each merged buffer is rewritten and forwarded once, and reaches the client still
//! merged, as direct or nftables traffic would (decision 0013). The XDP program passes these
//! replies up without counting them; they are counted here, as the frames they stand for.
//!
//! The rewrite goes through the kernel's checksum helpers rather than the in-place arithmetic
//! of the XDP path: a merged buffer carries only the pseudo-header sum in its TCP checksum
//! (`CHECKSUM_PARTIAL`; the rest is filled in when it is split again), which the helpers patch
//! correctly for every checksum state a socket buffer can be in.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_redirect,
    programs::TcContext,
};
use weir_common::{
    Stat,
    flow::{FlowKey, NatReturn},
    l4::FAMILY_IPV4,
};

use crate::{
    clock, flow,
    forward::{self, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH},
    maps::{self, WEIR_NAT_RETURN, WEIR_TX_PORTS},
    parse::{self, ETH_HLEN, IPV6_HLEN, Packet, Parsed},
};

/// The most header bytes the parser reads: Ethernet, IPv6, the first 20 bytes of TCP.
const HEADERS_LEN: u32 = (ETH_HLEN + IPV6_HLEN + 20) as u32;

/// Rewrites and forwards a NAT reply; anything else is left to the kernel untouched (the XDP
/// program has counted it already).
///
/// The VIP of a reply comes from its NAT return entry once the flow is established, or from
/// the flow's embryonic entry before that (the SYN-ACK; a UDP answer to a first datagram).
#[inline(always)]
pub fn try_nat_return(ctx: &TcContext) -> Result<i32, i32> {
    pull_headers(ctx);
    let Parsed::Transport(packet) = parse::parse(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let now = clock::now_ns();
    let tally = Tally::of(ctx);
    // SAFETY: the value is copied out before the next helper call.
    let returning = unsafe { WEIR_NAT_RETURN.get(packet.flow_key()) }.copied();
    let mut stale = false;
    let established = returning.filter(|nat| {
        let owned = flow::owns_reply(&client_flow(&packet, nat), nat, &packet, now);
        if !owned {
            // The entry outlived its flow: forget it, so the rest of this connection (one
            // that never came through the VIP) no longer matches either.
            let _ = WEIR_NAT_RETURN.remove(packet.flow_key());
            stale = true;
        }
        owned
    });
    let Some(nat) = established.or_else(|| flow::embryonic_reply(&packet, now)) else {
        return Ok(if stale {
            tally.count(Stat::PassStaleReturn, TC_ACT_OK)
        } else {
            TC_ACT_OK
        });
    };
    let forward = client_flow(&packet, &nat);
    if flow::ends_flow(&packet) {
        flow::mark_closing(&forward, now);
    }
    if packet.ttl <= 1 {
        return Ok(tally.count(Stat::DropTtlExceeded, TC_ACT_SHOT));
    }
    if restore_vip(ctx, &packet, &nat).is_err() {
        return Ok(tally.count(Stat::DropMalformed, TC_ACT_SHOT));
    }
    Ok(send_to_client(ctx, &packet, &nat, tally, now))
}

/// The client → VIP direction of `packet`'s flow, a reply to the VIP in `nat`.
#[inline(always)]
fn client_flow(packet: &Packet, nat: &NatReturn) -> FlowKey {
    FlowKey {
        dst: nat.vip,
        dst_port: nat.vip_port,
        ..packet.flow_key().reversed()
    }
}

/// Routes the rewritten reply as a router would: out of the FIB's interface to its next hop.
/// What the fast path cannot send — an unresolved neighbour, a packet over the egress MTU, an
/// egress weir is not attached to — goes to the kernel, already rewritten, which forwards it
/// the slow way (and decrements the TTL itself).
#[inline(always)]
fn send_to_client(
    ctx: &TcContext,
    packet: &Packet,
    nat: &NatReturn,
    tally: Tally,
    now: u64,
) -> i32 {
    // SAFETY: `skb` is the program's context pointer, valid for this run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let next = match forward::fib_next_hop(ctx, ifindex, packet, &nat.vip, &packet.dst, 0, now) {
        Ok(next) => next,
        Err(BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED) => {
            return tally.count(Stat::PassSlowPath, TC_ACT_OK);
        }
        Err(_) => return tally.count(Stat::DropNoRoute, TC_ACT_SHOT),
    };
    if WEIR_TX_PORTS.get(next.ifindex).is_none() {
        return tally.count(Stat::PassSlowPath, TC_ACT_OK);
    }
    if decrement_ttl(ctx, packet).is_err()
        || ctx.store(0, &next.dmac, 0).is_err()
        || ctx.store(6, &next.smac, 0).is_err()
    {
        return tally.count(Stat::DropMalformed, TC_ACT_SHOT);
    }
    // SAFETY: plain helper call; it only records the target for the verdict returned here.
    let action = unsafe { bpf_redirect(next.ifindex, 0) } as i32;
    tally.count(Stat::ReturnNat, action)
}

/// Puts the headers in the buffer's linear part, where the parser reads them. A merged
/// buffer's headers already are; anything shorter than the headers is left as it is and the
/// parser finds it short.
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if linear < HEADERS_LEN && len > linear {
        let _ = ctx.pull_data(len.min(HEADERS_LEN));
    }
}

/// Replaces the reply's source (the server) with the VIP, fixing the checksums through the
/// kernel's helpers. UDP checksums are patched with `BPF_F_MARK_MANGLED_0`: a UDP/IPv4
/// checksum of 0 ("none") stays 0, and a computed 0 is sent as 0xffff.
#[inline(always)]
fn restore_vip(ctx: &TcContext, packet: &Packet, nat: &NatReturn) -> Result<(), i64> {
    let l4 = packet.l4_offset();
    let (check_at, mangled) = if packet.is_tcp() {
        (l4 + 16, 0)
    } else {
        (l4 + 6, BPF_F_MARK_MANGLED_0 as u64)
    };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
    if packet.family == FAMILY_IPV4 {
        let (old, new) = (packet.src[0], nat.vip[0]);
        ctx.l4_csum_replace(check_at, old as u64, new as u64, pseudo | 4)?;
        ctx.l3_csum_replace(ETH_HLEN + 10, old as u64, new as u64, 4)?;
        ctx.store(ETH_HLEN + 12, &new, 0)?;
    } else {
        for i in 0..4 {
            let (old, new) = (packet.src[i], nat.vip[i]);
            if old != new {
                ctx.l4_csum_replace(check_at, old as u64, new as u64, pseudo | 4)?;
            }
        }
        ctx.store(ETH_HLEN + 8, &nat.vip, 0)?;
    }
    ctx.l4_csum_replace(
        check_at,
        packet.src_port as u64,
        nat.vip_port as u64,
        mangled | 2,
    )?;
    ctx.store(l4, &nat.vip_port, 0)
}

/// Decrements the IPv4 TTL (fixing the header checksum) or the IPv6 hop limit; the caller has
/// checked that it is above 1.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, packet: &Packet) -> Result<(), i64> {
    if packet.family == FAMILY_IPV4 {
        // TTL is the high byte of the (TTL, protocol) word that the checksum covers.
        let old = u16::from_ne_bytes([packet.ttl, packet.protocol]);
        let new = u16::from_ne_bytes([packet.ttl - 1, packet.protocol]);
        ctx.l3_csum_replace(ETH_HLEN + 10, old as u64, new as u64, 2)?;
        ctx.store(ETH_HLEN + 8, &new, 0)
    } else {
        ctx.store(ETH_HLEN + 7, &(packet.ttl - 1), 0)
    }
}

/// What one run of the program counts: the wire frames the buffer stands for (GRO's segment
/// count, 1 for a buffer that was never merged) and its length.
#[derive(Clone, Copy)]
struct Tally {
    frames: u64,
    len: u64,
}

impl Tally {
    #[inline(always)]
    fn of(ctx: &TcContext) -> Tally {
        // SAFETY: `skb` is the program's context pointer, valid for this run.
        let segments = unsafe { (*ctx.skb.skb).gso_segs };
        Tally {
            frames: segments.max(1) as u64,
            len: ctx.len() as u64,
        }
    }

    /// Counts the buffer under `stat` and returns `action` as TC's verdict.
    #[inline(always)]
    fn count(self, stat: Stat, action: i32) -> i32 {
        maps::count_frames(stat, self.frames, self.len);
        action
    }
}
