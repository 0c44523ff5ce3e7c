//! Reference XDP programs the benchmarks hold `weir_xdp` against: trivial ones (the floor —
//! what running any XDP program at all costs on this kernel) and the least an L4 balancer does
//! for an established packet. The daemon never attaches them.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::{
    maps::{WEIR_FLOWS, WEIR_TX_PORTS},
    parse::{self, Parsed},
};

/// Passes every packet to the kernel: the floor for packets weir passes.
#[xdp]
pub fn weir_floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Sends every packet back out of the interface it came in on: the floor for packets weir
/// forwards.
#[xdp]
pub fn weir_floor_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Parses the packet and looks its flow up once in the flow table, nothing more: the least
/// any balancer with a flow table does for an established packet. Sends a hit back out and
/// passes the rest, so a benchmark can check it measured hits.
#[xdp]
pub fn weir_floor_flow_lookup(ctx: XdpContext) -> u32 {
    if flow_found(&ctx) {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_PASS
    }
}

/// The same, with a hit redirected through the device map as a two-armed balancer forwards
/// (to the interface it came in on: the map holds every attached interface, and the redirect's
/// work does not depend on which): what XDP_REDIRECT adds to the least a balancer does.
#[xdp]
pub fn weir_floor_flow_lookup_redirect(ctx: XdpContext) -> u32 {
    if !flow_found(&ctx) {
        return xdp_action::XDP_PASS;
    }
    WEIR_TX_PORTS
        .redirect(ctx.ingress_ifindex() as u32, xdp_action::XDP_DROP as u64)
        .unwrap_or(xdp_action::XDP_DROP)
}

/// Whether the packet is TCP/UDP in the plain shape and its flow is in the flow table: the
/// references' whole work.
#[inline(always)]
fn flow_found(ctx: &XdpContext) -> bool {
    match parse::parse(ctx) {
        // SAFETY: only whether the entry exists is read.
        Parsed::Transport(packet) => unsafe { WEIR_FLOWS.get(packet.flow_key()) }.is_some(),
        _ => false,
    }
}
