//! Flow-table policy: when an entry pins a packet to its server, when a flow is recorded,
//! when it is forgotten.
//!
//! A flow lives in one of two tables:
//! - **Embryonic** (`WEIR_EMBRYONIC`): its first packet picked a server from the Maglev table
//!   and nothing has proven the flow real yet. A spoofed SYN never gets further, so a flood of
//!   them churns only this table. Its entries expire after the short embryonic timeout and do
//!   not count as active flows of their server. An embryonic NAT flow's replies (the
//!   SYN-ACK) take their VIP from this entry: a new NAT flow costs one insert, as a DSR one.
//! - **Established** (`WEIR_FLOWS`, and for NAT `WEIR_NAT_RETURN`): the flow is promoted
//!   there by the packet that proves it — TCP: the client's ACK (the handshake's third
//!   packet); UDP: its second packet. A TCP packet that proves a flow neither table has (the
//!   flow was evicted, or moved here from another node) is recorded at once.
//!
//! Every insert into the flow table goes through the flood guard (`flood`): past its per-CPU
//! budget for the second, a flow stays embryonic — it is still forwarded, by its entry there
//! or, if that was churned out, by the Maglev table — and is promoted by a later packet.
//!
//! - An entry is used while its server exists (a removed server's flows re-pick) and the flow
//!   has not been idle longer than its timeout.
//! - A FIN or RST marks an established flow closing: it still forwards stragglers, expires
//!   after the shorter closing timeout, and a SYN on it (the client reusing the port) forgets
//!   it and starts an embryonic flow — so a reconnect never sticks to a server that has since
//!   been drained.
//! - Concurrent updates of one entry from two CPUs may race; both write the same kind of value
//!   (a timestamp, a flag), so the worst outcome is a refresh lost by a second.

use weir_common::{
    Stat,
    edge::{DEFAULT_EMBRYONIC_IDLE_NS, EdgeSettings, Event},
    flow::{
        Embryonic, EmbryonicKey, FLOW_CLOSING, FLOW_GENERATION_SHIFT, FLOW_TOUCH_INTERVAL_NS,
        FlowKey, FlowState, NatReturn, flow_hash,
    },
    l4::{HashFields, ServerInfo, VipInfo},
};

use crate::{
    flood,
    maps::{self, WEIR_EMBRYONIC, WEIR_FLOWS},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    source,
};

/// The server a packet goes to and how it got there.
pub struct Pinned {
    pub server: u32,
    /// The server's entry, read once for the whole packet.
    pub info: ServerInfo,
    /// The flow was picked from the Maglev table by this packet.
    pub new_flow: bool,
    /// The flow-table entry was written or refreshed (the NAT return entry is written with it).
    pub refreshed: bool,
}

/// The server for `packet` of flow `key` to `vip`: its pinned server (established or
/// embryonic), or a fresh pick that is then recorded. `Err` is the reason to drop the packet:
/// a new flow from a source that cannot be a client, or a VIP with no server for new flows.
#[inline(always)]
pub fn pin(vip: &VipInfo, packet: &Packet, key: &FlowKey, now: u64) -> Result<Pinned, Stat> {
    if let Some(pinned) = established(packet, key, now) {
        return Ok(pinned);
    }
    let edge = maps::edge_settings();
    let client = EmbryonicKey::client_of(key);
    if let Some((embryo, info)) = embryonic(&client, packet, now, &edge) {
        return Ok(grow(embryo, info, &client, packet, key, now, &edge));
    }
    source::check(packet)?;
    let server = pick(vip, key).ok_or(Stat::DropNoServer)?;
    let info = maps::server(server).ok_or(Stat::DropNoServer)?;
    let refreshed = if packet.is_tcp() && proves_flow(packet) {
        record(key, server, &info, packet, now, &edge)
    } else {
        false
    };
    if !refreshed && !(packet.is_tcp() && packet.tcp_flags & TCP_RST != 0) {
        conceive(&client, packet, server, &info, now);
    }
    Ok(Pinned {
        server,
        info,
        new_flow: true,
        refreshed,
    })
}

