//! TCP MSS clamping on SYN and SYN-ACK, so that packets later encapsulated (20 or 40 more
//! bytes) still fit the path MTU without fragmentation.

use crate::encap::{OUTER_V4_LEN, OUTER_V6_LEN};

/// The largest MSS for a link of `mtu` bytes when packets may be encapsulated in an outer
/// header of the larger family used between members.
pub fn mss_limit(mtu: u16, inner_v6: bool, outer_v6: bool) -> u16 {
    let outer = if outer_v6 { OUTER_V6_LEN } else { OUTER_V4_LEN };
    let inner = if inner_v6 { 40 } else { 20 };
    mtu.saturating_sub((outer + inner + 20) as u16)
}

/// One's-complement incremental update of a checksum (RFC 1624, eqn. 3: HC' = ~(~HC + ~m +
/// m')) for a 16-bit field changing from `old` to `new`, on etherparse's one's-complement sum.
/// Incremental, so a segment that arrived with a bad checksum keeps a bad one.
fn adjust(check: u16, old: u16, new: u16) -> u16 {
    etherparse::checksum::Sum16BitWords::new()
        .add_2bytes((!check).to_be_bytes())
        .add_2bytes((!old).to_be_bytes())
        .add_2bytes(new.to_be_bytes())
        .ones_complement()
        .to_be()
}

/// Lowers the MSS option of the TCP segment at `l4` in `packet` to `limit` if it is larger.
/// Returns true when the packet was changed. Packets that are not SYN, have no MSS option or
/// are malformed are left alone.
pub fn clamp(packet: &mut [u8], l4: usize, limit: u16) -> bool {
    if packet.len() < l4 + 20 || packet[l4 + 13] & 0x02 == 0 {
        return false;
    }
    let doff = (packet[l4 + 12] >> 4) as usize * 4;
    if doff < 20 || packet.len() < l4 + doff {
        return false;
    }
    let mut at = l4 + 20;
    let end = l4 + doff;
    while at < end {
        match packet[at] {
            0 => return false,
            1 => at += 1,
            kind => {
                if at + 1 >= end {
                    return false;
                }
                let len = packet[at + 1] as usize;
                if len < 2 || at + len > end {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([packet[at + 2], packet[at + 3]]);
                    if old <= limit {
                        return false;
                    }
                    packet[at + 2..at + 4].copy_from_slice(&limit.to_be_bytes());
                    let check = u16::from_be_bytes([packet[l4 + 16], packet[l4 + 17]]);
                    packet[l4 + 16..l4 + 18].copy_from_slice(&adjust(check, old, limit).to_be_bytes());
                    return true;
                }
                at += len;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encap::checksum;
    use proptest::prelude::*;

    proptest! {
        /// The incremental update equals the checksum computed afresh over the changed words.
        #[test]
        fn incremental_update_matches_a_full_checksum(
            words in proptest::collection::vec(any::<u16>(), 2..64),
            at in any::<prop::sample::Index>(),
            new in any::<u16>(),
        ) {
            let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
            let i = at.index(words.len());
            let before = checksum(&bytes(&words));
            let mut changed = words.clone();
            let old = changed[i];
            changed[i] = new;
            let after = checksum(&bytes(&changed));
            // One's complement has two zeros (0x0000 and 0xffff); both verify alike.
            let got = adjust(before, old, new);
            prop_assert!(got == after || (got ^ after) == 0xffff && (got == 0 || after == 0), "{got:#x} vs {after:#x}");
        }
    }

    #[test]
    fn checksum_of_a_known_header() {
        // RFC 1071-style example: an IPv4 header whose checksum field is 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        let mut with = h;
        with[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(checksum(&with), 0);
        assert_eq!(checksum(&[0x01]), !0x0100, "an odd byte is padded with zero");
    }
}
