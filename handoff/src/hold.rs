//! The hold queue for partial flows (paper section 3): a SYN-ACK or a bare ACK that matches
//! no connection may belong to a flow whose INSTALL is still in transit, so it waits here
//! for at most the hold time (the cluster's diameter). A matching INSTALL releases it at
//! once; on expiry it is re-classified and dropped if still unknown.
//!
//! Bounded in packets and in bytes; on overflow the oldest packets are dropped. Every
//! outcome is counted.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use cluster_proto::Connection;

/// Outcome counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldStats {
    /// Packets taken in.
    pub held: u64,
    /// Released by a matching INSTALL.
    pub released: u64,
    /// Handed back for re-classification at the end of their hold time.
    pub expired: u64,
    /// Dropped to make room (oldest first).
    pub overflowed: u64,
}

struct Held<T> {
    key: Connection,
    deadline: Instant,
    len: usize,
    packet: T,
}

/// Bounded FIFO of held packets, indexed by flow.
///
/// Every packet gets a sequence number; the FIFO slot of sequence `s` is `s - head`, so a
/// release takes exactly its flow's packets without scanning the queue, and released slots
/// are reclaimed as the head moves past them.
pub struct HoldQueue<T> {
    hold_time: Duration,
    max_packets: usize,
    max_bytes: usize,
    fifo: VecDeque<Option<Held<T>>>,
    /// Sequence number of `fifo[0]`.
    head: u64,
    /// Sequence numbers of the live packets of each flow, oldest first.
    index: HashMap<Connection, Vec<u64>>,
    packets: usize,
    bytes: usize,
    stats: HoldStats,
}

/// Both directions of a connection map to one key.
pub fn flow_key(c: &Connection) -> Connection {
    if c.src() <= c.dst() {
        *c
    } else {
        c.reversed()
    }
}

impl<T> HoldQueue<T> {
    /// A queue holding packets for `hold_time`, at most `max_packets` and `max_bytes`.
    pub fn new(hold_time: Duration, max_packets: usize, max_bytes: usize) -> Self {
        HoldQueue {
            hold_time,
            max_packets: max_packets.max(1),
            max_bytes: max_bytes.max(1),
            fifo: VecDeque::new(),
            head: 0,
            index: HashMap::new(),
            packets: 0,
            bytes: 0,
            stats: HoldStats::default(),
        }
    }

    /// Holds `packet` (of `len` bytes) of `connection`; returns the packets dropped to make
    /// room, oldest first.
    pub fn push(&mut self, now: Instant, connection: &Connection, len: usize, packet: T) -> Vec<T> {
        let mut dropped = Vec::new();
        while self.packets > 0 && (self.packets + 1 > self.max_packets || self.bytes + len > self.max_bytes) {
            if let Some(h) = self.pop_front() {
                self.stats.overflowed += 1;
                dropped.push(h.packet);
            }
        }
        let key = flow_key(connection);
        let seq = self.head + self.fifo.len() as u64;
        self.index.entry(key).or_default().push(seq);
        self.packets += 1;
        self.bytes += len;
        self.stats.held += 1;
        self.fifo.push_back(Some(Held { key, deadline: now + self.hold_time, len, packet }));
        dropped
    }

    /// Drops released slots at the head.
    fn trim(&mut self) {
        while let Some(None) = self.fifo.front() {
            self.fifo.pop_front();
            self.head += 1;
        }
    }

    fn pop_front(&mut self) -> Option<Held<T>> {
        self.trim();
        let h = self.fifo.pop_front()??;
        let seq = self.head;
        self.head += 1;
        self.packets -= 1;
        self.bytes -= h.len;
        if let Some(seqs) = self.index.get_mut(&h.key) {
            seqs.retain(|&s| s != seq);
            if seqs.is_empty() {
                self.index.remove(&h.key);
            }
        }
        Some(h)
    }

    /// True when packets of this connection (either direction) are held.
    pub fn is_holding(&self, connection: &Connection) -> bool {
        !self.index.is_empty() && self.index.contains_key(&flow_key(connection))
    }

