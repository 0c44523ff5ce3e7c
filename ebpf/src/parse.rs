//! Header parsing with the bounds checks the verifier requires.
//!
//! Every read goes through [`ptr_at`], which proves to the verifier that `[offset, offset +
//! size_of::<T>())` lies inside the packet before handing out a pointer.

use aya_ebpf::programs::XdpContext;
use weir_common::Stat;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;

/// The network layer the packet carries.
pub enum L3 {
    Ipv4,
    Ipv6,
    Other,
}

/// What the parser learned about a packet.
pub struct Packet {
    pub l3: L3,
}

impl Packet {
    /// Parses Ethernet and the presence of a complete IP header.
    ///
    /// Returns `Err(Stat::PassMalformed)` when the packet is shorter than the headers it
    /// announces, so the caller can count it and never act on a truncated header.
    #[inline(always)]
    pub fn parse(ctx: &XdpContext) -> Result<Packet, Stat> {
        let ethertype: *const [u8; 2] = ptr_at(ctx, 12).ok_or(Stat::PassMalformed)?;
        // SAFETY: `ptr_at` checked that both bytes are inside the packet.
        let ethertype = u16::from_be_bytes(unsafe { *ethertype });
        let l3 = match ethertype {
            ETH_P_IP => {
                ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN).ok_or(Stat::PassMalformed)?;
                L3::Ipv4
            }
            ETH_P_IPV6 => {
                ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN).ok_or(Stat::PassMalformed)?;
                L3::Ipv6
            }
            _ => L3::Other,
        };
        Ok(Packet { l3 })
    }
}

/// A pointer to a `T` at `offset` bytes into the packet, or `None` if it would run past the end.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}
