//! The programs' one clock: read once per packet and handed down, so a packet pays one
//! helper call for its timestamps (flow idle times, the next-hop cache, the flood window).

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: a tick (1–4 ms) is plenty for timeouts of
/// seconds, and it costs a fraction of the precise clock.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
