//! Types shared by weir's eBPF programs (`ebpf` crate) and its userspace (`forwarder`).
//!
//! Everything here is `#[repr(C)]` and plain old data: the kernel maps store these bytes and
//! both sides read them, so there is exactly one definition of each layout. With the `user`
//! feature the types also implement [`aya::Pod`], which is what lets userspace put them in maps.
//!
//! Rules for this crate: `no_std`, no allocation, no padding holes left implicit (every field
//! is sized and ordered so the layout is the same on both sides), and every map name that
//! userspace looks up is a constant here rather than a string repeated in two crates.
//!
//! - [`l4`]: VIPs, servers, settings — what the daemon writes.
//! - [`flow`]: flow table and NAT return entries, and the flow hash.
//! - [`stats`]: counters and the verdict reasons.
//! - [`edge`]: the edge policy — self addresses, embryonic timeout, flood guard, flow events.
//! - [`csum`]: checksum arithmetic the rewrite uses (and the tests check).
#![cfg_attr(not(feature = "user"), no_std)]

pub mod csum;
pub mod edge;
pub mod flow;
pub mod l4;
pub mod stats;
#[cfg(feature = "user")]
pub mod user;

pub use stats::{Counter, Stat, TrafficCounter};

/// Names of the eBPF programs and maps, as the loader looks them up in the object file.
pub mod names {
    /// The XDP entry point: parse, look up, pick, rewrite, forward.
    pub const XDP_PROGRAM: &str = "weir_xdp";
    /// The NAT return path at TC ingress: server replies rewritten back to their VIP.
    pub const TC_NAT_RETURN_PROGRAM: &str = "weir_tc_nat_return";
    /// Trivial programs (`XDP_PASS`, `XDP_TX`): the benchmarks' floor, never attached.
    pub const FLOOR_PASS_PROGRAM: &str = "weir_floor_pass";
    pub const FLOOR_TX_PROGRAM: &str = "weir_floor_tx";
    /// Reference program: parse, one flow-table lookup, nothing else (benchmarks only).
    pub const FLOOR_FLOW_LOOKUP_PROGRAM: &str = "weir_floor_flow_lookup";
    /// The same, ending in a redirect through the device map: the reference for a two-armed
    /// balancer's hit (benchmarks only).
    pub const FLOOR_FLOW_LOOKUP_REDIRECT_PROGRAM: &str = "weir_floor_flow_lookup_redirect";
    /// Per-CPU array of [`crate::Counter`], indexed by [`crate::Stat`].
    pub const STATS_MAP: &str = "WEIR_STATS";
    /// Hash of [`crate::l4::VipKey`] → [`crate::l4::VipInfo`].
    pub const VIPS_MAP: &str = "WEIR_VIPS";
    /// Array of [`crate::l4::ServerInfo`] indexed by server id.
    pub const SERVERS_MAP: &str = "WEIR_SERVERS";
    /// Array of maps indexed by VIP id; each inner array is a Maglev table.
    pub const MAGLEV_MAP: &str = "WEIR_MAGLEV";
    /// LRU hash of client→VIP [`crate::flow::FlowKey`] → [`crate::flow::FlowState`].
    pub const FLOWS_MAP: &str = "WEIR_FLOWS";
    /// LRU hash of server→client [`crate::flow::FlowKey`] → [`crate::flow::NatReturn`].
    pub const NAT_RETURN_MAP: &str = "WEIR_NAT_RETURN";
    /// One-slot array of [`crate::l4::DatapathSettings`].
    pub const SETTINGS_MAP: &str = "WEIR_SETTINGS";
    /// Device map of the interfaces the program may redirect to, keyed by ifindex.
    pub const TX_PORTS_MAP: &str = "WEIR_TX_PORTS";
    /// [`crate::TrafficCounter`] per VIP id: what the VIP's servers carried before they left
    /// it (a VIP's traffic is that plus its current servers'; the daemon writes it).
    pub const VIP_RETIRED_TRAFFIC_MAP: &str = "WEIR_VIP_RETIRED";
    /// Per-CPU [`crate::TrafficCounter`] per server id.
    pub const SERVER_STATS_MAP: &str = "WEIR_SERVER_STATS";
    /// Per-CPU [`crate::l4::NextHop`] per server id: the program's next-hop cache.
    pub const NEXT_HOPS_MAP: &str = "WEIR_NEXT_HOPS";
    /// LRU hash of [`crate::flow::EmbryonicKey`] → [`crate::flow::Embryonic`]: flows not
    /// proven yet.
    pub const EMBRYONIC_MAP: &str = "WEIR_EMBRYONIC";
    /// Hash set of [`crate::edge::AddressKey`]: the balancer's VIPs and own addresses.
    pub const SELF_ADDRESSES_MAP: &str = "WEIR_SELF_ADDRESSES";
    /// One-slot array of [`crate::edge::EdgeSettings`].
    pub const EDGE_SETTINGS_MAP: &str = "WEIR_EDGE_SETTINGS";
    /// Per-CPU [`crate::edge::FloodWindow`] (one slot): the flood guard's count.
    pub const FLOOD_WINDOW_MAP: &str = "WEIR_FLOOD_WINDOW";
    /// Per-CPU `u64` per [`crate::edge::Event`].
    pub const EVENTS_MAP: &str = "WEIR_EVENTS";

