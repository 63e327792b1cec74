//! Packet I/O backends: NFQUEUE interception, a raw IP-in-IP socket, TUN injection.

pub mod nfqueue;
pub mod pcap;
pub mod raw;
pub mod tun;
