//! Pairs: the unit of affinity.
//!
//! Dictionaries are built per client/server *pair*, and a pair is `(client prefix, server
//! address)`: by default the client's /24 (IPv4) or /64 (IPv6) and the server's /32 or /128
//! ([`PairGranularity`]). A downstream proxy that spoofs its clients (paper 1.2, Fig. 2) opens
//! connections from many client addresses, yet all of them run over the one downstream/upstream
//! proxy chain whose dictionaries we want to reuse; a /24 groups one site's clients so they keep
//! one upstream, where a per-address key would scatter the site over every upstream. The server
//! stays exact because content (what the dictionary holds) is per server.

use std::fmt;
use std::net::IpAddr;

use cluster_proto::Connection;
use ipnet::IpNet;

/// How much of each address makes a pair (prefix lengths in bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairGranularity {
    /// IPv4 client prefix length (default 24: one site behind a spoofing downstream proxy).
    pub v4_client: u8,
    /// IPv4 server prefix length (default 32).
    pub v4_server: u8,
    /// IPv6 client prefix length (default 64).
    pub v6_client: u8,
    /// IPv6 server prefix length (default 128).
    pub v6_server: u8,
}

impl Default for PairGranularity {
    fn default() -> Self {
        PairGranularity { v4_client: 24, v4_server: 32, v6_client: 64, v6_server: 128 }
    }
}

/// A pair's fields do not fit: mixed address families or a prefix longer than the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidPair;

impl fmt::Display for InvalidPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a pair needs one address family and prefixes no longer than the address")
    }
}

impl std::error::Error for InvalidPair {}

/// The unit of affinity: a client prefix and a server prefix, host bits zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    client: IpNet,
    server: IpNet,
}

/// Longest rendezvous key of a pair (IPv6): family, two lengths, two addresses.
pub const PAIR_KEY_MAX: usize = 3 + 16 + 16;

/// `ip/len` with the host bits zeroed; `len` must fit the family.
fn prefix(ip: IpAddr, len: u8) -> Result<IpNet, InvalidPair> {
    IpNet::new(ip, len).map(|n| n.trunc()).map_err(|_| InvalidPair)
}

impl Pair {
    /// A pair of `client/client_prefix` and `server/server_prefix`; host bits are zeroed.
    pub fn new(client: IpAddr, client_prefix: u8, server: IpAddr, server_prefix: u8) -> Result<Self, InvalidPair> {
        if client.is_ipv4() != server.is_ipv4() {
            return Err(InvalidPair);
        }
        Ok(Pair { client: prefix(client, client_prefix)?, server: prefix(server, server_prefix)? })
    }

    /// The pair of a new flow: its source (the originator of the SYN) is the client.
    pub fn of(connection: &Connection, g: &PairGranularity) -> Self {
        let (c, s) = (connection.src().ip(), connection.dst().ip());
        let (cl, sl, max) = if c.is_ipv4() { (g.v4_client, g.v4_server, 32) } else { (g.v6_client, g.v6_server, 128) };
        // Clamped to the family's length, so neither can fail; a connection's two ends
        // share a family.
        let net = |ip, len: u8| prefix(ip, len.min(max)).unwrap_or_else(|_| IpNet::from(ip));
        Pair { client: net(c, cl), server: net(s, sl) }
    }

    /// The client prefix's address (host bits zero).
    pub fn client(&self) -> IpAddr {
        self.client.addr()
    }

    /// The client prefix length in bits.
    pub fn client_prefix(&self) -> u8 {
        self.client.prefix_len()
    }

    /// The server prefix's address (host bits zero).
    pub fn server(&self) -> IpAddr {
        self.server.addr()
    }

    /// The server prefix length in bits.
    pub fn server_prefix(&self) -> u8 {
        self.server.prefix_len()
    }

    /// True for an IPv4 pair.
    pub fn is_ipv4(&self) -> bool {
        matches!(self.client, IpNet::V4(_))
    }

    /// The bytes rendezvous hashing hashes for this pair, written into `buf`.
    pub fn key_into<'a>(&self, buf: &'a mut [u8; PAIR_KEY_MAX]) -> &'a [u8] {
        buf[0] = if self.is_ipv4() { 1 } else { 2 };
        buf[1] = self.client_prefix();
        buf[2] = self.server_prefix();
        let mut n = 3;
        for ip in [self.client(), self.server()] {
            match ip {
                IpAddr::V4(a) => {
                    buf[n..n + 4].copy_from_slice(&a.octets());
                    n += 4;
                }
                IpAddr::V6(a) => {
                    buf[n..n + 16].copy_from_slice(&a.octets());
                    n += 16;
                }
            }
        }
        &buf[..n]
    }

    /// The bytes rendezvous hashing hashes for this pair.
    pub fn key(&self) -> Vec<u8> {
        let mut buf = [0; PAIR_KEY_MAX];
        self.key_into(&mut buf).to_vec()
    }
}

impl fmt::Display for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.client, self.server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pair_masks_the_client_to_its_site() {
        let g = PairGranularity::default();
        let c = |src: &str| {
            Connection::new(cluster_proto::Protocol::Tcp, src.parse().unwrap(), "198.51.100.7:443".parse().unwrap())
                .unwrap()
        };
        let a = Pair::of(&c("192.0.2.10:1000"), &g);
        assert_eq!(a, Pair::of(&c("192.0.2.200:2000"), &g));
        assert_ne!(a, Pair::of(&c("192.0.3.10:1000"), &g));
        assert_eq!(a.to_string(), "192.0.2.0/24 -> 198.51.100.7/32");
        let v6 = Connection::new(
            cluster_proto::Protocol::Udp,
            "[2001:db8:1:2:3::9]:53".parse().unwrap(),
            "[2001:db8::1]:53".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(Pair::of(&v6, &g).to_string(), "2001:db8:1:2::/64 -> 2001:db8::1/128");
        assert_eq!(Pair::new(v4("192.0.2.1"), 33, v4("192.0.2.2"), 32), Err(InvalidPair));
        assert_eq!(Pair::new(v4("192.0.2.1"), 0, v4("192.0.2.2"), 0).unwrap().client(), v4("0.0.0.0"));
    }
}
