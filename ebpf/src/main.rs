//! weir's entry points: the L4 balancer in XDP and its NAT return path at TC ingress.
//!
//! The XDP program reads top to bottom: parse → VIP lookup → flow lookup or Maglev pick (and
//! record) → rewrite → forward. Packets that are not L4 VIP traffic — the host's own, L7 VIPs,
//! ARP — are passed to the kernel untouched. Replies from NAT servers are passed up too, to the
//! TC program, which rewrites them back to their VIP once the kernel's GRO has merged them
//! (`nat_return`). Every packet is counted once under the reason for its verdict
//! (`weir_common::Stat`). The edge policies (fragments, options, ICMP) are in
//! `docs/datapath.md`.
#![no_std]
#![no_main]

mod clock;
mod flood;
mod floor;
mod flow;
mod forward;
mod icmp;
mod maps;
mod nat_return;
mod parse;
mod rewrite;
mod source;
mod verdict;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use weir_common::{
    Stat,
    flow::{FlowKey, NatReturn},
    l4::{FAMILY_IPV4, ForwardMode, VipInfo},
};

use crate::{
    forward::{Hop, Route},
    maps::{WEIR_NAT_RETURN, WEIR_VIPS},
    parse::{Packet, Parsed},
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
        Parsed::Icmp(packet) => icmp::handle(ctx, &packet, len, clock::now_ns()),
        Parsed::Transport(packet) => {
            if let Some(vip) = maps::vip(&packet.vip_key()) {
                balance(ctx, &packet, &vip, len)
            } else if unsafe { WEIR_NAT_RETURN.get(packet.flow_key()) }.is_some()
                || (flow::may_answer_embryonic(&packet)
                    && flow::embryonic_reply(&packet, clock::now_ns()).is_some())
            {
                // A NAT server's reply: the TC program rewrites and counts it (`nat_return`).
                xdp_action::XDP_PASS
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
    if packet.family == FAMILY_IPV4 && !parse::ipv4_checksum_ok(ctx) {
        return verdict::drop(Stat::DropBadChecksum, len);
    }
    let now = clock::now_ns();
    let key = packet.flow_key();
    let pinned = match flow::pin(vip, packet, &key, now) {
        Ok(pinned) => pinned,
        Err(stat) => return verdict::drop(stat, len),
    };
    let server = pinned.info;
    maps::count_traffic(pinned.server, len, pinned.new_flow);
    if !nat {
        return forward::to_next_hop(
            ctx,
            packet,
            Route {
                src: &packet.src,
                dst: &server.addr,
                hop: Hop::Bridged,
                server: Some(pinned.server),
                now,
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
            generation: server.generation() as u16,
            server: pinned.server,
        };
        let _ = WEIR_NAT_RETURN.insert(reply, nat, 0);
    }
    if packet.ttl <= 1 {
        return verdict::drop(Stat::DropTtlExceeded, len);
    }
    if rewrite::destination(ctx, packet, &server.addr, server.port).is_none() {
        return verdict::drop(Stat::DropMalformed, len);
    }
    let route = Route {
        src: &packet.src,
        dst: &server.addr,
        hop: Hop::Routed,
        server: Some(pinned.server),
        now,
    };
    forward::to_next_hop(ctx, packet, route, Stat::ForwardNat, len)
}

/// Server → client in NAT mode, after GRO: the VIP restored as the source, the reply sent on.
#[classifier]
pub fn weir_tc_nat_return(ctx: TcContext) -> i32 {
    match nat_return::try_nat_return(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
