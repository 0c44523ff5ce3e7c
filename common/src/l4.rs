//! L4 virtual services as the datapath sees them: VIPs, their servers, their Maglev tables.
//!
//! Addresses are four 32-bit words holding the address bytes exactly as they sit in the packet
//! (loaded in native order); IPv4 uses word 0 and leaves the others zero, and a `family` byte
//! keeps an IPv4 key from ever equalling an IPv6 one. Ports are likewise raw, i.e. in network
//! byte order. Nothing on the hot path converts byte order; userspace builds keys with the
//! helpers in [`crate::user`].

/// Address family tag in keys and values.
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag in keys and values.
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers weir balances or inspects.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Upper bound on L4 VIPs: the size of the per-VIP arrays (Maglev tables, counters).
pub const MAX_VIPS: u32 = 256;
/// Upper bound on servers across all VIPs: the size of the server array and its counters.
pub const MAX_SERVERS: u32 = 4096;
/// Largest Maglev table a VIP can have (slot 0 of a table holds its size; see [`VipInfo`]).
pub const MAX_TABLE_SIZE: u32 = 1 << 20;

/// Key of the VIP map: which service a packet is addressed to.
///
/// Besides one entry per (address, port, protocol), userspace inserts one *address-level*
/// entry per VIP address with `port == 0` and `protocol == 0`. The program looks that up only
/// for packets whose ports it cannot or will not read (fragments, IP options, IPv6 extension
/// headers, ICMP), to know whether such a packet is VIP traffic it must police or host traffic
/// it must leave alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
}

impl VipKey {
    /// The address-level entry for `addr` (see the type's docs).
    pub const fn address_only(addr: [u32; 4], family: u8) -> VipKey {
        VipKey {
            addr,
            port: 0,
            protocol: 0,
            family,
        }
    }

    /// Whether this is an address-level entry (see the type's docs) rather than a service's.
    #[inline(always)]
    pub const fn is_address_level(&self) -> bool {
        self.protocol == 0
    }

    /// The VIP index slot of this key: a multiplicative hash of its words. Part of the
    /// contract between the daemon, which fills the index, and the program, which reads it.
    #[inline(always)]
    pub const fn index_slot(&self) -> u32 {
        let word = self.addr[0]
            ^ self.addr[1]
            ^ self.addr[2]
            ^ self.addr[3]
            ^ ((self.port as u32) << 16 | (self.protocol as u32) << 8 | self.family as u32);
        word.wrapping_mul(0x9e37_79b1) >> 16
    }
}

/// Slots of the VIP index (`WEIR_VIP_INDEX`): a direct-mapped array in front of the VIP map,
/// by [`VipKey::index_slot`]. A slot holds [`VIP_INDEX_EMPTY`], [`VIP_INDEX_SHARED`], or the
/// id + 1 of the one VIP whose service key hashes there (whose [`VipSlot`] then confirms the
/// key). An array lookup is one load once the verifier inlines it; the hash lookup it spares
/// every TCP/UDP packet measured 28 ns. Address-level keys are not indexed.
pub const VIP_INDEX_SLOTS: u32 = 1 << 16;
/// No service key hashes to this slot: a packet whose key does is not VIP traffic.
pub const VIP_INDEX_EMPTY: u16 = 0;
/// More than one service key hashes to this slot (or did: the daemon leaves the mark until it
/// restarts): ask the VIP map.
pub const VIP_INDEX_SHARED: u16 = u16::MAX;

/// Value of the VIP slot array (`WEIR_VIP_SLOTS`), indexed by VIP id: the service key the id
/// serves and its entry, so that a VIP index hit is checked against the packet's key without
/// a hash lookup. An unused id holds all zeros (family 0 matches no packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    pub key: VipKey,
    pub info: VipInfo,
}

/// How a VIP's packets reach its servers.
///
/// Values are stable (they live in pinned maps). Tunnel modes (IPIP, GUE) would take the next
/// numbers; a program that meets a mode it does not know drops the packet and counts
/// `drop_unsupported_mode` rather than guessing.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMode {
    /// Destination address and port rewritten to the server; replies come back through weir,
    /// which restores the VIP as their source.
    Nat = 1,
    /// L2 direct server return: only the MACs change; the server owns the VIP on loopback and
    /// replies to the client directly.
    Dsr = 2,
}