/// An embryonic flow's next packet: promoted to the flow table if it proves the flow (and the
/// flood guard allows), otherwise forwarded on the embryonic entry.
#[inline(always)]
fn grow(
    embryo: *mut Embryonic,
    info: ServerInfo,
    client: &EmbryonicKey,
    packet: &Packet,
    key: &FlowKey,
    now: u64,
    edge: &EdgeSettings,
) -> Pinned {
    // SAFETY: the pointer is from the map lookup and valid for this run; see module docs on
    // concurrent updates.
    let embryo = unsafe { &mut *embryo };
    let server = embryo.nat.server;
    // A UDP flow's second packet proves it; a TCP flow needs the handshake's ACK.
    let proves = !packet.is_tcp() || proves_flow(packet);
    if proves && record(key, server, &info, packet, now, edge) {
        let _ = WEIR_EMBRYONIC.remove(client);
        maps::count_event(Event::EmbryonicPromoted);
        return Pinned {
            server,
            info,
            new_flow: false,
            refreshed: true,
        };
    }
    if now.saturating_sub(embryo.last_seen_ns) > FLOW_TOUCH_INTERVAL_NS {
        embryo.last_seen_ns = now;
    }
    Pinned {
        server,
        info,
        new_flow: false,
        refreshed: false,
    }
}

/// Records the flow `key` → `server` in the flow table, if the flood guard allows.
#[inline(always)]
fn record(
    key: &FlowKey,
    server: u32,
    info: &ServerInfo,
    packet: &Packet,
    now: u64,
    edge: &EdgeSettings,
) -> bool {
    if !flood::admits(now, edge) {
        maps::count_event(Event::FloodDeferred);
        return false;
    }
    let closing = if ends_flow(packet) { FLOW_CLOSING } else { 0 };
    let state = FlowState {
        server,
        flags: closing | (info.generation() as u32) << FLOW_GENERATION_SHIFT,
        last_seen_ns: now,
    };
    // An insert into an LRU map only fails if the key is malformed; the packet still goes
    // out, and the next one of the flow tries again.
    let _ = WEIR_FLOWS.insert(key, state, 0);
    true
}

/// Records a flow's first packet as embryonic.
#[inline(always)]
fn conceive(client: &EmbryonicKey, packet: &Packet, server: u32, info: &ServerInfo, now: u64) {
    let embryo = Embryonic {
        nat: NatReturn {
            vip: packet.dst,
            vip_port: packet.dst_port,
            generation: info.generation() as u16,
            server,
        },
        last_seen_ns: now,
    };
    let _ = WEIR_EMBRYONIC.insert(client, embryo, 0);
    maps::count_event(Event::EmbryonicCreated);
}

/// The live embryonic entry of `packet`'s flow and its server's entry: same VIP and port (not
/// another flow of the same client port), not expired, its server still there.
#[inline(always)]
fn embryonic(
    client: &EmbryonicKey,
    packet: &Packet,
    now: u64,
    edge: &EdgeSettings,
) -> Option<(*mut Embryonic, ServerInfo)> {
    let embryo = WEIR_EMBRYONIC.get_ptr_mut(client)?;
    // SAFETY: as in `grow`; read only here.
    let value = unsafe { &*embryo };
    if value.nat.vip != packet.dst
        || value.nat.vip_port != packet.dst_port
        || embryo_expired(value, now, edge)
    {
        return None;
    }
    let info = maps::server(value.nat.server)?;
    // An entry of the id's previous holder is not this flow's.
    (info.generation() as u16 == value.nat.generation).then_some((embryo, info))
}

