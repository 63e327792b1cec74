//! Classification (DESIGN.md steps 3 and 4; paper 2.5 and section 3): what to do with one
//! packet, given the local connection table and the cluster connection database. Returns a
//! verdict; the I/O loop carries it out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cluster_proto::{Action, Connection, ConnectionDatabase, ConnectionTable, LookupKey, MemberId};

use crate::hold::flow_key;
use crate::packet::{FlowPacket, Parsed};
use crate::policy::OwnerPolicy;

/// Where the packet was intercepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Arriving or passing through (PREROUTING).
    Prerouting,
    /// Sent by a local process, e.g. the proxy's spoofed server-side connection (OUTPUT).
    Output,
}

/// What the I/O loop must do with the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it continue untouched.
    Accept,
    /// A new local flow: insert it in the local table and send INSTALL to every peer, then
    /// let the packet continue (paper 2.4: peers hear of it before the packet leaves).
    AcceptLocal {
        /// The connection, in the direction of this packet.
        connection: Connection,
        /// FORWARD for intercepted flows, BYPASS for bypassed ones.
        action: Action,
    },
    /// Send it to the owner in IP-in-IP and drop the original.
    Encapsulate {
        /// The owning member.
        owner: MemberId,
    },
    /// Keep it in the hold queue: an INSTALL for it may be in transit.
    Hold,
    /// Drop it.
    Drop,
}

/// Why, for metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Packet of one of this member's connections.
    LocalFlow,
    /// Packet of a connection owned by another member.
    RemoteFlow,
    /// Packet of a bypassed connection.
    Bypassed,
    /// First packet of a new connection this member takes.
    NewLocal,
    /// First packet of a new connection the bypass list matches.
    NewBypass,
    /// First packet of a new connection the owner policy gives to another member.
    NewHandoff,
    /// Packet of a connection handed off whose owner has not announced it yet.
    HandoffPending,
    /// A partial flow (SYN-ACK or ACK without SYN) that matches nothing.
    Partial,
    /// Held too long and still unknown.
    PartialExpired,
    /// ICMP error about a local or unknown flow.
    IcmpLocal,
    /// ICMP error about another member's flow.
    IcmpSteered,
    /// A non-first fragment.
    Fragment,
    /// Not TCP/UDP.
    Other,
    /// A packet sent by a local process that is not the start of a connection.
    LocalOutput,
    /// Decapsulated packet of a local flow.
    DecapLocal,
    /// Decapsulated first packet of a flow handed to this member.
    DecapNew,
    /// Decapsulated packet of a flow this member does not know (injected anyway).
    DecapUnknown,
}

impl Reason {
    /// Every reason, so that metrics can export each one from the start.
    pub const ALL: [Reason; 17] = [
        Reason::LocalFlow,
        Reason::RemoteFlow,
        Reason::Bypassed,
        Reason::NewLocal,
        Reason::NewBypass,
        Reason::NewHandoff,
        Reason::HandoffPending,
        Reason::Partial,
        Reason::PartialExpired,
        Reason::IcmpLocal,
        Reason::IcmpSteered,
        Reason::Fragment,
        Reason::Other,
        Reason::LocalOutput,
        Reason::DecapLocal,
        Reason::DecapNew,
        Reason::DecapUnknown,
    ];

    /// snake_case name for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Reason::LocalFlow => "local_flow",
            Reason::RemoteFlow => "remote_flow",
            Reason::Bypassed => "bypassed",
            Reason::NewLocal => "new_local",
            Reason::NewBypass => "new_bypass",
            Reason::NewHandoff => "new_handoff",
            Reason::HandoffPending => "handoff_pending",
            Reason::Partial => "partial",
            Reason::PartialExpired => "partial_expired",
            Reason::IcmpLocal => "icmp_local",
            Reason::IcmpSteered => "icmp_steered",
            Reason::Fragment => "fragment",
            Reason::Other => "other",
            Reason::LocalOutput => "local_output",
            Reason::DecapLocal => "decap_local",
            Reason::DecapNew => "decap_new",
            Reason::DecapUnknown => "decap_unknown",
        }
    }
}

/// A verdict and its reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
}

fn decide(verdict: Verdict, reason: Reason) -> Decision {
    Decision { verdict, reason }
}

/// The tables a classification reads; the packet path never blocks on them.
pub struct View<'a> {
    /// This member.
    pub me: MemberId,
    /// This member's connections.
    pub local: &'a ConnectionTable,
    /// Connections of the other members.
    pub db: &'a ConnectionDatabase,
    /// Members with an established channel, and this one.
    pub live: &'a [MemberId],
}

