//! Every map the programs use, with what it holds. The daemon writes all of them except
//! the flow tables and counters, which the program writes. Userspace finds them by the names
//! in `weir_common::names`.

use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, BPF_F_NO_PREALLOC},
    btf_maps::{Array as InnerArray, ArrayOfMaps},
    macros::{btf_map, map},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use weir_common::{
    Counter, Stat, TrafficCounter,
    edge::{AddressKey, EdgeSettings, Event, FloodWindow},
    flow::{Embryonic, EmbryonicKey, FlowKey, FlowState, NatReturn},
    l4::{
        ClockCache, DatapathSettings, MAX_SERVERS, MAX_VIPS, NextHop, ServerInfo, VIP_INDEX_EMPTY,
        VIP_INDEX_SHARED, VIP_INDEX_SLOTS, VipInfo, VipKey, VipSlot,
    },
};

/// Flow-table size compiled in; the daemon sets the real size from its config at load time.
const DEFAULT_FLOW_ENTRIES: u32 = 1 << 20;
/// Embryonic-table size compiled in; likewise set by the daemon.
const DEFAULT_EMBRYONIC_ENTRIES: u32 = 1 << 16;
/// Most addresses the self-address set holds (VIPs and interface addresses).
const MAX_SELF_ADDRESSES: u32 = 1024;

/// Per-CPU packet/byte counters, one slot per verdict reason (`weir_common::Stat`).
#[map(name = "WEIR_STATS")]
static WEIR_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Stat::SLOTS, 0);

/// L4 services: (address, port, protocol) → VIP id and mode, plus address-level entries.
/// Not preallocated, so a replaced value is freed only after an RCU grace period and a
/// reader never sees a recycled element.
#[map(name = "WEIR_VIPS")]
pub static WEIR_VIPS: HashMap<VipKey, VipInfo> =
    HashMap::with_max_entries(2 * MAX_VIPS, BPF_F_NO_PREALLOC);

/// The VIP index: `VipKey::index_slot` → id + 1 of the one VIP there (see `VIP_INDEX_SLOTS`).
#[map(name = "WEIR_VIP_INDEX")]
static WEIR_VIP_INDEX: Array<u16> = Array::with_max_entries(VIP_INDEX_SLOTS, 0);

/// VIPs by id: the service key each id serves and its entry, to confirm a VIP index hit.
#[map(name = "WEIR_VIP_SLOTS")]
static WEIR_VIP_SLOTS: Array<VipSlot> = Array::with_max_entries(MAX_VIPS, 0);

/// The program's clock as last read, per CPU (one slot; `crate::clock`).
#[map(name = "WEIR_CLOCK")]
pub static WEIR_CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

/// Servers by id: where NAT rewrites to and whether the server still exists.
#[map(name = "WEIR_SERVERS")]
pub static WEIR_SERVERS: Array<ServerInfo> = Array::with_max_entries(MAX_SERVERS, 0);

/// Maglev tables by VIP id. Each inner array holds the table size in slot 0 and server ids in
/// slots 1..=size; the daemon builds a new inner map and swaps it in with one update of this
/// array, so a packet sees one whole table (see `docs/decisions/0004`). `BPF_F_INNER_MAP`
/// lets the inner arrays differ in size from this template.
#[btf_map(name = "WEIR_MAGLEV")]
pub static WEIR_MAGLEV: ArrayOfMaps<
    InnerArray<u32, 65538, { BPF_F_INNER_MAP as usize }>,
    { MAX_VIPS as usize },
> = ArrayOfMaps::new();

/// Established flows, client→VIP tuple → pinned server. Shared by all CPUs (replies and
/// retransmits may arrive on any CPU); LRU so a flood of new flows evicts the oldest.
#[map(name = "WEIR_FLOWS")]
pub static WEIR_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Flows not proven yet, client address and port → picked server and VIP (`crate::flow`).
/// A table of their own, so a flood of them never evicts an established flow.
#[map(name = "WEIR_EMBRYONIC")]
pub static WEIR_EMBRYONIC: LruHashMap<EmbryonicKey, Embryonic> =
    LruHashMap::with_max_entries(DEFAULT_EMBRYONIC_ENTRIES, 0);

/// The balancer's own addresses (VIPs, interface addresses): no new flow may come from them.
#[map(name = "WEIR_SELF_ADDRESSES")]
pub static WEIR_SELF_ADDRESSES: HashMap<AddressKey, u8> =
    HashMap::with_max_entries(MAX_SELF_ADDRESSES, 0);

/// Embryonic timeout and the flood guard's budget (one slot).
#[map(name = "WEIR_EDGE_SETTINGS")]
static WEIR_EDGE_SETTINGS: Array<EdgeSettings> = Array::with_max_entries(1, 0);

