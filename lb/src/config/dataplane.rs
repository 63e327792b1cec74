//! `[dataplane]`: what is intercepted and how flows are handed over.

use std::net::IpAddr;

use ipnet::IpNet;

use serde::{Deserialize, Serialize};

use super::{default_true, invalid, ConfigError};

/// `[dataplane]`: what is intercepted and how flows are handed over.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dataplane {
    /// NFQUEUE number the rules send packets to.
    #[serde(default = "default_queue")]
    pub queue: u16,
    /// TCP ports whose connections are intercepted (matched as source or destination).
    #[serde(default)]
    pub intercept_tcp_ports: Vec<u16>,
    /// UDP ports whose flows are intercepted.
    #[serde(default)]
    pub intercept_udp_ports: Vec<u16>,
    /// TUN device decapsulated packets are injected into.
    #[serde(default = "default_tun")]
    pub tun: String,
    /// Link MTU for MSS clamping of SYN and SYN-ACK; 0 disables clamping.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// How long partial flows are held, in milliseconds (the cluster's diameter).
    #[serde(default = "default_hold_ms")]
    pub hold_ms: u64,
    /// Hold queue bound in packets.
    #[serde(default = "default_hold_packets")]
    pub hold_packets: usize,
    /// Hold queue bound in bytes.
    #[serde(default = "default_hold_bytes")]
    pub hold_bytes: usize,
    /// Owner policy for new flows.
    #[serde(default)]
    pub policy: Policy,
    /// Cluster addresses of the members that may own new flows (default: every member), e.g.
    /// the upstream proxies behind load-balancing members.
    #[serde(default)]
    pub owners: Vec<IpAddr>,
    /// New connections with an endpoint in one of these networks are installed as BYPASS.
    #[serde(default)]
    pub bypass: Vec<BypassEntry>,
    /// Time a closed TCP connection is kept before REMOVE, in milliseconds.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Idle time after which a UDP flow is removed, in milliseconds.
    #[serde(default = "default_udp_idle_ms")]
    pub udp_idle_ms: u64,
    /// Idle time after which an established TCP connection is removed, in milliseconds.
    #[serde(default = "default_tcp_idle_ms")]
    pub tcp_idle_ms: u64,
    /// Time after which a TCP connection whose destination never answered is removed.
    #[serde(default = "default_embryonic_ms")]
    pub embryonic_ms: u64,
    /// Idle time after which a connection closed in one direction only is removed.
    #[serde(default = "default_half_closed_ms")]
    pub half_closed_ms: u64,
    /// NFQUEUE length in packets; beyond it packets bypass the data plane (fail-open).
    #[serde(default = "default_queue_len")]
    pub queue_len: u32,
    /// Receive buffer of the NFQUEUE socket in bytes: where queued packets wait for the
    /// daemon. When it is full, packets pass unseen (fail-open), so a burst of forwarded
    /// traffic must fit.
    #[serde(default = "default_queue_buffer_bytes")]
    pub queue_buffer_bytes: u64,
    /// Install and remove the netfilter rules (false: print them with `lb rules` and manage
    /// them yourself).
    #[serde(default = "default_true")]
    pub manage_rules: bool,
    /// Later packets of this member's own flows skip user space (an nftables set of flows,
    /// timed), except TCP SYN/FIN/RST and about one packet per flow direction every
    /// `fast_path_sample_ms`.
    #[serde(default = "default_true")]
    pub fast_path: bool,
    /// The packet mark bit the daemon's verdict sets for the fast path (one bit, at most
    /// 0x40000000); the fast path also uses the next higher bit. Both are reserved for lb.
    #[serde(default = "default_fast_path_mark")]
    pub fast_path_mark: u32,
    /// A fast-path flow still sends one packet to user space this often (idle timers).
    #[serde(default = "default_fast_path_sample_ms")]
    pub fast_path_sample_ms: u64,
}

impl Default for Dataplane {
    /// Every key at its default (no port intercepted yet, so not valid by itself).
    fn default() -> Self {
        toml::from_str("").expect("every [dataplane] key has a default")
    }
}

/// `[dataplane] policy`: who owns a new flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The member that sees the first packet (the paper's behaviour).
    #[default]
    Local,
    /// A hash of the 5-tuple over the live owners.
    Rendezvous,
    /// A hash of the client and server addresses: every connection of a pair to one member.
    PairRendezvous,
    /// The member with the best dictionary for the pair, within the load bound.
    Affinity,
}

