//! Flow identities as the paper names them: a connection (protocol and 4-tuple) and the
//! action a member asks its peers to take for it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Transport protocol of a connection; the wire carries the IANA protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP, IANA protocol 6.
    Tcp,
    /// UDP, IANA protocol 17.
    Udp,
}

impl Protocol {
    /// The IANA protocol number carried in byte 2 of INSTALL/REMOVE.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The protocol for an IANA number, if the cluster protocol knows it.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Lower-case name used in logs, JSON and the admin API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" | "6" => Ok(Protocol::Tcp),
            "udp" | "17" => Ok(Protocol::Udp),
            other => Err(format!("unknown protocol {other:?} (expected tcp or udp)")),
        }
    }
}

/// What peers do with packets of a connection (paper Table 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Forward the connection's packets to the originating member in IP-in-IP.
    Forward,
    /// Let the connection's packets pass untouched.
    Bypass,
}

impl Action {
    /// The action code carried in byte 1 of INSTALL/REMOVE.
    pub const fn code(self) -> u8 {
        match self {
            Action::Forward => 1,
            Action::Bypass => 2,
        }
    }

    /// The action for a wire code.
    pub const fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Action::Forward),
            2 => Some(Action::Bypass),
            _ => None,
        }
    }

    /// Lower-case name used in logs, JSON and the admin API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Forward => "forward",
            Action::Bypass => "bypass",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "forward" => Ok(Action::Forward),
            "bypass" => Ok(Action::Bypass),
            other => Err(format!("unknown action {other:?} (expected forward or bypass)")),
        }
    }
}

/// Error for a connection whose two endpoints are of different address families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("source and destination of a connection must both be IPv4 or both IPv6")]
pub struct MixedFamilies;

/// One TCP or UDP connection: protocol and the 4-tuple as its originator saw it
/// (paper: `<source-IP, source-Port, destination-IP, destination-Port>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Connection {
    protocol: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
}

impl Connection {
    /// A connection; both endpoints must be of one address family.
    pub fn new(protocol: Protocol, src: SocketAddr, dst: SocketAddr) -> Result<Self, MixedFamilies> {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(MixedFamilies);
        }
        Ok(Connection { protocol, src, dst })
    }

    /// The transport protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The originator's source endpoint.
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    /// The originator's destination endpoint.
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// True for an IPv4 connection.
    pub fn is_ipv4(&self) -> bool {
        self.src.is_ipv4()
    }

    /// The same connection seen from the other direction.
    pub fn reversed(&self) -> Self {
        Connection { protocol: self.protocol, src: self.dst, dst: self.src }
    }

    /// True when either endpoint has this address.
    pub fn involves(&self, ip: IpAddr) -> bool {
        self.src.ip() == ip || self.dst.ip() == ip
    }
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.protocol, self.src, self.dst)
    }
}
