//! The programs' one clock: read once per packet and handed down (flow idle times, the
//! next-hop cache, the flood window).
//!
//! It is `CLOCK_MONOTONIC_COARSE`, which the daemon reads too (flow census): a tick (1–4 ms)
//! is plenty for timeouts of seconds. That clock only moves on a tick, so each CPU keeps the
//! last value with the tick it was read at (`WEIR_CLOCK`) and calls the helper once per tick;
//! the tick itself comes from `bpf_jiffies64`, which the verifier inlines into one load.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::WEIR_CLOCK;

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds, as of this CPU's current tick.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helpers without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = WEIR_CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: per-CPU slot from the map lookup, valid for this run; XDP and TC programs run
    // with migration disabled and do not nest, so no other program touches it meanwhile.
    let cache = unsafe { &mut *cache };
    if cache.jiffies != jiffies {
        // SAFETY: as above.
        cache.ns = unsafe { bpf_ktime_get_coarse_ns() };
        cache.jiffies = jiffies;
    }
    cache.ns
}
