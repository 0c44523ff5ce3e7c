//! The flood guard: a per-CPU budget of flows recorded in the flow table per second.
//!
//! Embryonic flows already keep spoofed SYNs out of the flow table. What could still fill it
//! is traffic that looks proven — ACKs from random sources (each would be recorded as a flow
//! picked up mid-stream) or UDP sources that send twice. Past the budget such flows stay
//! embryonic: they are forwarded all the same (by their embryonic entry, or by the Maglev
//! table when the flood churned that out, as Katran does under flood) and a later packet
//! promotes them once the CPU's window has room again. Established flows are never evicted
//! faster than the budget allows. Per CPU, so the hot path touches no shared cache line; the
//! budget is per CPU for that reason (docs/datapath.md gives the default and how to size it).

use weir_common::edge::{EdgeSettings, FLOOD_WINDOW_NS};

use crate::maps::WEIR_FLOOD_WINDOW;

/// Whether this CPU may record one more flow in the flow table now (and counts it if so).
#[inline(always)]
pub fn admits(now: u64, edge: &EdgeSettings) -> bool {
    let budget = edge.flows_per_cpu_per_sec;
    if budget == 0 {
        return true;
    }
    let Some(window) = WEIR_FLOOD_WINDOW.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot from the map lookup, valid for this run; XDP and TC programs run
    // with migration disabled, so no other program touches it meanwhile.
    let window = unsafe { &mut *window };
    if now.saturating_sub(window.started_ns) >= FLOOD_WINDOW_NS {
        window.started_ns = now;
        window.recorded = 0;
    }
    if window.recorded >= budget {
        return false;
    }
    window.recorded += 1;
    true
}
