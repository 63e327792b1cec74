//! Who owns a new flow, as `lb` configures it: the owner policy of `[dataplane] policy`
//! (local, 5-tuple rendezvous, or dictionary affinity), restricted to the members allowed to
//! own flows (`[dataplane] owners`, e.g. the upstream proxies of paper Fig. 2 behind
//! load-balancing members), with every decision counted by reason and remembered for a while
//! so that `GET /flows` can say why a flow has its owner.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cluster_proto::{Connection, MemberId};
use dictionary_affinity::affinity::{AffinityEngine, LoadReport};
use handoff::policy::{Choice, LocalOnly, OwnerPolicy, Rendezvous, RendezvousKey};
use moka::sync::Cache;

/// The reason given when no allowed owner is live: the deciding member keeps the flow.
pub const NO_OWNER_LIVE: &str = "local_no_owner_live";

/// One remembered decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The member chosen.
    pub owner: MemberId,
    /// Why (a policy's stable reason name).
    pub reason: &'static str,
}

/// The configured owner policy with its owner restriction, counters and decision log. The
/// policy (other than affinity) and the owners can change while flows are decided (a reload):
/// each decision reads them once.
pub struct Steering {
    policy: RwLock<Active>,
    affinity: Option<Arc<AffinityEngine>>,
    owners: RwLock<Option<Vec<MemberId>>>,
    log: Cache<Connection, Recorded>,
    counts: Mutex<BTreeMap<&'static str, Arc<AtomicU64>>>,
    loads: std::sync::OnceLock<LoadSource>,
}

/// Reads the current load of the members allowed to own new flows, given as they are at the
/// decision (`None`: every member; see [`crate::affinity::database_loads`]).
pub type LoadSource = Box<dyn Fn(Option<&[MemberId]>) -> Vec<LoadReport> + Send + Sync>;

/// The policy in force.
struct Active {
    name: &'static str,
    inner: Box<dyn OwnerPolicy>,
}

/// The policies `[dataplane] policy` names.
pub enum PolicyKind {
    /// Every new flow stays with the member that sees it (the paper).
    Local,
    /// Rendezvous hashing of the 5-tuple (the comparison policy of Fig. 2).
    Rendezvous,
    /// Rendezvous hashing of the client/server address pair.
    PairRendezvous,
    /// Best dictionary within the load bound.
    Affinity(Arc<AffinityEngine>),
}

impl Steering {
    /// A steering over `kind`; `owners` (sorted, deduplicated here) limits who may own new
    /// flows, `None` lets every live member. Decisions are remembered for `remember` (bounded
    /// to `max_remembered` flows).
    pub fn new(kind: PolicyKind, owners: Option<Vec<MemberId>>, remember: Duration, max_remembered: u64) -> Self {
        let (active, affinity) = Self::active(kind);
        Steering {
            policy: RwLock::new(active),
            affinity,
            owners: RwLock::new(sorted(owners)),
            log: Cache::builder()
                .max_capacity(max_remembered)
                .time_to_live(remember.max(Duration::from_secs(1)))
                .build(),
            counts: Mutex::default(),
            loads: std::sync::OnceLock::new(),
        }
    }

    fn active(kind: PolicyKind) -> (Active, Option<Arc<AffinityEngine>>) {
        let (name, inner, affinity): (_, Box<dyn OwnerPolicy>, _) = match kind {
            PolicyKind::Local => ("local", Box::new(LocalOnly), None),
            PolicyKind::Rendezvous => ("rendezvous", Box::new(Rendezvous { key: RendezvousKey::Connection }), None),
            PolicyKind::PairRendezvous => {
                ("pair_rendezvous", Box::new(Rendezvous { key: RendezvousKey::AddressPair }), None)
            }
            PolicyKind::Affinity(e) => ("affinity", Box::new(Shared(e.clone())), Some(e)),
        };
        (Active { name, inner }, affinity)
    }

