//! Datapath counters: why each packet got the verdict it got.
//!
//! The XDP program counts every packet exactly once, under the reason for its verdict, in a
//! per-CPU array so the hot path never contends on a shared cache line. Userspace sums the
//! CPUs when it reads.

/// Packets and bytes, as kept per CPU and summed in userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    /// Adds another counter (used to sum the per-CPU copies).
    pub fn merge(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

#[cfg(feature = "user")]
// SAFETY: `Counter` is `#[repr(C)]`, made of two u64 fields, with no padding and no invalid
// bit patterns.
unsafe impl aya::Pod for Counter {}

/// The reason a packet got its verdict; the index into the stats map.
///
/// New reasons are appended (never renumbered) so that a daemon reading maps pinned by an
/// older program still reads the right slots.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): handed to the kernel.
    PassNotIp = 0,
    /// IPv4 or IPv6, but not addressed to a VIP this balancer serves: handed to the kernel.
    PassNotVip = 1,
    /// Too short to hold the headers it claims: handed to the kernel, which drops or
    /// accounts for it as it would without weir. Never forwarded by weir.
    PassMalformed = 2,
}

impl Stat {
    /// Every reason, in index order (what userspace iterates to print the table).
    pub const ALL: [Stat; 3] = [Stat::PassNotIp, Stat::PassNotVip, Stat::PassMalformed];
    /// Number of slots the stats map must have.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable, machine-friendly name (used in `weirctl status --json` and metrics later).
    pub const fn name(self) -> &'static str {
        match self {
            Stat::PassNotIp => "pass_not_ip",
            Stat::PassNotVip => "pass_not_vip",
            Stat::PassMalformed => "pass_malformed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_indices_are_dense_and_in_order() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i, "{stat:?} is out of order");
        }
    }

    #[test]
    fn counter_layout_is_two_u64() {
        assert_eq!(core::mem::size_of::<Counter>(), 16);
        assert_eq!(core::mem::align_of::<Counter>(), 8);
    }
}