/// A bypass rule: new connections with an endpoint in `net` (and on `port`, if given) are
/// installed as BYPASS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BypassRule {
    /// The network.
    pub net: ipnet::IpNet,
    /// Only this port, if set.
    pub port: Option<u16>,
}

impl BypassRule {
    /// True when either endpoint of `c` matches.
    pub fn matches(&self, c: &Connection) -> bool {
        [c.src(), c.dst()].iter().any(|ep| self.net.contains(&ep.ip()) && self.port.is_none_or(|p| p == ep.port()))
    }
}

/// The bypass rules, shared with whoever may replace them while packets are classified (a
/// reload): read once per new flow, never per packet of a known one.
#[derive(Clone, Debug, Default)]
pub struct BypassList(std::sync::Arc<std::sync::RwLock<Vec<BypassRule>>>);

impl BypassList {
    /// A list of these rules.
    pub fn new(rules: Vec<BypassRule>) -> Self {
        BypassList(std::sync::Arc::new(std::sync::RwLock::new(rules)))
    }

    /// Replaces the rules for the flows classified from now on (flows already installed keep
    /// their action).
    pub fn set(&self, rules: Vec<BypassRule>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    /// True when a rule matches `c`.
    pub fn matches(&self, c: &Connection) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).iter().any(|r| r.matches(c))
    }
}

/// The classifier's own state: the owner policy, bypass rules, and recent handoffs.
pub struct Classifier {
    policy: Box<dyn OwnerPolicy>,
    bypass: BypassList,
    /// New flows handed to another member, until its INSTALL arrives (or the entry ages out).
    handoffs: HashMap<Connection, (MemberId, Instant)>,
    handoff_ttl: Duration,
    max_handoffs: usize,
}

impl Classifier {
    /// A classifier with an owner policy and bypass rules; handoffs are remembered for
    /// `handoff_ttl` (the hold time is a good value).
    pub fn new(policy: Box<dyn OwnerPolicy>, bypass: Vec<BypassRule>, handoff_ttl: Duration) -> Self {
        Classifier {
            policy,
            bypass: BypassList::new(bypass),
            handoffs: HashMap::new(),
            handoff_ttl,
            max_handoffs: 1 << 16,
        }
    }

    /// The bypass rules, to replace them while the classifier runs elsewhere.
    pub fn bypass_list(&self) -> BypassList {
        self.bypass.clone()
    }

    /// The owner policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Classifies a packet intercepted at `hook`.
    pub fn classify(&mut self, view: &View, now: Instant, parsed: &Parsed, hook: Hook) -> Decision {
        match parsed {
            Parsed::Flow(f) => self.flow(view, now, f, hook),
            Parsed::IcmpError { connection } => match view.db.owner_of(connection) {
                Some((owner, Action::Forward)) if owner != view.me && view.local.lookup(connection).is_none() => {
                    decide(Verdict::Encapsulate { owner }, Reason::IcmpSteered)
                }
                _ => decide(Verdict::Accept, Reason::IcmpLocal),
            },
            Parsed::Fragment => decide(Verdict::Accept, Reason::Fragment),
            Parsed::Other => decide(Verdict::Accept, Reason::Other),
        }
    }

    fn known(&mut self, view: &View, now: Instant, c: &Connection) -> Option<Decision> {
        // One key for both tables: building it is a tenth of a lookup.
        let key = LookupKey::of(c);
        if view.local.lookup_key(&key).is_some() {
            return Some(decide(Verdict::Accept, Reason::LocalFlow));
        }
        match view.db.owner_of_key(&key) {
            Some((_, Action::Bypass)) => return Some(decide(Verdict::Accept, Reason::Bypassed)),
            Some((owner, Action::Forward)) if owner != view.me => {
                return Some(decide(Verdict::Encapsulate { owner }, Reason::RemoteFlow));
            }
            Some(_) => return Some(decide(Verdict::Accept, Reason::LocalFlow)),
            None => {}
        }
        if !self.handoffs.is_empty() {
            let key = flow_key(c);
            match self.handoffs.get(&key) {
                Some(&(owner, at)) if now.duration_since(at) < self.handoff_ttl && view.live.contains(&owner) => {
                    return Some(decide(Verdict::Encapsulate { owner }, Reason::HandoffPending));
                }
                Some(_) => {
                    self.handoffs.remove(&key);
                }
                None => {}
            }
        }
        None
    }

