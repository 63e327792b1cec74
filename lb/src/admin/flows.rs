//! `GET /flows`: the cluster's connections as this member knows them, sorted, in pages.
//!
//! The order is (source, destination, protocol, owner), in the originator's direction. A page
//! is the `limit` flows after the cursor `after` (the `next` of the previous page): one scan of
//! the tables that keeps only the `limit` smallest keys past the cursor in a bounded heap, so
//! memory is proportional to the page and never to the table. `limit=0` streams every flow:
//! the answer is written page by page as it is computed.
//!
//! Scans run on blocking threads, one at a time (the others wait their turn), never on the
//! async runtime that drives the control channels, so reading a table of millions of flows
//! cannot silence the member's keepalives.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};

use cluster_proto::{Entry, Protocol};

use super::FlowView;

/// Flows in one page at most; `limit=0` streams pages of this size.
pub const MAX_PAGE: usize = 100_000;

/// A flow's place in the order of `GET /flows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    /// Source, in the originator's direction.
    pub src: SocketAddr,
    /// Destination.
    pub dst: SocketAddr,
    /// tcp or udp.
    pub protocol: Protocol,
    /// The owning member's address (a connection can be both a local one and a peer's
    /// entry while two members' claims are being resolved).
    pub owner: IpAddr,
}

impl FlowKey {
    /// The cursor text: `SRC,DST,PROTOCOL,OWNER`.
    pub fn cursor(&self) -> String {
        format!("{},{},{},{}", self.src, self.dst, self.protocol, self.owner)
    }

    /// Parses a cursor made by [`FlowKey::cursor`].
    pub fn parse(s: &str) -> Result<FlowKey, String> {
        let bad = || format!("bad cursor {s:?}: use the `next` of the previous page");
        let mut it = s.split(',');
        let (Some(src), Some(dst), Some(p), Some(owner), None) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        Ok(FlowKey {
            src: src.parse().map_err(|_| bad())?,
            dst: dst.parse().map_err(|_| bad())?,
            protocol: p.parse().map_err(|_| bad())?,
            owner: owner.parse().map_err(|_| bad())?,
        })
    }
}

/// Filters of a scan.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter {
    /// Only flows owned by this member address.
    pub member: Option<IpAddr>,
    /// Only flows with this address at either end.
    pub addr: Option<IpAddr>,
    /// Only this protocol.
    pub protocol: Option<Protocol>,
}

impl Filter {
    fn admits(&self, e: &Entry, owner: IpAddr) -> bool {
        self.member.is_none_or(|m| m == owner)
            && self.addr.is_none_or(|a| e.connection.involves(a))
            && self.protocol.is_none_or(|p| p == e.connection.protocol())
    }
}

/// One flow picked for a page, before its view is built.
#[derive(Clone, Copy, Debug)]
pub struct Picked {
    /// Its key.
    pub key: FlowKey,
    /// The entry.
    pub entry: Entry,
    /// One of this member's own connections.
    pub local: bool,
    /// The install clock of the table it came from.
    pub now: u32,
}

