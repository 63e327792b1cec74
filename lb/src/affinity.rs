//! The affinity engine's inputs in `lb`: loads read from the connection database at each
//! decision, this member's own dictionary savings (fed by the upstream proxy role) kept in a
//! [`SavingsLedger`] and advertised to the cluster as DICT_STATS, and the peers'
//! advertisements applied to the engine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_proto::mesh::Mesh;
use cluster_proto::{Action, Connection, ConnectionDatabase, ConnectionTable, MemberId, Protocol};
use dictionary_affinity::affinity::{
    decode_advertisement, encode_advertisement, AffinityEngine, LoadReport, PairGranularity, SavingsLedger,
};

/// Each member's load as every member can count it without a message: the connections it
/// owns in the shared database (paper 2.5: every member holds every member's connections).
/// The figure is as fresh as the last INSTALL/REMOVE, which stale LOAD reports are not.
pub fn database_loads(
    me: MemberId,
    local: &ConnectionTable,
    db: &ConnectionDatabase,
    members: &[MemberId],
) -> Vec<LoadReport> {
    members
        .iter()
        .map(|&m| {
            let n = if m == me { local.count_of(Action::Forward) } else { db.count_of(m, Action::Forward) };
            LoadReport { member: m, load: n as f64 }
        })
        .collect()
}

/// This member's dictionary savings per client/server pair, the source of its DICT_STATS.
pub struct Savings {
    ledger: SavingsLedger,
    granularity: PairGranularity,
    /// This member's dictionary epoch: a restart starts a new one, which voids what peers
    /// remember of the old dictionaries.
    epoch: u32,
}

impl Savings {
    /// A ledger at the cluster's pair granularity and half-life.
    pub fn new(granularity: PairGranularity, half_life: Duration, max_pairs: u64, epoch: u32) -> Self {
        Savings { ledger: SavingsLedger::new(half_life, max_pairs), granularity, epoch }
    }

    /// A new epoch from the wall clock (seconds since 2020, so it grows across restarts).
    pub fn epoch_now() -> u32 {
        let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        s.saturating_sub(1_577_836_800).min(u64::from(u32::MAX)) as u32
    }

    /// The ledger.
    pub fn ledger(&self) -> &SavingsLedger {
        &self.ledger
    }

    /// This member's dictionary epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// `bytes` saved by the dictionary on a connection from `client` to `server`.
    pub fn record(&self, now: Instant, client: SocketAddr, server: SocketAddr, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let Ok(c) = Connection::new(Protocol::Tcp, client, server) else { return };
        let pair = dictionary_affinity::affinity::Pair::of(&c, &self.granularity);
        self.ledger.record(now, pair, bytes);
    }
}

impl crate::chain::SavingsSink for Savings {
    fn record(&self, client: SocketAddr, server: SocketAddr, bytes_saved: u64) {
        Savings::record(self, Instant::now(), client, server, bytes_saved);
    }
}

/// Shared handle used by the proxy role (it records) and the advertiser (it reads).
pub type SharedSavings = Arc<Savings>;

/// Statistics not re-advertised for an hour are ignored by the engines (`max_age`): every
/// pair is advertised again at least this often.
const FULL_EVERY: Duration = Duration::from_secs(600);

/// Applies the peers' DICT_STATS/LOAD to `engine` as they arrive. Undecodable content cannot
/// reach here (the session checks the framing and the member byte); a record the codec still
/// refuses (a prefix with host bits, a negative value) is logged and dropped.
pub fn apply_advertisements(mesh: &Mesh, engine: Arc<AffinityEngine>) {
    mesh.set_advertisement_listener(Box::new(move |from, bytes| match decode_advertisement(bytes) {
        Ok(adv) => engine.apply(Instant::now(), &adv),
        Err(e) => tracing::warn!(peer = from.0, error = %e, "advertisement dropped"),
    }));
}

/// Advertises this member's changed pairs every `every` (all of them when the membership
/// changed, so that a member that just joined learns them, after a peer's full queue dropped
/// an advertisement, and every [`FULL_EVERY`]), and
/// feeds them to this member's own engine too, as peers see them. Ends when `stop` turns true.
pub async fn advertise(
    mesh: Mesh,
    savings: SharedSavings,
    engine: Option<Arc<AffinityEngine>>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generation = u64::MAX;
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = Instant::now();
        let g = mesh.membership_generation();
        let stats = if g != generation || now.duration_since(last_full) >= FULL_EVERY {
            generation = g;
            last_full = now;
            // Take the changes too, so they are not sent twice.
            savings.ledger().advertise(now, mesh.me(), savings.epoch());
            savings.ledger().snapshot(now, mesh.me(), savings.epoch())
        } else {
            savings.ledger().advertise(now, mesh.me(), savings.epoch())
        };
        if stats.is_empty() {
            continue;
        }
        if let Some(e) = &engine {
            e.observe(now, &stats);
        }
        let dropped = mesh.advertisement_stats().dropped;
        if let Err(e) = mesh.advertise(&encode_advertisement(&stats, &[])) {
            tracing::warn!(error = %e, "cannot advertise dictionary statistics");
        }
        if mesh.advertisement_stats().dropped > dropped {
            // A busy peer missed these changes: everything again at the next tick.
            generation = u64::MAX;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_are_the_connections_each_member_owns() {
        let me = MemberId(0);
        let local = ConnectionTable::new(me);
        let db = ConnectionDatabase::new();
        let c = |i: u16| {
            Connection::new(
                Protocol::Tcp,
                format!("192.0.2.1:{}", 1000 + i).parse().unwrap(),
                "203.0.113.10:80".parse().unwrap(),
            )
            .unwrap()
        };
        local.insert(&c(0), Action::Forward);
        local.insert(&c(1), Action::Bypass);
        for i in 2..7 {
            db.install(&c(i), MemberId(2), Action::Forward);
        }
        let loads = database_loads(me, &local, &db, &[MemberId(0), MemberId(1), MemberId(2)]);
        let got: Vec<(u8, f64)> = loads.iter().map(|l| (l.member.0, l.load)).collect();
        assert_eq!(got, vec![(0, 1.0), (1, 0.0), (2, 5.0)]);
    }

    #[test]
    fn savings_are_recorded_per_pair_and_advertised_with_the_epoch() {
        let s = Savings::new(PairGranularity::default(), Duration::from_secs(300), 1000, 7);
        let t = Instant::now();
        s.record(t, "192.0.2.10:4000".parse().unwrap(), "203.0.113.10:80".parse().unwrap(), 1000);
        s.record(t, "192.0.2.99:4001".parse().unwrap(), "203.0.113.10:80".parse().unwrap(), 500);
        s.record(t, "192.0.2.99:4001".parse().unwrap(), "203.0.113.11:80".parse().unwrap(), 0);
        let adv = s.ledger().advertise(t, MemberId(3), s.epoch());
        assert_eq!(adv.len(), 1, "one site, one server: one pair");
        assert_eq!(adv[0].pair.to_string(), "192.0.2.0/24 -> 203.0.113.10/32");
        assert_eq!((adv[0].member, adv[0].epoch, adv[0].saved_decayed), (MemberId(3), 7, 1500.0));
        assert!(s.ledger().advertise(t, MemberId(3), 7).is_empty(), "only changes are re-advertised");
    }
}
