//! Trivial XDP programs: the floor the benchmarks hold `weir_xdp` against — what running any
//! XDP program at all costs on this kernel. The daemon never attaches them.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

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
