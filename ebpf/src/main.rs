//! weir's XDP entry point: the L4 balancer.
//!
//! Reads top to bottom: parse → VIP lookup → flow lookup or Maglev pick (and record) →
//! rewrite → forward. Packets that are not L4 VIP traffic — the host's own, L7 VIPs, ARP —
//! are passed to the kernel untouched; replies from NAT servers are rewritten back to their
//! VIP on the way out. Every packet is counted once under the reason for its verdict
//! (`weir_common::Stat`). The edge policies (fragments, options, ICMP) are in
//! `docs/datapath.md`.
#![no_std]
#![no_main]

mod floor;
mod flow;
mod forward;
mod icmp;
mod maps;
mod parse;
mod rewrite;
mod verdict;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use weir_common::{
    Stat,
    flow::{FlowKey, NatReturn},
    l4::{ForwardMode, VipInfo},
};

use crate::{
    forward::{Hop, Route},
    maps::{WEIR_NAT_RETURN, WEIR_VIPS},
    parse::{Packet, Parsed},
    rewrite::End,
};

#[xdp]
pub fn weir_xdp(ctx: XdpContext) -> u32 {
    match try_weir_xdp(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_weir_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = match parse::parse(ctx) {
        Parsed::NotIp => verdict::pass(Stat::PassNotIp, len),
        Parsed::Malformed => verdict::pass(Stat::PassMalformed, len),
        Parsed::OtherProtocol => verdict::pass(Stat::PassNotVip, len),
        Parsed::Unbalanced(packet, reason) => {
            // SAFETY (all map reads here): values are copied out before the next helper call.
            if unsafe { WEIR_VIPS.get(packet.vip_address_key()) }.is_some() {
                verdict::drop(reason, len)
            } else {
                verdict::pass(Stat::PassNotVip, len)
            }
        }
        Parsed::Icmp(packet) => icmp::handle(ctx, &packet, len),
        Parsed::Transport(packet) => {
            if let Some(vip) = unsafe { WEIR_VIPS.get(packet.vip_key()) }.copied() {
                balance(ctx, &packet, &vip, len)
            } else if let Some(nat) = unsafe { WEIR_NAT_RETURN.get(packet.flow_key()) }.copied() {
                nat_return(ctx, &packet, &nat, len)
            } else {
                verdict::pass(Stat::PassNotVip, len)
            }
        }
    };
    Ok(verdict)
}

/// Client → VIP: pin the flow to a server and send the packet there.
#[inline(always)]
fn balance(ctx: &XdpContext, packet: &Packet, vip: &VipInfo, len: u64) -> u32 {
    let nat = vip.mode == ForwardMode::Nat as u8;
    if !nat && vip.mode != ForwardMode::Dsr as u8 {
        return verdict::drop(Stat::DropUnsupportedMode, len);
    }
    let key = packet.flow_key();
    let Some(pinned) = flow::pin(vip, packet, &key) else {
        return verdict::drop(Stat::DropNoServer, len);
    };
    let Some(server) = maps::server(pinned.server) else {
        return verdict::drop(Stat::DropNoServer, len);
    };
    maps::count_traffic(vip.id, pinned.server, len, pinned.new_flow);
    if !nat {
        return forward::to_next_hop(
            ctx,
            packet,
            Route {
                src: &packet.src,
                dst: &server.addr,
                hop: Hop::Bridged,
                server: Some(pinned.server),
            },
            Stat::ForwardDsr,
            len,
        );
    }
    if pinned.refreshed {
        // The reply direction, so the server's answers can be turned back into the VIP's.
        let reply = FlowKey {
            src: server.addr,
            src_port: server.port,
            ..key.reversed()
        };
        let nat = NatReturn {
            vip: packet.dst,
            vip_port: packet.dst_port,
            _pad: 0,
            server: pinned.server,
        };
        let _ = WEIR_NAT_RETURN.insert(reply, nat, 0);
    }
    nat_send(
        ctx,
        packet,
        End::Destination,
        NatTarget {
            addr: &server.addr,
            port: server.port,
            server: Some(pinned.server),
        },
        Stat::ForwardNat,
        len,
    )
}

/// Server → client in NAT mode: restore the VIP as the source and send the reply on.
#[inline(always)]
fn nat_return(ctx: &XdpContext, packet: &Packet, nat: &NatReturn, len: u64) -> u32 {
    // The client → VIP direction of this reply's flow.
    let forward = FlowKey {
        dst: nat.vip,
        dst_port: nat.vip_port,
        ..packet.flow_key().reversed()
    };
    if !flow::owns_reply(&forward, nat.server, packet) {
        // The entry outlived its flow: forget it, so the rest of this connection (one that
        // never came through the VIP) no longer matches either.
        let _ = WEIR_NAT_RETURN.remove(packet.flow_key());
        return verdict::pass(Stat::PassStaleReturn, len);
    }
    if flow::ends_flow(packet) {
        flow::mark_closing(&forward);
    }
    nat_send(
        ctx,
        packet,
        End::Source,
        NatTarget {
            addr: &nat.vip,
            port: nat.vip_port,
            server: None,
        },
        Stat::ReturnNat,
        len,
    )
}

/// What a NAT rewrite writes into one end of a packet.
struct NatTarget<'a> {
    addr: &'a [u32; 4],
    port: u16,
    /// The server `addr` is, when the packet goes to one (its next hop may be cached).
    server: Option<u32>,
}

/// NAT's last steps in both directions: refuse an expiring TTL, rewrite `end` of the packet to
/// the target, route it as a router would, counted under `stat` when it leaves.
#[inline(always)]
fn nat_send(
    ctx: &XdpContext,
    packet: &Packet,
    end: End,
    target: NatTarget,
    stat: Stat,
    len: u64,
) -> u32 {
    if packet.ttl <= 1 {
        return verdict::drop(Stat::DropTtlExceeded, len);
    }
    if rewrite::endpoint(ctx, packet, end, target.addr, target.port).is_none() {
        return verdict::drop(Stat::DropMalformed, len);
    }
    let (src, dst) = match end {
        End::Destination => (&packet.src, target.addr),
        End::Source => (target.addr, &packet.dst),
    };
    let route = Route {
        src,
        dst,
        hop: Hop::Routed,
        server: target.server,
    };
    forward::to_next_hop(ctx, packet, route, stat, len)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