impl PartialEq for Picked {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key
    }
}
impl Eq for Picked {}
impl PartialOrd for Picked {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Picked {
    fn cmp(&self, o: &Self) -> Ordering {
        self.key.cmp(&o.key)
    }
}

/// A page: the flows picked, in order, and the counts around them.
#[derive(Debug, Default)]
pub struct Page {
    /// Every flow that passes the filters, on this page or not.
    pub total: usize,
    /// Of those, the ones after the cursor.
    pub after_cursor: usize,
    /// The first `limit` of them, in order.
    pub flows: Vec<Picked>,
}

impl Page {
    /// The cursor of the next page, if there are flows after this one.
    pub fn next(&self) -> Option<String> {
        (self.after_cursor > self.flows.len()).then(|| self.flows.last().map(|p| p.key.cursor())).flatten()
    }
}

/// Picks the page of `limit` flows after `after` among the entries `scan` visits, each given
/// with its owner's address, whether it is local, and its table's install clock.
pub fn select(
    scan: impl FnOnce(&mut dyn FnMut(Entry, IpAddr, bool, u32)),
    filter: &Filter,
    after: Option<&FlowKey>,
    limit: usize,
) -> Page {
    let mut page = Page::default();
    let mut heap: BinaryHeap<Picked> = BinaryHeap::with_capacity(limit.min(MAX_PAGE) + 1);
    scan(&mut |entry, owner, local, now| {
        if !filter.admits(&entry, owner) {
            return;
        }
        page.total += 1;
        let c = entry.connection;
        let key = FlowKey { src: c.src(), dst: c.dst(), protocol: c.protocol(), owner };
        if after.is_some_and(|a| key <= *a) {
            return;
        }
        page.after_cursor += 1;
        if limit == 0 {
            return;
        }
        if heap.len() < limit {
            heap.push(Picked { key, entry, local, now });
        } else if heap.peek().is_some_and(|top| key < top.key) {
            heap.pop();
            heap.push(Picked { key, entry, local, now });
        }
    });
    page.flows = heap.into_sorted_vec();
    page
}

/// The view of a picked flow, with the fields only a few flows need computed here.
pub fn view(p: &Picked, reason: Option<String>, explain: Option<String>) -> FlowView {
    let e = &p.entry;
    FlowView {
        protocol: e.connection.protocol().to_string(),
        src: e.connection.src(),
        dst: e.connection.dst(),
        action: e.action.to_string(),
        owner: p.key.owner,
        local: p.local,
        age_secs: p.now.wrapping_sub(e.installed_at) & ((1 << 20) - 1),
        reason,
        explain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_proto::{Action, Connection, MemberId};

    fn entries() -> Vec<(Entry, IpAddr, bool)> {
        let owners: [IpAddr; 3] =
            ["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap(), "2001:db8::3".parse().unwrap()];
        let mut v = Vec::new();
        for i in 0..500u32 {
            let proto = if i % 7 == 0 { Protocol::Udp } else { Protocol::Tcp };
            let (s, d): (SocketAddr, SocketAddr) = if i % 5 == 0 {
                (
                    format!("[2001:db8::{:x}]:{}", i % 13, 1000 + i).parse().unwrap(),
                    "[2001:db8::99]:443".parse().unwrap(),
                )
            } else {
                (format!("198.51.100.{}:{}", i % 11, 2000 + i * 3).parse().unwrap(), "203.0.113.5:80".parse().unwrap())
            };
            let owner = owners[(i % 3) as usize];
            let connection = Connection::new(proto, s, d).unwrap();
            let entry = Entry { connection, owner: MemberId((i % 3) as u8), action: Action::Forward, installed_at: 0 };
            v.push((entry, owner, i % 3 == 0));
        }
        v
    }

    fn scan_of(v: &[(Entry, IpAddr, bool)]) -> impl FnOnce(&mut dyn FnMut(Entry, IpAddr, bool, u32)) + '_ {
        move |f| {
            for (e, o, l) in v {
                f(*e, *o, *l, 0)
            }
        }
    }

    #[test]
    fn pages_cover_every_flow_once_in_order_for_any_page_size() {
        let v = entries();
        for (filter, limit) in [
            (Filter::default(), 1),
            (Filter::default(), 7),
            (Filter::default(), 500),
            (Filter { protocol: Some(Protocol::Udp), ..Default::default() }, 10),
            (Filter { member: Some("2001:db8::3".parse().unwrap()), ..Default::default() }, 33),
            (Filter { addr: Some("203.0.113.5".parse().unwrap()), ..Default::default() }, 64),
        ] {
            let mut expected: Vec<FlowKey> = v
                .iter()
                .filter(|(e, o, _)| filter.admits(e, *o))
                .map(|(e, o, _)| FlowKey {
                    src: e.connection.src(),
                    dst: e.connection.dst(),
                    protocol: e.connection.protocol(),
                    owner: *o,
                })
                .collect();
            expected.sort();
            let mut got = Vec::new();
            let mut cursor: Option<FlowKey> = None;
            loop {
                let page = select(scan_of(&v), &filter, cursor.as_ref(), limit);
                assert_eq!(page.total, expected.len());
                assert!(page.flows.len() <= limit);
                got.extend(page.flows.iter().map(|p| p.key));
                match page.next() {
                    Some(c) => cursor = Some(FlowKey::parse(&c).unwrap()),
                    None => break,
                }
            }
            assert_eq!(got, expected, "filter {filter:?}, limit {limit}");
        }
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        for (e, o, _) in entries().into_iter().take(50) {
            let k = FlowKey {
                src: e.connection.src(),
                dst: e.connection.dst(),
                protocol: e.connection.protocol(),
                owner: o,
            };
            assert_eq!(FlowKey::parse(&k.cursor()), Ok(k));
        }
        for bad in [
            "",
            "1.2.3.4:5",
            "a,b,c,d",
            "192.0.2.1:1,192.0.2.2:2,sctp,192.0.2.3",
            "192.0.2.1:1,192.0.2.2:2,tcp,192.0.2.3,x",
        ] {
            assert!(FlowKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limit_zero_only_counts() {
        let v = entries();
        let page = select(scan_of(&v), &Filter::default(), None, 0);
        assert_eq!((page.total, page.after_cursor, page.flows.len()), (500, 500, 0));
    }
}
