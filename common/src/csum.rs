//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! The datapath rewrites addresses and ports and must fix the IP and L4 checksums without
//! summing the whole packet again. These are pure functions so the eBPF program and userspace
//! tests share one definition, and the tests check them against a full recomputation.
//!
//! Byte order: one's-complement sums are byte-order independent (swapping the bytes of every
//! word swaps the bytes of the sum), so every value here is the *raw* 16/32-bit word as it sits
//! in the packet, loaded in native order. No conversion is ever needed.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field after the covered data changed: `check` is the old field, `removed` and
/// `added` are the one's-complement sums (see [`sum_words`]) of the old and new values of the
/// changed words. RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub const fn update(check: u16, removed: u16, added: u16) -> u16 {
    !fold((!check) as u32 + (!removed) as u32 + added as u32)
}

/// One's-complement sum of the 16-bit halves of `words`.
#[inline(always)]
pub fn sum_words(words: &[u32]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    // An index loop (not an iterator) keeps the eBPF code a bounded, unrolled sequence.
    while i < words.len() {
        sum += (words[i] & 0xffff) + (words[i] >> 16);
        i += 1;
    }
    fold(sum)
}

/// The checksum after the 32-bit words `old` and the 16-bit word `old_extra` changed to `new`
/// and `new_extra` (`old` and `new` of one length): an address and a port, which a NAT rewrite
/// replaces together in the TCP/UDP checksum, or an IPv4 address and the TTL word in the
/// header checksum. An IPv4 address passes its one word.
///
/// RFC 1624 eqn. 3 with every changed word in one accumulator: each side summed and folded on
/// its own, then [`update`], is three dependent folds where this is one (at most 19 16-bit
/// terms, so the 32-bit sum cannot overflow).
#[inline(always)]
pub fn rewrite(check: u16, old: &[u32], old_extra: u16, new: &[u32], new_extra: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old_extra) as u32 + new_extra as u32;
    let mut i = 0;
    // An index loop, as in `sum_words`.
    while i < old.len() && i < new.len() {
        let removed = !old[i];
        sum += (removed & 0xffff) + (removed >> 16) + (new[i] & 0xffff) + (new[i] >> 16);
        i += 1;
    }
    !fold(sum)
}

/// The checksum after a 16-bit word changed from `old` to `new`.
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    update(check, old, new)
}

/// The checksum after a 32-bit word (an IPv4 address) changed from `old` to `new`.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    update(check, sum_words(&[old]), sum_words(&[new]))
}

/// The checksum after a 128-bit address changed from `old` to `new` (IPv6 pseudo-header).
#[inline(always)]
pub fn replace128(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    update(check, sum_words(old), sum_words(new))
}

/// The UDP checksum after an update: UDP sends a computed 0 as 0xffff, because 0 on the wire
/// means "no checksum" (IPv4) and is invalid (IPv6).
#[inline(always)]
pub const fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full RFC 1071 checksum over bytes, the reference the incremental forms must match.
    fn full(bytes: &[u8]) -> u16 {
        let mut sum = 0u32;
        for pair in bytes.chunks(2) {
            let hi = pair[0] as u32;
            let lo = pair.get(1).copied().unwrap_or(0) as u32;
            sum += (hi << 8) | lo;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn word(bytes: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    /// An IPv4 header (TTL 64, 198.18.0.1 → 198.18.100.10) with a valid checksum.
    fn ipv4_header() -> [u8; 20] {
        let mut header = [
            0x45, 0x00, 0x00, 0x3c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 198, 18, 0, 1,
            198, 18, 100, 10,
        ];
        let check = full(&header);
        header[10..12].copy_from_slice(&check.to_be_bytes());
        header
    }

    #[test]
    fn incremental_address_change_matches_full_recompute() {
        // Its destination rewritten.
        let mut header = ipv4_header();
        let old = word(&header, 16);
        header[16..20].copy_from_slice(&[198, 18, 1, 10]);
        let new = word(&header, 16);
        let stored = u16::from_ne_bytes([header[10], header[11]]);
        let updated = replace32(stored, old, new);
        header[10..12].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(full(&header), 0, "header no longer sums to zero");
    }

    #[test]
    fn rewrite_of_an_ipv4_address_and_ttl_matches_full_recompute() {
        let mut header = ipv4_header();
        let old_address = word(&header, 16);
        let old_ttl = u16::from_ne_bytes([header[8], header[9]]);
        header[8] -= 1;
        header[16..20].copy_from_slice(&[198, 18, 1, 10]);
        let new_ttl = u16::from_ne_bytes([header[8], header[9]]);
        let stored = u16::from_ne_bytes([header[10], header[11]]);
        let updated = rewrite(
            stored,
            &[old_address],
            old_ttl,
            &[word(&header, 16)],
            new_ttl,
        );
        header[10..12].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(full(&header), 0, "header no longer sums to zero");
    }

    #[test]
    fn one_rewrite_of_address_and_port_equals_two_replacements() {
        let addresses = [
            [0, 0, 0, 0],
            [0x0a64_12c6, 0, 0, 0],
            [u32::MAX, 1, 0xffff, 7],
        ];
        for (old, new) in addresses.iter().zip(addresses.iter().rev()) {
            for (check, old_port, new_port) in [(0x1234u16, 80u16, 8080u16), (0xffff, 0, 0xffff)] {
                let two = replace16(replace128(check, old, new), old_port, new_port);
                let one = rewrite(check, old, old_port, new, new_port);
                // 0x0000 and 0xffff are the same one's-complement value.
                assert_eq!(
                    fold(one as u32 + 1),
                    fold(two as u32 + 1),
                    "{old:?} → {new:?}"
                );
            }
        }
    }

    #[test]
    fn sixteen_bit_replace_handles_carry_and_all_ones() {
        for (old, new) in [(0x0000u16, 0xffffu16), (0xffff, 0x0000), (0x1234, 0xfedc)] {
            let mut data = [0xab, 0xcd, (old >> 8) as u8, old as u8, 0, 0];
            let check = full(&data);
            data[4..6].copy_from_slice(&check.to_be_bytes());
            let stored = u16::from_ne_bytes([data[4], data[5]]);
            let updated = replace16(stored, old.to_be(), new.to_be());
            data[2..4].copy_from_slice(&new.to_be_bytes());
            data[4..6].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(full(&data), 0, "{old:#x} -> {new:#x}");
        }
    }
}