/// Which fields of a new flow pick its slot in the Maglev table.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashFields {
    /// Source and destination address and port, and protocol: spreads connections evenly.
    FiveTuple = 0,
    /// Source address only: every flow from one client lands on the same server (session
    /// affinity without cookies; uneven behind large NATs).
    SourceIp = 1,
}

/// Value of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into the per-VIP arrays: Maglev tables and VIP counters.
    pub id: u32,
    /// A [`ForwardMode`] value.
    pub mode: u8,
    /// A [`HashFields`] value.
    pub hash_fields: u8,
    pub _pad: [u8; 2],
}

/// Flag in [`ServerInfo::flags`]: the slot holds a live server. Removing a server clears it,
/// which is what makes flows pinned to that server re-pick.
pub const SERVER_PRESENT: u8 = 1;
/// The rest of [`ServerInfo::flags`] is the slot's *generation*: the daemon steps it whenever
/// the id is given to a server anew (a new address, or after the slot was emptied), and every
/// flow records the generation of its server. A flow whose generation is not its server's
/// belongs to an earlier holder of the id and picks afresh: a reused id never inherits flows.
/// Seven bits, 1..=127 and round again (0 is what a datapath from before generations holds,
/// so its flows and servers still match).
pub const SERVER_GENERATION_SHIFT: u8 = 1;

/// Value of the server array, indexed by server id (what Maglev slots and flows hold).
///
/// A server that is draining or disabled stays present (its established flows keep flowing);
/// it is only left out of its VIP's Maglev table, so it gets no new flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerInfo {
    pub addr: [u32; 4],
    /// Network byte order. Used in NAT mode; in DSR mode the server listens on the VIP's port.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
}

impl ServerInfo {
    pub const fn is_present(&self) -> bool {
        self.flags & SERVER_PRESENT != 0
    }

    /// The slot's generation (see [`SERVER_GENERATION_SHIFT`]).
    pub const fn generation(&self) -> u8 {
        self.flags >> SERVER_GENERATION_SHIFT
    }

    /// The generation after `generation`: 1..=127, round again, never 0.
    pub const fn next_generation(generation: u8) -> u8 {
        if generation >= 127 { 1 } else { generation + 1 }
    }
}

/// How long the program trusts a cached next hop before asking the FIB again.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// A server's next hop as the kernel's FIB last gave it: the program's own per-CPU cache,
/// indexed by server id, so an established flow does not pay a FIB lookup per packet.
///
/// An entry is used only for the address it was looked up for (a reused server id never
/// inherits it), for [`NEXT_HOP_TTL_NS`] (a changed neighbour or route is seen within that),
/// and for IP packets no longer than `ok_len` (the FIB checks the egress MTU; a longer packet
/// asks it again).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub addr: [u32; 4],
    pub checked_ns: u64,
    pub ifindex: u32,
    /// Longest IP packet the FIB accepted for this hop since `checked_ns`.
    pub ok_len: u16,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub _pad: [u8; 6],
}

/// The program's clock, cached per CPU (`WEIR_CLOCK`): `bpf_ktime_get_coarse_ns` as last read
/// at the tick `jiffies`. The coarse clock only moves on a tick, so a packet whose tick is the
/// cached one reuses the cached time; `bpf_jiffies64`, which the verifier turns into one load,
/// tells. The helper call it saves measured 18 ns of a 146 ns DSR hit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockCache {
    pub jiffies: u64,
    pub ns: u64,
}

/// Settings the program reads for new flows and for flows idle longer than
/// [`FLOW_TOUCH_INTERVAL_NS`](crate::flow::FLOW_TOUCH_INTERVAL_NS) (a one-slot array).
///
/// Each timeout is 0 ("never") or at least the touch interval — the config gives whole
/// seconds — which the program relies on: a flow touched within the interval has not expired,
/// so an established hit does not read this slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathSettings {
    /// Seed of the flow hash. Nodes with the same seed (and the same pools) send a given flow
    /// to the same server, which is what lets several nodes share VIPs later.
    pub hash_seed: u32,
    pub _pad: u32,
    /// A TCP flow idle this long is forgotten: its next packet picks a server afresh.
    pub tcp_idle_ns: u64,
    /// A UDP flow idle this long is forgotten (UDP has no end-of-flow signal).
    pub udp_idle_ns: u64,
    /// A TCP flow that saw FIN or RST and then this long without packets is forgotten.
    pub closing_idle_ns: u64,
}
