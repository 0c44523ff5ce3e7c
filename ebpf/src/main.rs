//! weir's XDP entry point.
//!
//! Reads top to bottom: parse the headers, classify the packet, count it under the reason for
//! its verdict, return the verdict. The skeleton classifies only (every packet is passed to the
//! kernel); VIP lookup, flow table, Maglev pick and rewrite slot in between parse and count.
#![no_std]
#![no_main]

mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use weir_common::Stat;

use crate::parse::{L3, Packet};

#[xdp]
pub fn weir_xdp(ctx: XdpContext) -> u32 {
    match try_weir_xdp(&ctx) {
        Ok(action) => action,
        // An error means the program could not decide safely: hand the packet to the kernel,
        // which is what a host without weir would do with it.
        Err(action) => action,
    }
}

fn try_weir_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let packet = match Packet::parse(ctx) {
        Ok(packet) => packet,
        Err(stat) => return Ok(pass(stat, len)),
    };
    let stat = match packet.l3 {
        L3::Other => Stat::PassNotIp,
        // No VIPs are served yet: every IP packet belongs to the host.
        L3::Ipv4 | L3::Ipv6 => Stat::PassNotVip,
    };
    Ok(pass(stat, len))
}

#[inline(always)]
fn pass(stat: Stat, len: u64) -> u32 {
    maps::count(stat, len);
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
