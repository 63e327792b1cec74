//! Who owns a new flow: the owner-policy trait and its basic implementations.
//!
//! Its own crate so that both sides of the trait can use it without linking each other: the
//! data plane (`handoff`, which re-exports it as `handoff::policy`) asks a policy for the
//! owner of every new flow, and the affinity engine (`dictionary-affinity`) is one, without
//! pulling in the packet path.

use cluster_proto::{Connection, MemberId};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The choice for a new flow, with why (counted in metrics, shown by `/flows`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The member that will own the flow.
    pub owner: MemberId,
    /// A short stable reason ("local", "rendezvous", ...).
    pub reason: &'static str,
}

/// Decides the owner of a new flow (a SYN, or a first UDP datagram). Every member must make
/// the same choice for the same inputs without talking to the others.
pub trait OwnerPolicy: Send + Sync {
    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;
    /// Picks one of `live` (which always contains `me`).
    fn choose(&self, connection: &Connection, live: &[MemberId], me: MemberId) -> Choice;
}

/// Every new flow stays with the member that sees it (the paper's behaviour).
pub struct LocalOnly;

impl OwnerPolicy for LocalOnly {
    fn name(&self) -> &'static str {
        "local"
    }
    fn choose(&self, _: &Connection, _: &[MemberId], me: MemberId) -> Choice {
        Choice { owner: me, reason: "local" }
    }
}

/// What rendezvous hashing hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RendezvousKey {
    /// Protocol and both endpoints (a 5-tuple hash): spreads flows evenly.
    Connection,
    /// Only the two addresses: every connection between a client and a server goes to the
    /// same member.
    AddressPair,
}

/// Highest-random-weight (rendezvous) hashing over the live members: stable, so a member
/// joining or leaving moves only the flows it gains or loses.
pub struct Rendezvous {
    /// What is hashed.
    pub key: RendezvousKey,
}

/// The bytes hashed for a connection, the same in either direction.
pub fn rendezvous_key(c: &Connection, key: RendezvousKey) -> Vec<u8> {
    let (a, b) = if c.src() <= c.dst() { (c.src(), c.dst()) } else { (c.dst(), c.src()) };
    let mut v = Vec::with_capacity(40);
    for ep in [a, b] {
        match ep.ip() {
            std::net::IpAddr::V4(x) => v.extend_from_slice(&x.octets()),
            std::net::IpAddr::V6(x) => v.extend_from_slice(&x.octets()),
        }
        if key == RendezvousKey::Connection {
            v.extend_from_slice(&ep.port().to_be_bytes());
        }
    }
    if key == RendezvousKey::Connection {
        v.push(c.protocol().number());
    }
    v
}

/// The member with the highest weight for `key` among `live`.
pub fn rendezvous(key: &[u8], live: &[MemberId]) -> Option<MemberId> {
    live.iter().copied().max_by_key(|m| (xxh3_64_with_seed(key, 0x6c62_0000 | m.0 as u64), m.0))
}

impl OwnerPolicy for Rendezvous {
    fn name(&self) -> &'static str {
        "rendezvous"
    }
    fn choose(&self, connection: &Connection, live: &[MemberId], me: MemberId) -> Choice {
        let owner = rendezvous(&rendezvous_key(connection, self.key), live).unwrap_or(me);
        Choice { owner, reason: "rendezvous" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_proto::Protocol;

    fn c(i: u16) -> Connection {
        Connection::new(Protocol::Tcp, format!("192.0.2.1:{i}").parse().unwrap(), "198.51.100.1:80".parse().unwrap())
            .unwrap()
    }

    #[test]
    fn rendezvous_is_symmetric_spread_and_stable() {
        let p = Rendezvous { key: RendezvousKey::Connection };
        let live: Vec<MemberId> = (0..4).map(MemberId).collect();
        let mut counts = [0usize; 4];
        let mut moved = 0;
        for i in 0..4000 {
            let conn = c(i);
            let o = p.choose(&conn, &live, MemberId(0)).owner;
            assert_eq!(o, p.choose(&conn.reversed(), &live, MemberId(2)).owner, "same for both directions and members");
            counts[o.0 as usize] += 1;
            // Member 3 leaves: only its flows move.
            let o2 = p.choose(&conn, &live[..3], MemberId(0)).owner;
            if o2 != o {
                assert_eq!(o, MemberId(3));
                moved += 1;
            }
        }
        assert!(counts.iter().all(|&n| (800..1200).contains(&n)), "{counts:?}");
        assert_eq!(moved, counts[3]);
    }

    #[test]
    fn address_pair_ignores_ports() {
        let p = Rendezvous { key: RendezvousKey::AddressPair };
        let live: Vec<MemberId> = (0..5).map(MemberId).collect();
        let first = p.choose(&c(1), &live, MemberId(0)).owner;
        assert!((2..500).all(|i| p.choose(&c(i), &live, MemberId(0)).owner == first));
    }
}