    fn flow(&mut self, view: &View, now: Instant, f: &FlowPacket, hook: Hook) -> Decision {
        let c = &f.connection;
        if let Some(d) = self.known(view, now, c) {
            return d;
        }
        let new = f.is_syn() || c.protocol() == cluster_proto::Protocol::Udp;
        match (hook, new) {
            // The on-box proxy opens a connection (the spoofed server side): ours.
            (Hook::Output, true) => {
                decide(Verdict::AcceptLocal { connection: *c, action: Action::Forward }, Reason::NewLocal)
            }
            (Hook::Output, false) => decide(Verdict::Accept, Reason::LocalOutput),
            (Hook::Prerouting, true) => {
                if self.bypass.matches(c) {
                    return decide(Verdict::AcceptLocal { connection: *c, action: Action::Bypass }, Reason::NewBypass);
                }
                let choice = self.policy.choose(c, view.live, view.me);
                if choice.owner == view.me {
                    decide(Verdict::AcceptLocal { connection: *c, action: Action::Forward }, Reason::NewLocal)
                } else {
                    self.remember_handoff(now, c, choice.owner);
                    decide(Verdict::Encapsulate { owner: choice.owner }, Reason::NewHandoff)
                }
            }
            (Hook::Prerouting, false) => decide(Verdict::Hold, Reason::Partial),
        }
    }

    fn remember_handoff(&mut self, now: Instant, c: &Connection, owner: MemberId) {
        if self.handoffs.len() >= self.max_handoffs {
            self.expire_handoffs(now);
        }
        if self.handoffs.len() < self.max_handoffs {
            self.handoffs.insert(flow_key(c), (owner, now));
        }
    }

    /// Forgets handoffs older than the TTL.
    pub fn expire_handoffs(&mut self, now: Instant) {
        let ttl = self.handoff_ttl;
        self.handoffs.retain(|_, (_, at)| now.duration_since(*at) < ttl);
    }

    /// Re-classifies a packet whose hold time is over: released if its flow is now known,
    /// dropped otherwise.
    pub fn reclassify_expired(&mut self, view: &View, now: Instant, parsed: &Parsed) -> Decision {
        if let Parsed::Flow(f) = parsed {
            if let Some(d) = self.known(view, now, &f.connection) {
                return d;
            }
        }
        decide(Verdict::Drop, Reason::PartialExpired)
    }

    /// Classifies the inner packet of IP-in-IP received from a member: a new connection
    /// handed to this member becomes local; anything else is injected into the stack.
    pub fn classify_decapsulated(&mut self, view: &View, now: Instant, parsed: &Parsed) -> Decision {
        let Parsed::Flow(f) = parsed else { return decide(Verdict::Accept, Reason::DecapUnknown) };
        let c = &f.connection;
        if view.local.lookup(c).is_some() {
            return decide(Verdict::Accept, Reason::DecapLocal);
        }
        if (f.is_syn() || c.protocol() == cluster_proto::Protocol::Udp) && self.known(view, now, c).is_none() {
            return decide(Verdict::AcceptLocal { connection: *c, action: Action::Forward }, Reason::DecapNew);
        }
        decide(Verdict::Accept, Reason::DecapUnknown)
    }
}

#[cfg(test)]
mod reason_tests {
    use super::{BypassList, BypassRule, Connection, Reason};

    /// Its position in [`Reason::ALL`]; a match without a wildcard, so a new variant does not
    /// compile until it is given a place there.
    fn position(r: Reason) -> usize {
        match r {
            Reason::LocalFlow => 0,
            Reason::RemoteFlow => 1,
            Reason::Bypassed => 2,
            Reason::NewLocal => 3,
            Reason::NewBypass => 4,
            Reason::NewHandoff => 5,
            Reason::HandoffPending => 6,
            Reason::Partial => 7,
            Reason::PartialExpired => 8,
            Reason::IcmpLocal => 9,
            Reason::IcmpSteered => 10,
            Reason::Fragment => 11,
            Reason::Other => 12,
            Reason::LocalOutput => 13,
            Reason::DecapLocal => 14,
            Reason::DecapNew => 15,
            Reason::DecapUnknown => 16,
        }
    }

    #[test]
    fn a_replaced_bypass_list_applies_to_the_next_new_flow() {
        let rule = |net: &str| BypassRule { net: net.parse().unwrap(), port: None };
        let list = BypassList::new(vec![rule("203.0.113.0/24")]);
        let c = Connection::new(
            cluster_proto::Protocol::Tcp,
            "192.0.2.1:1".parse().unwrap(),
            "198.51.100.9:80".parse().unwrap(),
        )
        .unwrap();
        assert!(!list.matches(&c));
        list.clone().set(vec![rule("198.51.100.0/24")]);
        assert!(list.matches(&c), "a clone shares the rules");
        list.set(vec![]);
        assert!(!list.matches(&c));
    }

    #[test]
    fn all_lists_every_reason_once_with_distinct_names() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(position(*r), i, "{r:?}");
            // The engine counts by discriminant.
            assert_eq!(*r as usize, i, "{r:?}");
        }
        let names: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}