impl Policy {
    /// The name in the file, logs and `check-config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Local => "local",
            Policy::Rendezvous => "rendezvous",
            Policy::PairRendezvous => "pair-rendezvous",
            Policy::Affinity => "affinity",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Dataplane {
    /// The fast path's two mark bits: the verdict bit (`fast_path_mark`, set by the daemon on
    /// packets of local flows) and the next higher one (set by the table on packets that skip
    /// the queue).
    pub fn fast_path_bits(&self) -> (u32, u32) {
        (self.fast_path_mark, self.fast_path_mark << 1)
    }
}

/// One bypass rule: `{ net = "203.0.113.0/24", port = 443 }` (port optional).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BypassEntry {
    /// Network in CIDR notation.
    pub net: String,
    /// Only this port, if set.
    pub port: Option<u16>,
}

fn default_queue() -> u16 {
    7
}

fn default_tun() -> String {
    "lbtun0".into()
}

fn default_mtu() -> u16 {
    1500
}

fn default_hold_ms() -> u64 {
    200
}

fn default_hold_packets() -> usize {
    65_536
}

fn default_hold_bytes() -> usize {
    64 << 20
}

fn default_linger_ms() -> u64 {
    2000
}

fn default_udp_idle_ms() -> u64 {
    30_000
}

fn default_tcp_idle_ms() -> u64 {
    2 * 3600 * 1000
}

fn default_embryonic_ms() -> u64 {
    30_000
}

fn default_half_closed_ms() -> u64 {
    30_000
}

fn default_queue_len() -> u32 {
    8192
}

/// 16 MiB: the kernel charges each queued packet's whole buffer (about 2.3 KiB for a
/// 1500-byte packet), so this holds some 7,000 packets, near the default queue length.
fn default_queue_buffer_bytes() -> u64 {
    16 << 20
}

fn default_fast_path_mark() -> u32 {
    0x4000_0000
}

fn default_fast_path_sample_ms() -> u64 {
    1000
}

impl Dataplane {
    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.intercept_tcp_ports.is_empty() && self.intercept_udp_ports.is_empty() {
            return Err(invalid("dataplane.intercept_tcp_ports", "intercept at least one TCP or UDP port"));
        }
        for (key, ports) in
            [("intercept_tcp_ports", &self.intercept_tcp_ports), ("intercept_udp_ports", &self.intercept_udp_ports)]
        {
            if ports.contains(&0) {
                return Err(invalid(format!("dataplane.{key}"), "port 0 cannot be intercepted"));
            }
        }
        if self.tun.is_empty()
            || self.tun.len() > 15
            || !self.tun.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "dataplane.tun",
                format!("{:?} is not a valid interface name (1-15 of A-Z, a-z, 0-9, -, _)", self.tun),
            ));
        }
        if self.mtu != 0 && self.mtu < 576 {
            return Err(invalid("dataplane.mtu", format!("must be 0 (no clamping) or at least 576, got {}", self.mtu)));
        }
        if !(1..=60_000).contains(&self.hold_ms) {
            return Err(invalid("dataplane.hold_ms", format!("must be between 1 and 60000, got {}", self.hold_ms)));
        }
        if self.hold_packets == 0 {
            return Err(invalid("dataplane.hold_packets", "must be at least 1"));
        }
        if self.hold_bytes < 65_536 {
            return Err(invalid("dataplane.hold_bytes", format!("must be at least 65536, got {}", self.hold_bytes)));
        }
        for (i, b) in self.bypass.iter().enumerate() {
            parse_net(&b.net).map_err(|e| invalid(format!("dataplane.bypass[{i}].net"), e))?;
        }
        if self.queue_buffer_bytes < 65_536 || self.queue_buffer_bytes > i32::MAX as u64 {
            return Err(invalid(
                "dataplane.queue_buffer_bytes",
                format!("must be between 65536 and 2147483647, got {}", self.queue_buffer_bytes),
            ));
        }
        for (key, v) in [
            ("linger_ms", self.linger_ms),
            ("udp_idle_ms", self.udp_idle_ms),
            ("tcp_idle_ms", self.tcp_idle_ms),
            ("embryonic_ms", self.embryonic_ms),
            ("half_closed_ms", self.half_closed_ms),
            ("queue_len", self.queue_len as u64),
            ("fast_path_mark", self.fast_path_mark as u64),
            ("fast_path_sample_ms", self.fast_path_sample_ms),
        ] {
            if v == 0 {
                return Err(invalid(format!("dataplane.{key}"), "must be at least 1"));
            }
        }
        if self.fast_path && !(self.fast_path_mark.is_power_of_two() && self.fast_path_mark <= 0x4000_0000) {
            return Err(invalid(
                "dataplane.fast_path_mark",
                format!(
                    "must be a single bit no higher than 0x40000000 (the next bit is used too), got {:#x}",
                    self.fast_path_mark
                ),
            ));
        }
        // Between samples the tracker sees nothing of a fast-path flow: the idle timers must
        // be well above the sample period, or live flows are removed as idle.
        let idle = self.udp_idle_ms.min(self.tcp_idle_ms).min(self.half_closed_ms);
        if self.fast_path && (self.fast_path_sample_ms > 60_000 || 2 * self.fast_path_sample_ms > idle) {
            return Err(invalid(
                "dataplane.fast_path_sample_ms",
                format!(
                    "must be at most 60000 and at most half the shortest idle timer (udp_idle_ms, tcp_idle_ms, \
                     half_closed_ms: {idle} ms), got {}",
                    self.fast_path_sample_ms
                ),
            ));
        }
        Ok(())
    }
}

