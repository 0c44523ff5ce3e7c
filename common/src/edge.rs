//! The edge policy's shared types: what the program needs to refuse spoofed sources and to
//! keep a flood of new flows from evicting established ones.
//!
//! - [`AddressKey`]: the balancer's own addresses (its VIPs and its interfaces' addresses). A
//!   new flow whose source is one of them is spoofed: its server's answer would go back to
//!   the balancer or to the server itself (a reflection loop).
//! - [`EdgeSettings`]: the embryonic timeout and the flood guard's budget, from the config.
//! - [`FloodWindow`]: the guard's per-CPU count of flows recorded in the current second.
//! - [`Event`]: counters of what happened to flows (not verdicts: a packet's verdict is
//!   counted once under [`crate::Stat`]; these count flows being created, promoted, deferred).

/// Key of the self-address set: an address in the datapath's four-word form.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddressKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Settings of the edge policy (a one-slot array of its own, so that the settings map a
/// running datapath has pinned keeps its layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeSettings {
    /// An embryonic flow (first packet seen, not yet proven) idle this long is forgotten.
    /// Zero: the datapath default, [`DEFAULT_EMBRYONIC_IDLE_NS`].
    pub embryonic_idle_ns: u64,
    /// Flows one CPU may record in the flow table per second; past it, new flows stay
    /// embryonic until the next second. Zero: no limit.
    pub flows_per_cpu_per_sec: u32,
    pub _pad: u32,
}

/// The embryonic timeout the program uses before the daemon wrote [`EdgeSettings`].
pub const DEFAULT_EMBRYONIC_IDLE_NS: u64 = 5_000_000_000;

/// The flood guard's per-CPU window: how many flows this CPU recorded since `started_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodWindow {
    pub started_ns: u64,
    pub recorded: u32,
    pub _pad: u32,
}

/// Length of the flood guard's window.
pub const FLOOD_WINDOW_NS: u64 = 1_000_000_000;

macro_rules! events {
    ($($(#[$doc:meta])* $variant:ident = $index:literal => $name:literal,)+) => {
        /// Something that happened to a flow; the index into the per-CPU event counters.
        /// Appended, never renumbered (the counters are pinned).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Event {
            $($(#[$doc])* $variant = $index,)+
        }

        impl Event {
            /// Every event, in index order.
            pub const ALL: &'static [Event] = &[$(Event::$variant,)+];

            /// Stable, machine-friendly name (status JSON, metrics).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Event::$variant => $name,)+
                }
            }
        }
    };
}

events! {
    /// A flow's first packet picked a server and was recorded as embryonic.
    EmbryonicCreated = 0 => "embryonic_created",
    /// An embryonic flow proved itself (TCP: the handshake's ACK; UDP: a second packet) and
    /// moved to the flow table.
    EmbryonicPromoted = 1 => "embryonic_promoted",
    /// A flow that would have been recorded in the flow table stayed embryonic because its
    /// CPU's budget for this second was spent: the flood guard at work.
    FloodDeferred = 2 => "flood_deferred",
}

impl Event {
    /// Slots of the event map, with room for events appended later.
    pub const SLOTS: u32 = 16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_indices_are_dense_and_in_order() {
        for (i, event) in Event::ALL.iter().enumerate() {
            assert_eq!(*event as usize, i, "{event:?} is out of order");
        }
        assert!(Event::ALL.len() as u32 <= Event::SLOTS);
    }
}