    /// Takes every held packet of `connection`, in arrival order (an INSTALL arrived).
    pub fn release(&mut self, connection: &Connection) -> Vec<T> {
        let Some(seqs) = self.index.remove(&flow_key(connection)) else { return Vec::new() };
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(h) = self.fifo.get_mut((seq - self.head) as usize).and_then(Option::take) {
                self.packets -= 1;
                self.bytes -= h.len;
                out.push(h.packet);
            }
        }
        self.stats.released += out.len() as u64;
        self.trim();
        out
    }

    /// Takes the packets whose hold time is over, oldest first, for re-classification.
    pub fn expired(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        loop {
            self.trim();
            match self.fifo.front() {
                Some(Some(h)) if h.deadline <= now => {
                    let h = self.pop_front().expect("front is live");
                    self.stats.expired += 1;
                    out.push(h.packet);
                }
                _ => return out,
            }
        }
    }

    /// When the oldest held packet expires.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.trim();
        self.fifo.front().and_then(|s| s.as_ref()).map(|h| h.deadline)
    }

    /// Packets held.
    pub fn len(&self) -> usize {
        self.packets
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Outcome counters.
    pub fn stats(&self) -> HoldStats {
        self.stats
    }

    /// Slots in the FIFO, live or released (for tests: released slots must not pile up).
    pub fn slots(&self) -> usize {
        self.fifo.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_proto::Protocol;

    fn c(i: u16) -> Connection {
        Connection::new(Protocol::Tcp, format!("198.51.100.1:{i}").parse().unwrap(), "192.0.2.1:80".parse().unwrap())
            .unwrap()
    }

    #[test]
    fn release_by_either_direction_in_order() {
        let t = Instant::now();
        let mut q = HoldQueue::new(Duration::from_millis(100), 10, 10_000);
        q.push(t, &c(1), 10, "a1");
        q.push(t, &c(2), 10, "b1");
        q.push(t, &c(1), 10, "a2");
        assert!(q.is_holding(&c(1).reversed()));
        assert_eq!(q.release(&c(1).reversed()), vec!["a1", "a2"]);
        assert!(!q.is_holding(&c(1)));
        assert_eq!((q.len(), q.bytes()), (1, 10));
        assert_eq!(q.release(&c(1)), Vec::<&str>::new());
        assert_eq!(q.stats(), HoldStats { held: 3, released: 2, expired: 0, overflowed: 0 });
    }

    #[test]
    fn expiry_and_overflow() {
        let t = Instant::now();
        let mut q = HoldQueue::new(Duration::from_millis(100), 3, 25);
        q.push(t, &c(1), 10, 1);
        q.push(t + Duration::from_millis(10), &c(2), 10, 2);
        // Bytes bound: 30 > 25, the oldest goes.
        assert_eq!(q.push(t + Duration::from_millis(20), &c(3), 10, 3), vec![1]);
        assert_eq!(q.next_deadline(), Some(t + Duration::from_millis(110)));
        assert_eq!(q.expired(t + Duration::from_millis(109)), Vec::<i32>::new());
        assert_eq!(q.expired(t + Duration::from_millis(115)), vec![2]);
        assert_eq!(q.stats().overflowed, 1);
        assert_eq!(q.stats().expired, 1);
        assert_eq!(q.len(), 1);
        // Packets bound.
        let mut q = HoldQueue::new(Duration::from_millis(100), 2, 1000);
        q.push(t, &c(1), 1, 1);
        q.push(t, &c(2), 1, 2);
        assert_eq!(q.push(t, &c(3), 1, 3), vec![1]);
        assert!(!q.is_holding(&c(1)));
    }

    #[test]
    fn released_slots_do_not_pile_up() {
        let t = Instant::now();
        let mut q = HoldQueue::new(Duration::from_secs(1), 100, 1 << 20);
        q.push(t, &c(0), 1, 0); // stays held throughout
        for i in 1..10_000u16 {
            q.push(t, &c(i), 1, i);
            assert_eq!(q.release(&c(i)), vec![i]);
        }
        assert_eq!(q.len(), 1);
        assert!(q.slots() <= 10_000, "bounded by what was pushed since the oldest live packet");
        assert_eq!(q.release(&c(0)), vec![0]);
        assert_eq!(q.slots(), 0, "everything reclaimed once the head is released");
    }
}