/// The VIP a server's reply belongs to when its flow is still embryonic (the SYN-ACK of a NAT
/// flow, or a UDP answer to a first datagram): the entry of the reply's client side, if it
/// picked the server that sent the reply.
#[inline(always)]
pub fn embryonic_reply(packet: &Packet, now: u64) -> Option<NatReturn> {
    let client = EmbryonicKey::client_of_reply(&packet.flow_key());
    // SAFETY: the value is copied out before the next helper call.
    let embryo = unsafe { WEIR_EMBRYONIC.get(client) }.copied()?;
    let server = maps::server(embryo.nat.server)?;
    let from_server = server.addr == packet.src
        && server.port == packet.src_port
        && server.generation() as u16 == embryo.nat.generation;
    (from_server && !embryo_expired(&embryo, now, &maps::edge_settings())).then_some(embryo.nat)
}

/// Whether `packet` is a reply an embryonic flow has in normal operation — a SYN-ACK, a RST
/// refusing the flow (a closed port), or UDP — so that host traffic (every other segment that
/// is neither VIP traffic nor an established NAT reply, the L7 proxy's included) does not pay
/// for an embryonic lookup in XDP: it cost "not a VIP" 41 ns (80 → 121 ns) when every segment
/// made it. The TC program looks for every reply; the one difference is in counting: a later
/// reply of a flow the flood guard kept embryonic (an ACK, data) is counted `pass_not_vip` by
/// XDP as well as `return_nat` by TC.
#[inline(always)]
pub fn may_answer_embryonic(packet: &Packet) -> bool {
    !packet.is_tcp()
        || packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        || packet.tcp_flags & TCP_RST != 0
}

#[inline(always)]
fn embryo_expired(embryo: &Embryonic, now: u64, edge: &EdgeSettings) -> bool {
    let timeout = if edge.embryonic_idle_ns != 0 {
        edge.embryonic_idle_ns
    } else {
        DEFAULT_EMBRYONIC_IDLE_NS
    };
    now.saturating_sub(embryo.last_seen_ns) > timeout
}

/// The flow's server without recording anything (for ICMP errors about a flow).
#[inline(always)]
pub fn peek(vip: &VipInfo, key: &FlowKey) -> Option<u32> {
    // SAFETY: read-only use of the value for this program run.
    if let Some(state) = unsafe { WEIR_FLOWS.get(key) }
        && maps::server(state.server).is_some_and(|s| s.generation() == state.generation())
    {
        return Some(state.server);
    }
    // SAFETY: as above.
    if let Some(embryo) = unsafe { WEIR_EMBRYONIC.get(EmbryonicKey::client_of(key)) }
        && embryo.nat.vip == key.dst
        && embryo.nat.vip_port == key.dst_port
        && maps::server(embryo.nat.server)
            .is_some_and(|s| s.generation() as u16 == embryo.nat.generation)
    {
        return Some(embryo.nat.server);
    }
    pick(vip, key)
}

/// Whether `packet`, a reply matching the NAT return entry `nat`, answers the client→VIP flow
/// `key`, so that it may take the VIP's address. It must come from the server the entry's id
/// names now, of the entry's generation. NAT return entries outlive their flows (they are only
/// evicted), so the flow decides: one that is there must be pinned to that server and not have
/// expired, and a SYN-ACK needs it not to be closing — a client reconnecting through the VIP
/// forgets a closing flow with its SYN, so a SYN-ACK that meets one answers a connection that
/// never came through the VIP. A flow that is not there at all was evicted under pressure
/// (expired entries stay until evicted): its return entry is trusted, as before the flow
/// table was full, and the client's next packet records the flow again.
#[inline(always)]
pub fn owns_reply(key: &FlowKey, nat: &NatReturn, packet: &Packet, now: u64) -> bool {
    let server = nat.server;
    // The reply must come from the server the id names now, and the entry be of its current
    // holder: an entry of the id's previous holder answers nothing.
    let Some(info) = maps::server(server) else {
        return false;
    };
    if info.addr != packet.src
        || info.port != packet.src_port
        || info.generation() as u16 != nat.generation
    {
        return false;
    }
    // SAFETY: read-only use of the value for this program run.
    let Some(state) = (unsafe { WEIR_FLOWS.get(key) }) else {
        return true;
    };
    let closing = state.flags & FLOW_CLOSING != 0;
    let syn_ack = packet.is_tcp() && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    state.server == server && !expired(state, packet, now) && !(closing && syn_ack)
}

