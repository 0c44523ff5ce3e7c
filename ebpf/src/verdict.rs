//! The program's exits: every packet leaves through one of these, counted once under the
//! reason for its verdict.

use aya_ebpf::bindings::xdp_action;
use weir_common::Stat;

use crate::maps;

/// Hands the packet to the kernel stack.
#[inline(always)]
pub fn pass(stat: Stat, len: u64) -> u32 {
    count_as(stat, len, xdp_action::XDP_PASS)
}

/// Drops the packet.
#[inline(always)]
pub fn drop(stat: Stat, len: u64) -> u32 {
    count_as(stat, len, xdp_action::XDP_DROP)
}

/// Counts the packet under `stat` and returns `action`.
#[inline(always)]
pub fn count_as(stat: Stat, len: u64, action: u32) -> u32 {
    maps::count(stat, len);
    action
}