    /// VIP index slot → the one VIP id whose service key hashes there, plus one.
    pub const VIP_INDEX_MAP: &str = "WEIR_VIP_INDEX";
    /// VIP id → its service key and entry (`crate::l4::VipSlot`).
    pub const VIP_SLOTS_MAP: &str = "WEIR_VIP_SLOTS";
    /// Per-CPU cache of the program's clock (`crate::l4::ClockCache`).
    pub const CLOCK_MAP: &str = "WEIR_CLOCK";

    /// Maps an earlier version pinned that this one no longer has: the daemon unpins them.
    /// `WEIR_VIP_STATS` counted every packet per VIP as well as per server; a VIP's traffic
    /// is now the sum of its servers' (see `VIP_RETIRED_TRAFFIC_MAP`).
    pub const RETIRED_MAPS: &[&str] = &["WEIR_VIP_STATS"];

    /// Every map of the object: the daemon pins them all, so a restarted daemon (or a newer
    /// program) takes over the very maps the running program uses.
    pub const ALL_MAPS: &[&str] = &[
        STATS_MAP,
        VIPS_MAP,
        SERVERS_MAP,
        MAGLEV_MAP,
        FLOWS_MAP,
        NAT_RETURN_MAP,
        SETTINGS_MAP,
        TX_PORTS_MAP,
        VIP_RETIRED_TRAFFIC_MAP,
        SERVER_STATS_MAP,
        NEXT_HOPS_MAP,
        EMBRYONIC_MAP,
        SELF_ADDRESSES_MAP,
        EDGE_SETTINGS_MAP,
        FLOOD_WINDOW_MAP,
        EVENTS_MAP,
        VIP_INDEX_MAP,
        VIP_SLOTS_MAP,
        CLOCK_MAP,
    ];
}

/// The size of every type a map holds, checked when this crate compiles: the kernel sees these
/// bytes, pinned maps keep them across upgrades, and the eBPF and userspace builds must agree.
/// A field added or reordered fails the build here instead of corrupting a pinned map.
mod layout {
    use core::mem::size_of;

    use crate::{
        Counter, TrafficCounter,
        edge::{AddressKey, EdgeSettings, FloodWindow},
        flow::{Embryonic, EmbryonicKey, FlowKey, FlowState, NatReturn},
        l4::{ClockCache, DatapathSettings, NextHop, ServerInfo, VipInfo, VipKey, VipSlot},
    };

    const _: () = assert!(size_of::<Counter>() == 16);
    const _: () = assert!(size_of::<TrafficCounter>() == 24);
    const _: () = assert!(size_of::<VipKey>() == 20);
    const _: () = assert!(size_of::<VipInfo>() == 8);
    const _: () = assert!(size_of::<ServerInfo>() == 20);
    const _: () = assert!(size_of::<NextHop>() == 48);
    const _: () = assert!(size_of::<DatapathSettings>() == 32);
    const _: () = assert!(size_of::<FlowKey>() == 40);
    const _: () = assert!(size_of::<FlowState>() == 16);
    const _: () = assert!(size_of::<NatReturn>() == 24);
    const _: () = assert!(size_of::<EmbryonicKey>() == 20);
    const _: () = assert!(size_of::<Embryonic>() == 32);
    const _: () = assert!(size_of::<AddressKey>() == 20);
    const _: () = assert!(size_of::<EdgeSettings>() == 16);
    const _: () = assert!(size_of::<FloodWindow>() == 16);
    const _: () = assert!(size_of::<VipSlot>() == 28);
    const _: () = assert!(size_of::<ClockCache>() == 16);
}