/// Parses "192.0.2.0/24" or "2001:db8::/32" (a bare address is a host route; host bits are
/// dropped), saying what is wrong otherwise.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(a));
    }
    let (a, p) = s.split_once('/').unwrap_or((s, ""));
    let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not an address or network"))?;
    let len: u8 = p.parse().map_err(|_| format!("bad prefix in {s:?}"))?;
    IpNet::new(addr, len).map(|n| n.trunc()).map_err(|_| format!("prefix /{len} too long in {s:?}"))
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;

    #[test]
    fn bypass_networks_parse_into_one_cidr_type() {
        let n = |s: &str| parse_net(s).map(|n| n.to_string());
        assert_eq!(n("203.0.113.0/24").as_deref(), Ok("203.0.113.0/24"));
        assert_eq!(n("203.0.113.77/24").as_deref(), Ok("203.0.113.0/24"), "host bits dropped");
        assert_eq!(n("198.51.100.7").as_deref(), Ok("198.51.100.7/32"), "a bare address is a host route");
        assert_eq!(n("2001:db8::1/32").as_deref(), Ok("2001:db8::/32"));
        assert_eq!(n("2001:db8::1").as_deref(), Ok("2001:db8::1/128"));
        assert_eq!(n("203.0.113.0/33").unwrap_err(), "prefix /33 too long in \"203.0.113.0/33\"");
        assert_eq!(n("203.0.113.0/x").unwrap_err(), "bad prefix in \"203.0.113.0/x\"");
        assert_eq!(n("example.net").unwrap_err(), "\"example.net\" is not an address or network");
        let rule = handoff::classify::BypassRule { net: parse_net("203.0.113.0/24").unwrap(), port: Some(443) };
        let c = |dst: &str| {
            cluster_proto::Connection::new(
                cluster_proto::Protocol::Tcp,
                "192.0.2.1:40000".parse().unwrap(),
                dst.parse().unwrap(),
            )
            .unwrap()
        };
        assert!(rule.matches(&c("203.0.113.200:443")));
        assert!(!rule.matches(&c("203.0.113.200:80")) && !rule.matches(&c("203.0.114.1:443")));
    }

    #[test]
    fn the_sample_period_stays_well_below_the_idle_timers() {
        let dp = |extra: &str| -> Result<(), ConfigError> {
            let d: Dataplane = toml::from_str(&format!("intercept_tcp_ports = [80]\n{extra}")).unwrap();
            d.validate()
        };
        dp("").unwrap();
        dp("fast_path_sample_ms = 15000").unwrap();
        let e = dp("fast_path_sample_ms = 20000").unwrap_err().to_string();
        assert!(e.contains("dataplane.fast_path_sample_ms") && e.contains("30000 ms"), "{e}");
        let e = dp("half_closed_ms = 1500").unwrap_err().to_string();
        assert!(e.contains("fast_path_sample_ms"), "{e}");
        dp("half_closed_ms = 1500\nfast_path = false").unwrap();
        dp("half_closed_ms = 1500\nfast_path_sample_ms = 500").unwrap();
        assert!(dp("fast_path_sample_ms = 60001\nudp_idle_ms = 600000\nhalf_closed_ms = 600000").is_err());
        dp("fast_path_mark = 0x100").unwrap();
        for bad in ["0x300", "0x80000000"] {
            let e = dp(&format!("fast_path_mark = {bad}")).unwrap_err().to_string();
            assert!(e.contains("dataplane.fast_path_mark") && e.contains("single bit"), "{e}");
        }
    }
}
