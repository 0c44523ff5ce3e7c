//! The maps the XDP program reads and writes. Userspace finds them by the names in
//! `weir_common::names`.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use weir_common::{Counter, Stat};

/// Per-CPU packet/byte counters, one slot per verdict reason (`weir_common::Stat`).
#[map(name = "WEIR_STATS")]
static WEIR_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Counts one packet of `len` bytes under `stat`.
#[inline(always)]
pub fn count(stat: Stat, len: u64) {
    // The slot is per CPU and XDP runs with preemption disabled, so plain adds are race-free.
    if let Some(counter) = WEIR_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer comes from the map lookup and stays valid for this program run.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len;
        }
    }
}
