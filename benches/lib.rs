//! Inputs shared by the benchmarks.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use cluster_proto::{Connection, Protocol};

/// The `i`-th of up to 2^32 distinct IPv4 TCP connections, spread over addresses and ports.
pub fn connection(i: u32) -> Connection {
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0xC612_0000 | (i >> 12))), 1024 + (i & 0xfff) as u16);
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, (i % 251) as u8)), 443);
    Connection::new(Protocol::Tcp, src, dst).expect("one family")
}
