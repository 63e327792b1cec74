//! Lifetime of local connections, for REMOVE_CONNECTION: a TCP connection ends after a FIN
//! in each direction or a RST, plus a linger for the last retransmissions; a UDP flow (or an
//! idle TCP one) ends after an idle timeout; a TCP connection that never heard back from its
//! destination (a SYN nobody answered) ends after the embryonic timeout.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cluster_proto::{Connection, Protocol};

use crate::hold::flow_key;
use crate::packet::{tcp_flags, FlowPacket};

struct State {
    /// The connection as installed (its originator's direction).
    installed: Connection,
    fin_from_src: bool,
    fin_from_dst: bool,
    heard_from_dst: bool,
    started: Instant,
    closing_since: Option<Instant>,
    last_seen: Instant,
}

/// Timers of the tracker.
#[derive(Clone, Copy, Debug)]
pub struct TrackConfig {
    /// Time kept after both FINs or a RST.
    pub linger: Duration,
    /// Idle timeout of UDP flows.
    pub udp_idle: Duration,
    /// Idle timeout of TCP connections that never close.
    pub tcp_idle: Duration,
    /// Lifetime of a TCP connection whose destination never answered.
    pub embryonic: Duration,
    /// Idle time after which a connection with a FIN in one direction only ends (the other
    /// FIN may have bypassed the queue when it was full: fail-open).
    pub half_closed_idle: Duration,
}

impl Default for TrackConfig {
    fn default() -> Self {
        TrackConfig {
            linger: Duration::from_secs(2),
            udp_idle: Duration::from_secs(30),
            tcp_idle: Duration::from_secs(2 * 3600),
            embryonic: Duration::from_secs(30),
            half_closed_idle: Duration::from_secs(30),
        }
    }
}

/// Watches packets of local connections and says when each has ended.
pub struct Tracker {
    config: TrackConfig,
    flows: HashMap<Connection, State>,
}

impl Tracker {
    /// An empty tracker.
    pub fn new(config: TrackConfig) -> Self {
        Tracker { config, flows: HashMap::new() }
    }

    /// Starts tracking a connection just installed locally.
    pub fn start(&mut self, now: Instant, installed: Connection) {
        self.flows.entry(flow_key(&installed)).or_insert(State {
            installed,
            fin_from_src: false,
            fin_from_dst: false,
            heard_from_dst: false,
            started: now,
            closing_since: None,
            last_seen: now,
        });
    }

    /// Tracks a connection registered again from the state file after a restart, as
    /// established (no embryonic timeout: it was answered before the restart): it ends on
    /// FIN/RST or after the idle timeouts, like any other.
    pub fn restore(&mut self, now: Instant, installed: Connection) {
        self.start(now, installed);
        if let Some(s) = self.flows.get_mut(&flow_key(&installed)) {
            s.heard_from_dst = true;
        }
    }

    /// Notes a packet of a tracked connection.
    pub fn observe(&mut self, now: Instant, p: &FlowPacket) {
        let Some(s) = self.flows.get_mut(&flow_key(&p.connection)) else { return };
        s.last_seen = now;
        if p.connection.src() != s.installed.src() {
            s.heard_from_dst = true;
        }
        if p.connection.protocol() != Protocol::Tcp {
            return;
        }
        if p.tcp_flags & tcp_flags::RST != 0 {
            s.closing_since.get_or_insert(now);
            return;
        }
        if p.tcp_flags & tcp_flags::FIN != 0 {
            if p.connection.src() == s.installed.src() {
                s.fin_from_src = true;
            } else {
                s.fin_from_dst = true;
            }
            if s.fin_from_src && s.fin_from_dst {
                s.closing_since.get_or_insert(now);
            }
        }
    }

    /// Connections that have ended, as installed; they are forgotten.
    pub fn ended(&mut self, now: Instant) -> Vec<Connection> {
        let c = self.config;
        let mut out = Vec::new();
        self.flows.retain(|_, s| {
            let done = match s.closing_since {
                Some(t) => now.duration_since(t) >= c.linger,
                None if s.installed.protocol() == Protocol::Udp => now.duration_since(s.last_seen) >= c.udp_idle,
                None if !s.heard_from_dst => now.duration_since(s.started) >= c.embryonic,
                None if s.fin_from_src || s.fin_from_dst => now.duration_since(s.last_seen) >= c.half_closed_idle,
                None => now.duration_since(s.last_seen) >= c.tcp_idle,
            };
            if done {
                out.push(s.installed);
            }
            !done
        });
        out
    }

    /// Stops tracking a connection (removed by other means).
    pub fn forget(&mut self, c: &Connection) {
        self.flows.remove(&flow_key(c));
    }

    /// Connections tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{parse, Parsed};
    use etherparse::PacketBuilder;

    fn seg(from_client: bool, fin: bool, rst: bool) -> FlowPacket {
        let (s, d, sp, dp) = if from_client {
            ([192, 0, 2, 1], [198, 51, 100, 1], 40000, 80)
        } else {
            ([198, 51, 100, 1], [192, 0, 2, 1], 80, 40000)
        };
        let mut b = PacketBuilder::ipv4(s, d, 64).tcp(sp, dp, 1, 100).ack(1);
        if fin {
            b = b.fin();
        }
        if rst {
            b = b.rst();
        }
        let mut v = Vec::new();
        b.write(&mut v, &[]).unwrap();
        match parse(&v).unwrap() {
            Parsed::Flow(f) => f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fin_both_ways_then_linger_rst_and_idle() {
        let t0 = Instant::now();
        let cfg = TrackConfig {
            linger: Duration::from_secs(2),
            udp_idle: Duration::from_secs(30),
            tcp_idle: Duration::from_secs(60),
            embryonic: Duration::from_secs(30),
            half_closed_idle: Duration::from_secs(20),
        };
        let mut tr = Tracker::new(cfg);
        let c = seg(true, false, false).connection;
        tr.start(t0, c);
        tr.observe(t0, &seg(true, true, false));
        assert!(tr.ended(t0 + Duration::from_secs(10)).is_empty(), "one FIN is not the end");
        let mut half = Tracker::new(cfg);
        half.start(t0, c);
        half.observe(t0, &seg(false, false, false));
        half.observe(t0, &seg(true, true, false));
        assert_eq!(half.ended(t0 + Duration::from_secs(20)), vec![c], "one FIN, then silence");
        let t1 = t0 + Duration::from_secs(11);
        tr.observe(t1, &seg(false, true, false));
        assert!(tr.ended(t1 + Duration::from_secs(1)).is_empty(), "linger");
        assert_eq!(tr.ended(t1 + Duration::from_secs(2)), vec![c]);
        assert!(tr.is_empty());

        tr.start(t0, c);
        tr.observe(t0, &seg(false, false, true));
        assert_eq!(tr.ended(t0 + Duration::from_secs(2)), vec![c], "RST ends it");
        tr.start(t0, c);
        assert_eq!(tr.ended(t0 + Duration::from_secs(30)), vec![c], "nobody answered the SYN");
        tr.start(t0, c);
        tr.observe(t0, &seg(false, false, false));
        assert!(tr.ended(t0 + Duration::from_secs(59)).is_empty(), "answered: not embryonic");
        assert_eq!(tr.ended(t0 + Duration::from_secs(60)), vec![c], "idle TCP");
    }
}