/// Marks the client→VIP flow `key` closing (a FIN or RST seen on the NAT return path).
#[inline(always)]
pub fn mark_closing(key: &FlowKey, now: u64) {
    if let Some(state) = WEIR_FLOWS.get_ptr_mut(key) {
        // SAFETY: the pointer is from the map lookup and valid for this run; see module docs
        // on concurrent updates.
        unsafe {
            (*state).flags |= FLOW_CLOSING;
            (*state).last_seen_ns = now;
        }
    }
}

/// Whether a TCP packet ends its flow (FIN or RST).
#[inline(always)]
pub fn ends_flow(packet: &Packet) -> bool {
    packet.is_tcp() && packet.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// Whether a TCP packet shows the client completed a handshake: an ACK without SYN or RST.
/// (A blind spoofer can send one too; it then costs a flow-table entry within the flood
/// guard's budget, which is what the budget bounds.)
#[inline(always)]
fn proves_flow(packet: &Packet) -> bool {
    packet.tcp_flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK
}

#[inline(always)]
fn established(packet: &Packet, key: &FlowKey, now: u64) -> Option<Pinned> {
    let state = WEIR_FLOWS.get_ptr_mut(key)?;
    // SAFETY: the pointer is from the map lookup and valid for this run; see module docs on
    // concurrent updates.
    let state = unsafe { &mut *state };
    let closing = state.flags & FLOW_CLOSING != 0;
    let idle = now.saturating_sub(state.last_seen_ns);
    let syn = packet.is_tcp() && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if closing && syn {
        // The client reuses the port for a new connection: it starts embryonic, and the old
        // entry must not catch the new connection's ACK.
        let _ = WEIR_FLOWS.remove(key);
        return None;
    }
    if expired(state, packet, now) {
        return None;
    }
    let info = maps::server(state.server)?;
    if info.generation() != state.generation() {
        // Recorded for the id's previous holder: this flow picks afresh.
        return None;
    }
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
        info,
        new_flow: false,
        refreshed,
    })
}

/// Whether the flow `state` has been idle longer than the timeout of its kind (closing, or its
/// protocol's). A zero timeout means "never" (settings not written yet must not expire every
/// flow).
///
/// A timeout is never shorter than the touch interval (`DatapathSettings`), so a flow touched
/// within it has not expired and the settings are read only for one that was not: an
/// established hit, touched at most a second ago, reads neither the settings slot nor its
/// timeouts (6–9 ns per packet when it did: `docs/decisions/0021`).
#[inline(always)]
fn expired(state: &FlowState, packet: &Packet, now: u64) -> bool {
    let idle = now.saturating_sub(state.last_seen_ns);
    if idle <= FLOW_TOUCH_INTERVAL_NS {
        return false;
    }
    let settings = maps::settings();
    let timeout = if state.flags & FLOW_CLOSING != 0 {
        settings.closing_idle_ns
    } else if packet.is_tcp() {
        settings.tcp_idle_ns
    } else {
        settings.udp_idle_ns
    };
    timeout != 0 && idle > timeout
}

#[inline(always)]
fn pick(vip: &VipInfo, key: &FlowKey) -> Option<u32> {
    let fields = if vip.hash_fields == HashFields::SourceIp as u8 {
        HashFields::SourceIp
    } else {
        HashFields::FiveTuple
    };
    maps::maglev_pick(vip.id, flow_hash(key, fields, maps::settings().hash_seed))
}