/// The flood guard's window, per CPU (one slot).
#[map(name = "WEIR_FLOOD_WINDOW")]
pub static WEIR_FLOOD_WINDOW: PerCpuArray<FloodWindow> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counts of flow events (`weir_common::edge::Event`).
#[map(name = "WEIR_EVENTS")]
static WEIR_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Event::SLOTS, 0);

/// NAT replies, server→client tuple → the VIP to restore as their source.
#[map(name = "WEIR_NAT_RETURN")]
pub static WEIR_NAT_RETURN: LruHashMap<FlowKey, NatReturn> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Next hop per server id, as the FIB last answered, per CPU (no cross-CPU writes or torn
/// reads); written by the program, see `NextHop` for when an entry is trusted.
#[map(name = "WEIR_NEXT_HOPS")]
pub static WEIR_NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_SERVERS, 0);

/// Hash seed and flow timeouts (one slot).
#[map(name = "WEIR_SETTINGS")]
pub static WEIR_SETTINGS: Array<DatapathSettings> = Array::with_max_entries(1, 0);

/// Interfaces the program may redirect to, by ifindex (the interfaces it is attached to).
#[map(name = "WEIR_TX_PORTS")]
pub static WEIR_TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// Traffic per VIP id of the servers that have left it; written by the daemon only (the
/// program counts per server, and a VIP's traffic is this plus its servers').
#[map(name = "WEIR_VIP_RETIRED")]
static WEIR_VIP_RETIRED: Array<TrafficCounter> = Array::with_max_entries(MAX_VIPS, 0);

/// Per-CPU traffic per server id (client→server direction).
#[map(name = "WEIR_SERVER_STATS")]
static WEIR_SERVER_STATS: PerCpuArray<TrafficCounter> =
    PerCpuArray::with_max_entries(MAX_SERVERS, 0);

/// Counts one packet of `len` bytes under `stat`.
#[inline(always)]
pub fn count(stat: Stat, len: u64) {
    count_frames(stat, 1, len);
}

/// Counts `frames` packets of `len` bytes in all under `stat` (a merged TC buffer stands for
/// as many wire frames as it will be split into).
#[inline(always)]
pub fn count_frames(stat: Stat, frames: u64, len: u64) {
    // The slot is per CPU and XDP and TC programs run with migration disabled, so plain
    // adds are race-free.
    if let Some(counter) = WEIR_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer comes from the map lookup and stays valid for this program run.
        unsafe {
            (*counter).packets += frames;
            (*counter).bytes += len;
        }
    }
}

/// Counts one packet for its server; `new_flow` when it opened a flow. Per server only: the
/// daemon sums a VIP's servers (the per-VIP count this replaced cost 7–10 ns per packet).
#[inline(always)]
pub fn count_traffic(server: u32, len: u64, new_flow: bool) {
    if let Some(counter) = WEIR_SERVER_STATS.get_ptr_mut(server) {
        // SAFETY: as in `count`.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len;
            (*counter).new_flows += new_flow as u64;
        }
    }
}

/// Counts one flow event.
#[inline(always)]
pub fn count_event(event: Event) {
    if let Some(counter) = WEIR_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: as in `count`.
        unsafe { *counter += 1 };
    }
}

/// The edge settings, or all zeros (defaults, no flood budget) before the daemon wrote them.
#[inline(always)]
pub fn edge_settings() -> EdgeSettings {
    WEIR_EDGE_SETTINGS.get(0).copied().unwrap_or_default()
}

/// The settings slot, or all zeros (no timeouts, seed 0) before the daemon wrote it.
#[inline(always)]
pub fn settings() -> DatapathSettings {
    WEIR_SETTINGS.get(0).copied().unwrap_or_default()
}

/// The VIP serving `key` (a service key, not an address-level one), if any: through the VIP
/// index, and the VIP map only for a slot several keys share.
#[inline(always)]
pub fn vip(key: &VipKey) -> Option<VipInfo> {
    match WEIR_VIP_INDEX.get(key.index_slot()).copied()? {
        VIP_INDEX_EMPTY => None,
        // SAFETY: the value is copied out before the next helper call.
        VIP_INDEX_SHARED => unsafe { WEIR_VIPS.get(key) }.copied(),
        id_plus_one => {
            let slot = WEIR_VIP_SLOTS.get(id_plus_one as u32 - 1)?;
            (slot.key == *key).then_some(slot.info)
        }
    }
}

/// The server with id `id` if it still exists.
#[inline(always)]
pub fn server(id: u32) -> Option<ServerInfo> {
    WEIR_SERVERS.get(id).copied().filter(ServerInfo::is_present)
}

/// Server id in slot `hash % size` of VIP `vip_id`'s Maglev table; `None` when the table is
/// empty or missing. Both reads go to the same inner map, so size and slot are consistent.
#[inline(always)]
pub fn maglev_pick(vip_id: u32, hash: u32) -> Option<u32> {
    let table = WEIR_MAGLEV.get(vip_id)?;
    let size = *table.get(0)?;
    if size == 0 {
        return None;
    }
    table.get(1 + hash % size).copied()
}