    /// Replaces the policy for the flows decided from now on (flows already placed keep their
    /// owners). Not to or from affinity: the engine and its advertisements are wired at start.
    pub fn set_policy(&self, kind: PolicyKind) -> Result<(), &'static str> {
        if self.affinity.is_some() || matches!(kind, PolicyKind::Affinity(_)) {
            return Err("the policy cannot change to or from affinity while the member runs");
        }
        let (active, _) = Self::active(kind);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = active;
        Ok(())
    }

    /// Replaces the members allowed to own new flows (`None`: all).
    pub fn set_owners(&self, owners: Option<Vec<MemberId>>) {
        *self.owners.write().unwrap_or_else(|e| e.into_inner()) = sorted(owners);
    }

    /// Where the affinity engine's loads come from; read before every decision so a burst of
    /// new flows sees the flows it has already placed (once their INSTALLs are in).
    pub fn set_load_source(&self, source: LoadSource) {
        let _ = self.loads.set(source);
    }

    /// The policy's name as configured.
    pub fn name(&self) -> &'static str {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).name
    }

    /// The affinity engine, when the policy is affinity.
    pub fn affinity(&self) -> Option<&Arc<AffinityEngine>> {
        self.affinity.as_ref()
    }

    /// The members allowed to own new flows (`None`: all).
    pub fn owners(&self) -> Option<Vec<MemberId>> {
        self.owners.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The live members that may own a new flow.
    pub fn eligible(&self, live: &[MemberId]) -> Vec<MemberId> {
        eligible(self.owners.read().unwrap_or_else(|e| e.into_inner()).as_deref(), live)
    }

    /// Why `connection` (in either direction) got its owner, if this member decided it recently.
    pub fn recorded(&self, connection: &Connection) -> Option<Recorded> {
        self.log.get(connection).or_else(|| self.log.get(&connection.reversed()))
    }

    /// Decisions so far, by reason.
    pub fn decisions(&self) -> Vec<(&'static str, u64)> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(r, n)| (*r, n.load(Ordering::Relaxed))).collect()
    }

    fn count(&self, reason: &'static str) {
        let c = {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            counts.entry(reason).or_default().clone()
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lets the data plane's classifier own a box while `lb` keeps the steering for metrics.
pub struct SteeringPolicy(pub Arc<Steering>);

impl OwnerPolicy for SteeringPolicy {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn choose(&self, connection: &Connection, live: &[MemberId], me: MemberId) -> Choice {
        let s = &self.0;
        // The owners in force for this whole decision (a reload may replace them).
        let owners = s.owners.read().unwrap_or_else(|e| e.into_inner());
        let eligible = eligible(owners.as_deref(), live);
        let restricted = owners.is_some();
        if let (Some(engine), Some(loads)) = (&s.affinity, s.loads.get()) {
            engine.observe_loads(std::time::Instant::now(), &loads(owners.as_deref()));
        }
        drop(owners);
        let choice = if eligible.is_empty() {
            Choice { owner: me, reason: NO_OWNER_LIVE }
        } else {
            let c = s.policy.read().unwrap_or_else(|e| e.into_inner()).inner.choose(connection, &eligible, me);
            // A policy that keeps flows local ("local") when this member may not own them.
            if restricted && !eligible.contains(&c.owner) {
                Choice { owner: eligible[0], reason: c.reason }
            } else {
                c
            }
        };
        s.count(choice.reason);
        s.log.insert(*connection, Recorded { owner: choice.owner, reason: choice.reason });
        choice
    }
}

/// The live members among `owners` (all of `live` without a restriction).
fn eligible(owners: Option<&[MemberId]>, live: &[MemberId]) -> Vec<MemberId> {
    match owners {
        None => live.to_vec(),
        Some(o) => live.iter().copied().filter(|m| o.binary_search(m).is_ok()).collect(),
    }
}

/// Sorted and deduplicated, for `binary_search`.
fn sorted(owners: Option<Vec<MemberId>>) -> Option<Vec<MemberId>> {
    owners.map(|mut o| {
        o.sort_unstable();
        o.dedup();
        o
    })
}

struct Shared(Arc<AffinityEngine>);

impl OwnerPolicy for Shared {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn choose(&self, connection: &Connection, live: &[MemberId], me: MemberId) -> Choice {
        self.0.choose(connection, live, me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dictionary_affinity::affinity::{AffinityConfig, DictStats};
    use std::time::Instant;

    fn conn(src: &str, dst: &str) -> Connection {
        Connection::new(cluster_proto::Protocol::Tcp, src.parse().unwrap(), dst.parse().unwrap()).unwrap()
    }

    fn ids(v: &[u8]) -> Vec<MemberId> {
        v.iter().map(|&i| MemberId(i)).collect()
    }

    #[test]
    fn only_allowed_owners_get_flows_and_every_decision_is_counted_and_remembered() {
        let s =
            Arc::new(Steering::new(PolicyKind::Rendezvous, Some(ids(&[4, 2, 3, 3])), Duration::from_secs(60), 1000));
        assert_eq!(s.owners(), Some(ids(&[2, 3, 4])));
        let p = SteeringPolicy(s.clone());
        let live = ids(&[0, 1, 2, 3, 4]);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200u16 {
            let c = conn(&format!("192.0.2.{}:{}", i % 250, 1000 + i), "203.0.113.10:80");
            let ch = p.choose(&c, &live, MemberId(0));
            assert!([2, 3, 4].contains(&ch.owner.0), "{ch:?}");
            assert_eq!(s.recorded(&c), Some(Recorded { owner: ch.owner, reason: ch.reason }));
            assert_eq!(s.recorded(&c.reversed()).map(|r| r.owner), Some(ch.owner));
            seen.insert(ch.owner.0);
        }
        assert_eq!(seen.len(), 3, "a 5-tuple hash spreads over every allowed owner");
        assert_eq!(s.decisions(), vec![("rendezvous", 200)]);
        // No allowed owner live: the deciding member keeps the flow (it passes unproxied).
        let c = conn("192.0.2.1:1", "203.0.113.10:80");
        assert_eq!(p.choose(&c, &ids(&[0, 1]), MemberId(1)), Choice { owner: MemberId(1), reason: NO_OWNER_LIVE });
        assert!(s.decisions().contains(&(NO_OWNER_LIVE, 1)));
    }

    #[test]
    fn a_reload_changes_the_policy_and_owners_of_the_next_flows_only() {
        let s = Arc::new(Steering::new(PolicyKind::Local, None, Duration::from_secs(60), 1000));
        let p = SteeringPolicy(s.clone());
        let live = ids(&[0, 1, 2]);
        let c = conn("192.0.2.1:1", "203.0.113.10:80");
        assert_eq!(p.choose(&c, &live, MemberId(1)).owner, MemberId(1));
        s.set_owners(Some(ids(&[2])));
        assert_eq!(p.choose(&conn("192.0.2.1:2", "203.0.113.10:80"), &live, MemberId(1)).owner, MemberId(2));
        s.set_policy(PolicyKind::Rendezvous).unwrap();
        s.set_owners(None);
        assert_eq!(s.name(), "rendezvous");
        let owners: std::collections::BTreeSet<u8> = (0..100u16)
            .map(|i| p.choose(&conn(&format!("192.0.2.1:{}", 100 + i), "203.0.113.10:80"), &live, MemberId(1)).owner.0)
            .collect();
        assert_eq!(owners.len(), 3, "rendezvous spreads over every member again");
        // The first flow's recorded owner stays what it was.
        assert_eq!(s.recorded(&c).map(|r| r.owner), Some(MemberId(1)));
        let e = Arc::new(AffinityEngine::new(AffinityConfig::default()));
        assert!(s.set_policy(PolicyKind::Affinity(e.clone())).is_err(), "not to affinity");
        let a = Steering::new(PolicyKind::Affinity(e), None, Duration::from_secs(1), 10);
        assert!(a.set_policy(PolicyKind::Local).is_err(), "nor from it");
        assert_eq!(a.name(), "affinity");
    }

    #[test]
    fn local_policy_with_owners_hands_flows_to_an_owner() {
        let s = Arc::new(Steering::new(PolicyKind::Local, Some(ids(&[2])), Duration::from_secs(1), 10));
        let c = conn("192.0.2.1:1", "203.0.113.10:80");
        assert_eq!(SteeringPolicy(s).choose(&c, &ids(&[0, 2]), MemberId(0)).owner, MemberId(2));
    }

    #[test]
    fn affinity_follows_the_dictionary_among_allowed_owners() {
        let e = Arc::new(AffinityEngine::new(AffinityConfig { load_slack: 4.0, ..AffinityConfig::default() }));
        let s = Arc::new(Steering::new(
            PolicyKind::Affinity(e.clone()),
            Some(ids(&[2, 3, 4])),
            Duration::from_secs(60),
            1000,
        ));
        let p = SteeringPolicy(s.clone());
        let live = ids(&[0, 1, 2, 3, 4]);
        let c = conn("192.0.2.7:40000", "203.0.113.10:80");
        let first = p.choose(&c, &live, MemberId(0));
        assert_eq!(first.reason, "rendezvous_no_dictionary");
        // Member 3 advertises the best dictionary for the pair; member 0 (not an owner) a better one.
        let pair = e.pair(&c);
        let t = Instant::now();
        e.observe(t, &[DictStats { pair, member: MemberId(3), saved_decayed: 1e6, epoch: 1 }]);
        e.observe(t, &[DictStats { pair, member: MemberId(0), saved_decayed: 1e9, epoch: 1 }]);
        for port in 40001..40050 {
            let c = conn(&format!("192.0.2.{}:{port}", port % 200), "203.0.113.10:80");
            assert_eq!(p.choose(&c, &live, MemberId(1)), Choice { owner: MemberId(3), reason: "affinity" });
        }
        assert_eq!(s.name(), "affinity");
        assert!(s.decisions().contains(&("affinity", 49)));
    }
}
