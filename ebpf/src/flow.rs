//! Flow-table policy: when an entry pins a packet to its server, when it is forgotten, when a
//! new flow is recorded.
//!
//! - An entry is used while its server exists (a removed server's flows re-pick) and the flow
//!   has not been idle longer than its protocol's timeout.
//! - A FIN or RST marks the flow closing: it still forwards stragglers, expires after the
//!   shorter closing timeout, and a SYN on it (the client reusing the port) picks afresh — so a
//!   reconnect never sticks to a server that has since been drained.
//! - Concurrent updates of one entry from two CPUs may race; both write the same kind of value
//!   (a timestamp, a flag), so the worst outcome is a refresh lost by a second.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use weir_common::{
    flow::{FLOW_CLOSING, FLOW_TOUCH_INTERVAL_NS, FlowKey, FlowState, flow_hash},
    l4::{DatapathSettings, HashFields, VipInfo},
};

use crate::{
    maps::{self, WEIR_FLOWS},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The server a packet goes to and how it got there.
pub struct Pinned {
    pub server: u32,
    /// The flow was picked from the Maglev table by this packet.
    pub new_flow: bool,
    /// The entry was written or refreshed (the NAT return entry is refreshed with it).
    pub refreshed: bool,
}

/// The server for `packet` of flow `key` to `vip`: its pinned server, or a fresh pick that is
/// then recorded. `None` when the flow is new and the VIP has no server for new flows.
#[inline(always)]
pub fn pin(vip: &VipInfo, packet: &Packet, key: &FlowKey) -> Option<Pinned> {
    let settings = maps::settings();
    let now = now_ns();
    if let Some(pinned) = established(packet, key, now, &settings) {
        return Some(pinned);
    }
    let server = pick(vip, key, &settings)?;
    let flags = if ends_flow(packet) { FLOW_CLOSING } else { 0 };
    let state = FlowState {
        server,
        flags,
        last_seen_ns: now,
    };
    // An insert into an LRU map only fails if the key is malformed; the packet still goes
    // out, and the next one of the flow tries again.
    let _ = WEIR_FLOWS.insert(key, state, 0);
    Some(Pinned {
        server,
        new_flow: true,
        refreshed: true,
    })
}

/// The flow's server without recording anything (for ICMP errors about a flow).
#[inline(always)]
pub fn peek(vip: &VipInfo, key: &FlowKey) -> Option<u32> {
    let settings = maps::settings();
    // SAFETY: read-only use of the value for this program run.
    if let Some(state) = unsafe { WEIR_FLOWS.get(key) }
        && maps::server(state.server).is_some()
    {
        return Some(state.server);
    }
    pick(vip, key, &settings)
}

/// Whether `packet`, from server `server`, answers the client→VIP flow `key`, so that it may
/// take the VIP's address. NAT return entries outlive their flows (they are only evicted),
/// so the flow decides: one that is there must be pinned to that server and not have
/// expired, and a SYN-ACK needs it not to be closing — a client reconnecting through the VIP
/// clears the closing mark with its SYN, so a SYN-ACK that meets one answers a connection
/// that never came through the VIP. A flow that is not there at all was evicted under
/// pressure (expired entries stay until evicted): its return entry is trusted, as before the
/// flow table was full, and the client's next packet records the flow again.
#[inline(always)]
pub fn owns_reply(key: &FlowKey, server: u32, packet: &Packet) -> bool {
    // SAFETY: read-only use of the value for this program run.
    let Some(state) = (unsafe { WEIR_FLOWS.get(key) }) else {
        return true;
    };
    let closing = state.flags & FLOW_CLOSING != 0;
    let syn_ack = packet.is_tcp() && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    state.server == server
        && !expired(state, packet, now_ns(), &maps::settings())
        && !(closing && syn_ack)
}

/// Marks the client→VIP flow `key` closing (a FIN or RST seen on the NAT return path).
#[inline(always)]
pub fn mark_closing(key: &FlowKey) {
    if let Some(state) = WEIR_FLOWS.get_ptr_mut(key) {
        // SAFETY: the pointer is from the map lookup and valid for this run; see module docs
        // on concurrent updates.
        unsafe {
            (*state).flags |= FLOW_CLOSING;
            (*state).last_seen_ns = now_ns();
        }
    }
}

/// Whether a TCP packet ends its flow (FIN or RST).
#[inline(always)]
pub fn ends_flow(packet: &Packet) -> bool {
    packet.is_tcp() && packet.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

#[inline(always)]
fn established(
    packet: &Packet,
    key: &FlowKey,
    now: u64,
    settings: &DatapathSettings,
) -> Option<Pinned> {
    let state = WEIR_FLOWS.get_ptr_mut(key)?;
    // SAFETY: the pointer is from the map lookup and valid for this run; see module docs on
    // concurrent updates.
    let state = unsafe { &mut *state };
    let closing = state.flags & FLOW_CLOSING != 0;
    let idle = now.saturating_sub(state.last_seen_ns);
    let syn = packet.is_tcp() && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if expired(state, packet, now, settings) || (closing && syn) {
        return None;
    }
    maps::server(state.server)?;
    let mut refreshed = false;
    if ends_flow(packet) {
        state.flags |= FLOW_CLOSING;
        state.last_seen_ns = now;
        refreshed = true;
    } else if idle > FLOW_TOUCH_INTERVAL_NS {
        state.last_seen_ns = now;
        refreshed = true;
    }
    Some(Pinned {
        server: state.server,
        new_flow: false,
        refreshed,
    })
}

/// Whether the flow `state` has been idle longer than the timeout of its kind (closing, or its
/// protocol's). A zero timeout means "never" (settings not written yet must not expire every
/// flow).
#[inline(always)]
fn expired(state: &FlowState, packet: &Packet, now: u64, settings: &DatapathSettings) -> bool {
    let timeout = if state.flags & FLOW_CLOSING != 0 {
        settings.closing_idle_ns
    } else if packet.is_tcp() {
        settings.tcp_idle_ns
    } else {
        settings.udp_idle_ns
    };
    timeout != 0 && now.saturating_sub(state.last_seen_ns) > timeout
}

#[inline(always)]
fn pick(vip: &VipInfo, key: &FlowKey, settings: &DatapathSettings) -> Option<u32> {
    let fields = if vip.hash_fields == HashFields::SourceIp as u8 {
        HashFields::SourceIp
    } else {
        HashFields::FiveTuple
    };
    maps::maglev_pick(vip.id, flow_hash(key, fields, settings.hash_seed))
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments; coarse time is enough for idle timeouts (±1 tick).
    unsafe { bpf_ktime_get_coarse_ns() }
}
