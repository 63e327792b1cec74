//! The connection database of paper sections 2.4 and 2.5: the member's own
//! [`ConnectionTable`] and the [`ConnectionDatabase`] of connections owned by peers.
//!
//! Both are keyed by protocol and the connection's endpoints in a canonical order, so a
//! packet of either direction finds the entry with one probe. Readers (the packet path)
//! never block on writers; see [`crate::table`].
//!
//! An IPv4 entry is one 16-byte slot:
//!
//! ```text
//! word 0: addr_a (32) | addr_b (32)
//! word 1: port_a (16) | port_b (16) | occupied (1) | udp (1) | swapped (1) | bypass (1)
//!         | owner (8) | installed_at (20, seconds since the database started, wrapping)
//! ```
//!
//! Endpoint `a` is the lower of the two (address, port) pairs; `swapped` says the connection's
//! source was endpoint `b`, so the originator's direction is kept for views. An IPv6 entry is
//! the same with four address words (40 bytes).
//!
//! # Concurrent claims
//!
//! Two members may claim the same connection at once (both saw its first packet), or a new
//! claim may reach a member before the REMOVE of an older one on another channel. The paper's
//! "last INSTALL wins" then leaves members disagreeing for good, and the loser's REMOVE deletes
//! the winner's entry wherever the loser's INSTALL came last. Here every member keeps, for a
//! contested connection, the set of claims (one per member, with its action) and applies one
//! rule on its own: **the claim of the member with the lowest id (the lowest cluster address)
//! owns the connection**. The table holds the owning claim; the others wait in a small side
//! map ([`Contest`]) and take over, in the same order, when the owner removes its claim or is
//! purged. The result depends only on which claims exist, not on the order INSTALLs and
//! REMOVEs arrive on different channels, so every member reaches the same owner by itself.
//! This member's own claim (in its [`ConnectionTable`]) takes part too
//! ([`ConnectionDatabase::local_claimed`]): when it wins, the table holds no peer's claim for
//! the connection; when it loses, the caller withdraws it (the mesh sends REMOVE).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::flow::{Action, Connection, Protocol};
use crate::table::{FlowTable, Upsert, KEY_MASK, OCCUPIED, SHARDS};

/// Index of a cluster member in the sorted membership list; the owner of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct MemberId(pub u8);

/// Most members a cluster can have (owner ids are 8 bits).
pub const MAX_MEMBERS: usize = 255;

const UDP: u64 = 1 << 30;
const SWAPPED: u64 = 1 << 29;
const BYPASS: u64 = 1 << 28;
const OWNER_SHIFT: u32 = 20;
const TIME_MASK: u64 = (1 << 20) - 1;

/// One entry of the database, as installed by its originating member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The connection in its originator's direction.
    pub connection: Connection,
    /// The originating (owning) member.
    pub owner: MemberId,
    /// Forward to the owner, or bypass.
    pub action: Action,
    /// Seconds since the database started, modulo 2^20 (about 12 days).
    pub installed_at: u32,
}

/// What an install did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallOutcome {
    /// A new entry.
    New,
    /// The same owner and action were already there.
    Unchanged,
    /// The entry existed with another owner or action, now replaced.
    Replaced {
        /// Owner before.
        previous_owner: MemberId,
        /// Action before.
        previous_action: Action,
    },
    /// The claim was recorded, but another member's claim (or this member's own) owns the
    /// connection under the lowest-id rule; it takes over if that one goes.
    Contested {
        /// The claim that owns the connection.
        owner: MemberId,
    },
}

/// What a remove did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveOutcome {
    /// The entry was removed.
    Removed,
    /// No such entry.
    NotFound,
    /// The entry belongs to another member and was kept.
    NotOwner(MemberId),
}

fn endpoints(c: &Connection) -> (SocketAddr, SocketAddr, bool) {
    let (s, d) = (c.src(), c.dst());
    if (s.ip(), s.port()) <= (d.ip(), d.port()) {
        (s, d, false)
    } else {
        (d, s, true)
    }
}

fn meta(c: &Connection, swapped: bool, a: &SocketAddr, b: &SocketAddr, owner: MemberId, action: Action, t: u32) -> u64 {
    let mut m = ((a.port() as u64) << 48) | ((b.port() as u64) << 32) | OCCUPIED;
    if c.protocol() == Protocol::Udp {
        m |= UDP;
    }
    if swapped {
        m |= SWAPPED;
    }
    if action == Action::Bypass {
        m |= BYPASS;
    }
    m | ((owner.0 as u64) << OWNER_SHIFT) | (t as u64 & TIME_MASK)
}

fn v4_slot(c: &Connection, owner: MemberId, action: Action, t: u32) -> [u64; 2] {
    let (a, b, swapped) = endpoints(c);
    let (IpAddr::V4(ia), IpAddr::V4(ib)) = (a.ip(), b.ip()) else { unreachable!("IPv4 connection") };
    [((u32::from(ia) as u64) << 32) | u32::from(ib) as u64, meta(c, swapped, &a, &b, owner, action, t)]
}

fn v6_slot(c: &Connection, owner: MemberId, action: Action, t: u32) -> [u64; 5] {
    let (a, b, swapped) = endpoints(c);
    let (IpAddr::V6(ia), IpAddr::V6(ib)) = (a.ip(), b.ip()) else { unreachable!("IPv6 connection") };
    let (ia, ib) = (u128::from(ia), u128::from(ib));
    [(ia >> 64) as u64, ia as u64, (ib >> 64) as u64, ib as u64, meta(c, swapped, &a, &b, owner, action, t)]
}

/// A connection's table key, built once and used for several lookups of the same packet
/// (the local table, then the database; the prefetch before them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LookupKey {
    /// An IPv4 connection's slot words.
    V4([u64; 2]),
    /// An IPv6 connection's slot words.
    V6([u64; 5]),
}

impl LookupKey {
    /// The key of `connection`, in either direction.
    #[inline]
    pub fn of(connection: &Connection) -> Self {
        if connection.is_ipv4() {
            LookupKey::V4(v4_slot(connection, MemberId(0), Action::Forward, 0))
        } else {
            LookupKey::V6(v6_slot(connection, MemberId(0), Action::Forward, 0))
        }
    }
}

fn decode_entry(a: IpAddr, b: IpAddr, m: u64) -> Entry {
    let pa = SocketAddr::new(a, (m >> 48) as u16);
    let pb = SocketAddr::new(b, (m >> 32) as u16);
    let (src, dst) = if m & SWAPPED != 0 { (pb, pa) } else { (pa, pb) };
    let protocol = if m & UDP != 0 { Protocol::Udp } else { Protocol::Tcp };
    Entry {
        connection: Connection::new(protocol, src, dst).expect("one family per slot"),
        owner: MemberId((m >> OWNER_SHIFT) as u8),
        action: if m & BYPASS != 0 { Action::Bypass } else { Action::Forward },
        installed_at: (m & TIME_MASK) as u32,
    }
}

fn v4_entry(s: &[u64; 2]) -> Entry {
    decode_entry(Ipv4Addr::from((s[0] >> 32) as u32).into(), Ipv4Addr::from(s[0] as u32).into(), s[1])
}

fn v6_entry(s: &[u64; 5]) -> Entry {
    let a = ((s[0] as u128) << 64) | s[1] as u128;
    let b = ((s[2] as u128) << 64) | s[3] as u128;
    decode_entry(Ipv6Addr::from(a).into(), Ipv6Addr::from(b).into(), s[4])
}

fn owner_of(m: u64) -> MemberId {
    MemberId((m >> OWNER_SHIFT) as u8)
}

fn action_of(m: u64) -> Action {
    if m & BYPASS != 0 {
        Action::Bypass
    } else {
        Action::Forward
    }
}

/// Connections owned by cluster members, shared by every reader of this member
/// (paper 2.4: the cluster connection database).
pub struct ConnectionDatabase {
    v4: FlowTable<2>,
    v6: FlowTable<5>,
    started: Instant,
    /// Entries per owner and action, kept by writers for metrics and views.
    counts: Box<[[AtomicI64; 2]]>,
    /// The member whose own claims live in its [`ConnectionTable`] (see the module docs).
    me: Option<MemberId>,
    /// Contested connections, by stripe of their key; every write to the table goes through
    /// its key's stripe lock, so a connection's claims and its table slot change together.
    contests: Box<[Mutex<HashMap<LookupKey, Contest>>]>,
    /// Contested connections in all stripes.
    contested: AtomicUsize,
}

const STRIPES: usize = 64;

/// Parts of a database visited one at a time by [`ConnectionDatabase::for_each_in_part`].
pub const PARTS: usize = 2 * SHARDS;

/// One claim on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Claim {
    connection: Connection,
    owner: MemberId,
    action: Action,
}

/// The claims on one contested connection (see the module docs); the table holds the one
/// with the lowest owner id, unless this member's own claim is lower.
#[derive(Debug, Default)]
struct Contest {
    claims: Vec<Claim>,
    /// This member claims the connection too (in its [`ConnectionTable`]).
    local: bool,
}

/// One family's share of [`ConnectionDatabase::install_many`].
struct Family<'a> {
    items: &'a [(Connection, Action)],
    owner: MemberId,
    now_secs: u32,
    maps: &'a [MutexGuard<'a, HashMap<LookupKey, Contest>>],
}

impl Family<'_> {
    /// Writes the items `idx` (all of `table`'s family) a shard at a time: an uncontested new
    /// entry, or the owner's own entry again, is written at once (its outcome and count change
    /// recorded); an item whose key is contested or held by another member is deferred.
    #[allow(clippy::too_many_arguments)]
    fn write<const W: usize>(
        &self,
        table: &FlowTable<W>,
        idx: &[usize],
        slot: fn(&Connection, MemberId, Action, u32) -> [u64; W],
        key: fn(&[u64; W]) -> LookupKey,
        outcomes: &mut [InstallOutcome],
        delta: &mut [i64; 2],
        deferred: &mut Vec<usize>,
    ) {
        if idx.is_empty() {
            return;
        }
        let slots: Vec<[u64; W]> =
            idx.iter().map(|&i| slot(&self.items[i].0, self.owner, self.items[i].1, self.now_secs)).collect();
        let mut later = Vec::new();
        table.upsert_where(
            &slots,
            |k, current| {
                let i = idx[k];
                let action = self.items[i].1;
                let contest = key(&slots[k]);
                let map = &self.maps[stripe_of(&contest)];
                if !map.is_empty() && map.contains_key(&contest) {
                    return Upsert::Defer;
                }
                let b = |a: Action| (a == Action::Bypass) as usize;
                match current.map(|s| s[W - 1]) {
                    None => {
                        outcomes[i] = InstallOutcome::New;
                        delta[b(action)] += 1;
                    }
                    Some(m) if owner_of(m) == self.owner => {
                        let previous = action_of(m);
                        outcomes[i] = if previous == action {
                            InstallOutcome::Unchanged
                        } else {
                            delta[b(previous)] -= 1;
                            delta[b(action)] += 1;
                            InstallOutcome::Replaced { previous_owner: self.owner, previous_action: previous }
                        };
                    }
                    Some(_) => return Upsert::Defer,
                }
                Upsert::Write
            },
            &mut later,
        );
        deferred.extend(later.into_iter().map(|k| idx[k]));
    }
}

/// The contest map key: the connection's key words, direction-independent.
fn contest_key(c: &Connection) -> LookupKey {
    match LookupKey::of(c) {
        LookupKey::V4([a, m]) => LookupKey::V4([a, m & KEY_MASK]),
        LookupKey::V6([a, b, c2, d, m]) => LookupKey::V6([a, b, c2, d, m & KEY_MASK]),
    }
}

fn stripe_of(k: &LookupKey) -> usize {
    let folded = match k {
        LookupKey::V4(w) => w[0] ^ w[1].rotate_left(17),
        LookupKey::V6(w) => w[0] ^ w[1].rotate_left(7) ^ w[2].rotate_left(23) ^ w[3].rotate_left(41) ^ w[4],
    };
    (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % STRIPES
}

impl Default for ConnectionDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectionDatabase {
    /// An empty database that holds no member's own claims.
    pub fn new() -> Self {
        ConnectionDatabase {
            v4: FlowTable::new(),
            v6: FlowTable::new(),
            started: Instant::now(),
            counts: (0..256).map(|_| [AtomicI64::new(0), AtomicI64::new(0)]).collect(),
            me: None,
            contests: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            contested: AtomicUsize::new(0),
        }
    }

    /// An empty database of member `me`, whose own claims (in its [`ConnectionTable`]) take
    /// part in contests through [`ConnectionDatabase::local_claimed`].
    pub fn for_member(me: MemberId) -> Self {
        ConnectionDatabase { me: Some(me), ..Self::new() }
    }

    fn stripe(&self, k: &LookupKey) -> MutexGuard<'_, HashMap<LookupKey, Contest>> {
        self.contests[stripe_of(k)].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections with more than one claim right now.
    pub fn contested(&self) -> usize {
        self.contested.load(Ordering::Relaxed)
    }

    /// The table slot of `connection`: its owner and action.
    fn main_of(&self, connection: &Connection) -> Option<(MemberId, Action, Connection)> {
        self.lookup(connection).map(|e| (e.owner, e.action, e.connection))
    }

    fn write_main(&self, c: &Claim, t: u32) -> Option<u64> {
        if c.connection.is_ipv4() {
            self.v4.upsert(v4_slot(&c.connection, c.owner, c.action, t)).map(|s| s[1])
        } else {
            self.v6.upsert(v6_slot(&c.connection, c.owner, c.action, t)).map(|s| s[4])
        }
    }

    fn clear_main(&self, connection: &Connection) -> Option<u64> {
        let r = if connection.is_ipv4() {
            self.v4.remove_if(&v4_slot(connection, MemberId(0), Action::Forward, 0), |_| true).map(|(s, _)| s[1])
        } else {
            self.v6.remove_if(&v6_slot(connection, MemberId(0), Action::Forward, 0), |_| true).map(|(s, _)| s[4])
        };
        if let Some(m) = r {
            self.count(owner_of(m), action_of(m), -1);
        }
        r
    }

    /// Makes the table agree with a contest's claims (lock held): the lowest claim owns the
    /// connection, or nobody here when this member's own claim is lower. Returns the owner.
    fn settle(&self, connection: &Connection, contest: &Contest) -> Option<MemberId> {
        let best = contest.claims.iter().min_by_key(|c| c.owner).copied();
        let local_wins = contest.local && best.is_none_or(|b| self.me.is_some_and(|me| me < b.owner));
        let current = self.main_of(connection);
        if local_wins {
            if current.is_some() {
                self.clear_main(connection);
            }
            return self.me;
        }
        let b = best?;
        if current != Some((b.owner, b.action, b.connection)) {
            if let Some(m) = self.write_main(&b, self.now_secs()) {
                self.count(owner_of(m), action_of(m), -1);
            }
            self.count(b.owner, b.action, 1);
        }
        Some(b.owner)
    }

    /// Drops a contest left with at most one claim (lock held): the table alone says it all.
    fn tidy(&self, map: &mut HashMap<LookupKey, Contest>, key: &LookupKey) {
        if map.get(key).is_some_and(|c| c.claims.len() + c.local as usize <= 1) {
            map.remove(key);
            self.contested.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The contest of `key`, opened from the table's slot if there is none yet (lock held).
    fn open<'m>(
        &self,
        map: &'m mut HashMap<LookupKey, Contest>,
        key: LookupKey,
        connection: &Connection,
    ) -> &'m mut Contest {
        map.entry(key).or_insert_with(|| {
            self.contested.fetch_add(1, Ordering::Relaxed);
            let claims = self
                .main_of(connection)
                .map(|(owner, action, connection)| vec![Claim { connection, owner, action }])
                .unwrap_or_default();
            Contest { claims, local: false }
        })
    }

    /// This member (see [`ConnectionDatabase::for_member`]) now claims `connection` in its
    /// own table. Returns the owner under the lowest-id rule: this member (its claim stands;
    /// no peer's claim stays in the table) or the peer whose claim beats it (the caller
    /// withdraws its claim and calls [`ConnectionDatabase::local_ended`]).
    pub fn local_claimed(&self, connection: &Connection) -> MemberId {
        let me = self.me.expect("local claims need a member's database");
        let key = contest_key(connection);
        let mut map = self.stripe(&key);
        if !map.contains_key(&key) && self.main_of(connection).is_none() {
            return me;
        }
        let contest = self.open(&mut map, key, connection);
        contest.local = true;
        let owner = self.settle(connection, map.get(&key).expect("just opened")).unwrap_or(me);
        self.tidy(&mut map, &key);
        owner
    }

    /// This member no longer claims `connection`: the next claim, if any, takes over.
    pub fn local_ended(&self, connection: &Connection) {
        let key = contest_key(connection);
        let mut map = self.stripe(&key);
        if let Some(c) = map.get_mut(&key) {
            c.local = false;
            self.settle(connection, map.get(&key).expect("present"));
            self.tidy(&mut map, &key);
        }
    }

    /// Seconds since the database started, as stored in `installed_at`.
    pub fn now_secs(&self) -> u32 {
        (self.started.elapsed().as_secs() & TIME_MASK) as u32
    }

    fn count(&self, owner: MemberId, action: Action, delta: i64) {
        self.counts[owner.0 as usize][(action == Action::Bypass) as usize].fetch_add(delta, Ordering::Relaxed);
    }

    /// Records `owner`'s claim on `connection`. Uncontested, the claim owns it; when another
    /// member claims it too, the lowest member id owns it (module docs), whatever the order
    /// the claims arrive in.
    pub fn install(&self, connection: &Connection, owner: MemberId, action: Action) -> InstallOutcome {
        self.install_at(connection, owner, action, self.now_secs())
    }

    /// [`ConnectionDatabase::install`] with the install time ([`ConnectionDatabase::now_secs`])
    /// read once by the caller, for a batch of installs (a table sync).
    pub fn install_at(
        &self,
        connection: &Connection,
        owner: MemberId,
        action: Action,
        now_secs: u32,
    ) -> InstallOutcome {
        let key = contest_key(connection);
        let mut map = self.stripe(&key);
        self.install_locked(&mut map, key, connection, owner, action, now_secs)
    }

    /// Records `owner`'s claims on `items` as [`ConnectionDatabase::install_at`] would, one
    /// after the other, but with every stripe lock taken once and the table written a shard
    /// at a time (a table sync's INSTALLs arrive this way). `outcomes` gets one outcome per
    /// item, in order. A claim that meets a contest or another member's entry goes the way
    /// of a single install.
    pub fn install_many(
        &self,
        items: &[(Connection, Action)],
        owner: MemberId,
        now_secs: u32,
        outcomes: &mut Vec<InstallOutcome>,
    ) {
        outcomes.clear();
        outcomes.resize(items.len(), InstallOutcome::Unchanged);
        // Every stripe, in index order (no other path holds two), before any shard lock.
        let mut maps: Vec<_> = self.contests.iter().map(|m| m.lock().unwrap_or_else(|e| e.into_inner())).collect();
        let mut delta = [0i64; 2];
        let mut deferred = Vec::new();
        let (v4, v6): (Vec<usize>, Vec<usize>) = (0..items.len()).partition(|&i| items[i].0.is_ipv4());
        let family = Family { items, owner, now_secs, maps: &maps };
        family.write(
            &self.v4,
            &v4,
            v4_slot,
            |s| LookupKey::V4([s[0], s[1] & KEY_MASK]),
            outcomes,
            &mut delta,
            &mut deferred,
        );
        family.write(
            &self.v6,
            &v6,
            v6_slot,
            |s| LookupKey::V6([s[0], s[1], s[2], s[3], s[4] & KEY_MASK]),
            outcomes,
            &mut delta,
            &mut deferred,
        );
        self.count(owner, Action::Forward, delta[0]);
        self.count(owner, Action::Bypass, delta[1]);
        for i in deferred {
            let (connection, action) = &items[i];
            let key = contest_key(connection);
            outcomes[i] = self.install_locked(&mut maps[stripe_of(&key)], key, connection, owner, *action, now_secs);
        }
    }

    /// [`ConnectionDatabase::install_at`] with the key's stripe locked (`map`).
    fn install_locked(
        &self,
        map: &mut HashMap<LookupKey, Contest>,
        key: LookupKey,
        connection: &Connection,
        owner: MemberId,
        action: Action,
        now_secs: u32,
    ) -> InstallOutcome {
        // Uncontested (the common case, and the whole of a table sync): no lookup in the map.
        if map.is_empty() || !map.contains_key(&key) {
            let prev = self.write_main(&Claim { connection: *connection, owner, action }, now_secs);
            match prev {
                None => {
                    self.count(owner, action, 1);
                    return InstallOutcome::New;
                }
                Some(m) if owner_of(m) == owner && action_of(m) == action => return InstallOutcome::Unchanged,
                Some(m) if owner_of(m) == owner => {
                    self.count(owner, action_of(m), -1);
                    self.count(owner, action, 1);
                    return InstallOutcome::Replaced { previous_owner: owner, previous_action: action_of(m) };
                }
                Some(m) => {
                    // Another member's claim was there: put it back, and contest.
                    let previous = self.restore(connection, m);
                    let contest = self.open(map, key, connection);
                    contest.claims.retain(|c| c.owner != owner);
                    if !contest.claims.iter().any(|c| c.owner == previous.owner) {
                        contest.claims.push(previous);
                    }
                    contest.claims.push(Claim { connection: *connection, owner, action });
                    let now = self.settle(connection, map.get(&key).expect("open"));
                    self.tidy(map, &key);
                    return match now {
                        Some(o) if o == owner => InstallOutcome::Replaced {
                            previous_owner: previous.owner,
                            previous_action: previous.action,
                        },
                        Some(o) => InstallOutcome::Contested { owner: o },
                        None => InstallOutcome::Contested { owner },
                    };
                }
            }
        }
        let before = self.main_of(connection);
        let contest = map.get_mut(&key).expect("contested");
        let unchanged = contest.claims.iter().any(|c| c.owner == owner && c.action == action);
        contest.claims.retain(|c| c.owner != owner);
        contest.claims.push(Claim { connection: *connection, owner, action });
        let now = self.settle(connection, map.get(&key).expect("contested"));
        if now == Some(owner) && self.main_of(connection).is_some_and(|(o, a, _)| o == owner && a == action) {
            // The owner's claim again: its install time is refreshed, as uncontested (a
            // graceful restart's stale mark goes).
            self.write_main(&Claim { connection: *connection, owner, action }, now_secs);
        }
        self.tidy(map, &key);
        match (now, before) {
            _ if unchanged => InstallOutcome::Unchanged,
            (Some(o), Some((po, pa, _))) if o == owner => {
                InstallOutcome::Replaced { previous_owner: po, previous_action: pa }
            }
            (Some(o), None) if o == owner => InstallOutcome::New,
            (Some(o), _) => InstallOutcome::Contested { owner: o },
            (None, _) => InstallOutcome::Contested { owner },
        }
    }

    /// Puts back a slot's meta word `m` that an upsert of `connection` displaced, and returns
    /// it as a claim.
    fn restore(&self, connection: &Connection, m: u64) -> Claim {
        // The displaced slot kept the connection's endpoints; its direction is in `m`.
        let e = match LookupKey::of(connection) {
            LookupKey::V4([a, _]) => v4_entry(&[a, m]),
            LookupKey::V6([a, b, c, d, _]) => v6_entry(&[a, b, c, d, m]),
        };
        let claim = Claim { connection: e.connection, owner: e.owner, action: e.action };
        // The upsert counted nothing yet: the displaced claim goes back as it was.
        if e.connection.is_ipv4() {
            let LookupKey::V4([a, _]) = LookupKey::of(connection) else { unreachable!() };
            self.v4.upsert([a, m]);
        } else {
            let LookupKey::V6([a, b, c, d, _]) = LookupKey::of(connection) else { unreachable!() };
            self.v6.upsert([a, b, c, d, m]);
        }
        claim
    }

    /// Withdraws `owner`'s claim on `connection`; when it owned the connection, the next
    /// claim (lowest member id) takes over.
    pub fn remove(&self, connection: &Connection, owner: MemberId) -> RemoveOutcome {
        let key = contest_key(connection);
        let mut map = self.stripe(&key);
        self.remove_locked(&mut map, key, connection, owner)
    }

    /// [`ConnectionDatabase::remove`] with the key's stripe locked (`map`).
    fn remove_locked(
        &self,
        map: &mut HashMap<LookupKey, Contest>,
        key: LookupKey,
        connection: &Connection,
        owner: MemberId,
    ) -> RemoveOutcome {
        let Some(contest) = map.get_mut(&key) else {
            let allow = |m: u64| owner_of(m) == owner;
            let r = if connection.is_ipv4() {
                self.v4
                    .remove_if(&v4_slot(connection, owner, Action::Forward, 0), |s| allow(s[1]))
                    .map(|(s, ok)| (s[1], ok))
            } else {
                self.v6
                    .remove_if(&v6_slot(connection, owner, Action::Forward, 0), |s| allow(s[4]))
                    .map(|(s, ok)| (s[4], ok))
            };
            return match r {
                None => RemoveOutcome::NotFound,
                Some((m, true)) => {
                    self.count(owner_of(m), action_of(m), -1);
                    RemoveOutcome::Removed
                }
                Some((m, false)) => RemoveOutcome::NotOwner(owner_of(m)),
            };
        };
        let had = contest.claims.len();
        contest.claims.retain(|c| c.owner != owner);
        if contest.claims.len() == had {
            return match self.main_of(connection) {
                Some((o, _, _)) => RemoveOutcome::NotOwner(o),
                None => RemoveOutcome::NotFound,
            };
        }
        if contest.claims.is_empty() && !contest.local {
            self.clear_main(connection);
        } else {
            self.settle(connection, map.get(&key).expect("contested"));
        }
        self.tidy(map, &key);
        RemoveOutcome::Removed
    }

    /// The entry for a packet of `connection`, in either direction. Never blocks.
    #[inline]
    pub fn lookup(&self, connection: &Connection) -> Option<Entry> {
        if connection.is_ipv4() {
            self.v4.get(&v4_slot(connection, MemberId(0), Action::Forward, 0)).map(|s| v4_entry(&s))
        } else {
            self.v6.get(&v6_slot(connection, MemberId(0), Action::Forward, 0)).map(|s| v6_entry(&s))
        }
    }

    /// Owner and action for a packet of `connection`, without building an [`Entry`]: the
    /// packet path's lookup.
    #[inline]
    pub fn owner_of(&self, connection: &Connection) -> Option<(MemberId, Action)> {
        self.owner_of_key(&LookupKey::of(connection))
    }

    /// [`ConnectionDatabase::owner_of`] with the key already built.
    #[inline]
    pub fn owner_of_key(&self, key: &LookupKey) -> Option<(MemberId, Action)> {
        let m = match key {
            LookupKey::V4(k) => self.v4.get(k)?[1],
            LookupKey::V6(k) => self.v6.get(k)?[4],
        };
        Some((owner_of(m), action_of(m)))
    }

    /// Starts loading the memory a lookup of `connection` will read (see
    /// [`crate::table::FlowTable::prefetch`]).
    #[inline]
    pub fn prefetch(&self, connection: &Connection) {
        self.prefetch_key(&LookupKey::of(connection))
    }

    /// [`ConnectionDatabase::prefetch`] with the key already built.
    #[inline]
    pub fn prefetch_key(&self, key: &LookupKey) {
        match key {
            LookupKey::V4(k) => self.v4.prefetch(k),
            LookupKey::V6(k) => self.v6.prefetch(k),
        }
    }

    /// Drops every entry of `owner` (a peer that left or died). Returns how many.
    pub fn purge_owner(&self, owner: MemberId) -> usize {
        let n = self.v4.purge(|s| owner_of(s[1]) == owner) + self.v6.purge(|s| owner_of(s[4]) == owner);
        for action in [Action::Forward, Action::Bypass] {
            self.counts[owner.0 as usize][(action == Action::Bypass) as usize].store(0, Ordering::Relaxed);
        }
        if self.contested() > 0 {
            // The purged member's waiting claims go too; where it owned a contested
            // connection, the next claim takes over.
            for stripe in self.contests.iter() {
                let mut map = stripe.lock().unwrap_or_else(|e| e.into_inner());
                let keys: Vec<LookupKey> =
                    map.iter().filter(|(_, c)| c.claims.iter().any(|x| x.owner == owner)).map(|(k, _)| *k).collect();
                for k in keys {
                    let c = map.get_mut(&k).expect("listed");
                    let connection = c.claims[0].connection;
                    c.claims.retain(|x| x.owner != owner);
                    if !c.claims.is_empty() || c.local {
                        self.settle(&connection, map.get(&k).expect("listed"));
                    }
                    if map.get(&k).is_some_and(|c| c.claims.is_empty() && !c.local) {
                        map.remove(&k);
                        self.contested.fetch_sub(1, Ordering::Relaxed);
                    } else {
                        self.tidy(&mut map, &k);
                    }
                }
            }
        }
        n
    }

    /// Graceful restart: marks every entry of `owner` stale, keeping it, by giving it one
    /// install time no fresh install can have for 12 days (the second before now). Entries
    /// the owner installs again get the current time. Returns the stamp for
    /// [`ConnectionDatabase::purge_stale`] and how many entries it marked.
    pub fn mark_stale(&self, owner: MemberId) -> (u32, usize) {
        let stamp = self.now_secs().wrapping_sub(1) & TIME_MASK as u32;
        let restamp = |m: u64| (owner_of(m) == owner).then_some((m & !TIME_MASK) | stamp as u64);
        let n = self.v4.update(|s| restamp(s[1])) + self.v6.update(|s| restamp(s[4]));
        (stamp, n)
    }

    /// Graceful restart, at the end of the grace period: removes the entries of `owner` still
    /// marked with `stamp` (not installed again since [`ConnectionDatabase::mark_stale`]),
    /// each as its REMOVE would (a waiting claim takes over). Returns how many.
    pub fn purge_stale(&self, owner: MemberId, stamp: u32) -> usize {
        let is_stale = |e: &Entry| e.owner == owner && e.installed_at == stamp;
        let mut doomed = Vec::new();
        self.for_each(|e| {
            if is_stale(&e) {
                doomed.push(e.connection);
            }
        });
        let mut removed = 0;
        for c in doomed {
            let key = contest_key(&c);
            let mut map = self.stripe(&key);
            // Checked again under the stripe lock: an install since the scan refreshed it.
            let still = self.lookup(&c).is_some_and(|e| is_stale(&e));
            if still && self.remove_locked(&mut map, key, &c, owner) == RemoveOutcome::Removed {
                removed += 1;
            }
        }
        removed
    }

    /// Calls `f` for every entry.
    pub fn for_each(&self, mut f: impl FnMut(Entry)) {
        self.v4.for_each(|s| f(v4_entry(s)));
        self.v6.for_each(|s| f(v6_entry(s)));
    }

    /// Calls `f` for every entry of part `part` (below [`PARTS`]): the IPv4 table's shards
    /// first, then the IPv6 table's. Visiting every part in turn sees every entry present
    /// throughout, without copying the table (a table sync streams it this way).
    pub fn for_each_in_part(&self, part: usize, mut f: impl FnMut(Entry)) {
        if part < SHARDS {
            self.v4.for_each_in_shard(part, |s| f(v4_entry(s)));
        } else {
            self.v6.for_each_in_shard(part - SHARDS, |s| f(v6_entry(s)));
        }
    }

    /// Every entry of `owner`, for a table sync.
    pub fn entries_of(&self, owner: MemberId) -> Vec<(Connection, Action)> {
        let mut v = Vec::with_capacity(self.count_of(owner, Action::Forward) + self.count_of(owner, Action::Bypass));
        self.v4.for_each(|s| {
            if owner_of(s[1]) == owner {
                let e = v4_entry(s);
                v.push((e.connection, e.action));
            }
        });
        self.v6.for_each(|s| {
            if owner_of(s[4]) == owner {
                let e = v6_entry(s);
                v.push((e.connection, e.action));
            }
        });
        v
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when there is no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries owned by `owner` with `action`.
    pub fn count_of(&self, owner: MemberId, action: Action) -> usize {
        self.counts[owner.0 as usize][(action == Action::Bypass) as usize].load(Ordering::Relaxed).max(0) as usize
    }

    /// Bytes held by the tables.
    pub fn memory_bytes(&self) -> usize {
        self.v4.memory_bytes() + self.v6.memory_bytes()
    }

    /// An order-independent digest of (connection, owner, action) over all entries, to
    /// compare the databases of two members.
    pub fn digest(&self) -> u64 {
        let mut d = 0u64;
        self.for_each(|e| d = d.wrapping_add(entry_digest(&e)));
        d
    }
}

/// Digest of one entry, independent of install time.
pub fn entry_digest(e: &Entry) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let canonical = if e.connection.src() <= e.connection.dst() { e.connection } else { e.connection.reversed() };
    BuildHasherDefault::<DefaultHasher>::default().hash_one((canonical, e.owner, e.action))
}

/// The member's own connections (paper 2.5: kept apart from the cluster database).
pub struct ConnectionTable {
    db: ConnectionDatabase,
    me: MemberId,
    /// Bumped by every change, so a saver can tell whether there is anything new to save.
    generation: AtomicUsize,
}

impl ConnectionTable {
    /// An empty table for member `me`.
    pub fn new(me: MemberId) -> Self {
        ConnectionTable { db: ConnectionDatabase::new(), me, generation: AtomicUsize::new(0) }
    }

    /// Adds or updates a local connection; true when it is new or its action changed.
    pub fn insert(&self, connection: &Connection, action: Action) -> bool {
        let changed = self.db.install(connection, self.me, action) != InstallOutcome::Unchanged;
        if changed {
            self.generation.fetch_add(1, Ordering::Release);
        }
        changed
    }

    /// Removes a local connection; returns its action if it was there.
    pub fn remove(&self, connection: &Connection) -> Option<Action> {
        let action = self.db.owner_of(connection)?.1;
        let removed = self.db.remove(connection, self.me) == RemoveOutcome::Removed;
        if removed {
            self.generation.fetch_add(1, Ordering::Release);
        }
        removed.then_some(action)
    }

    /// Changes so far (inserts and removes that changed the table); equal readings mean no
    /// change in between.
    pub fn generation(&self) -> usize {
        self.generation.load(Ordering::Acquire)
    }

    /// The action for a packet of a local connection, in either direction. Never blocks.
    #[inline]
    pub fn lookup(&self, connection: &Connection) -> Option<Action> {
        self.db.owner_of(connection).map(|(_, a)| a)
    }

    /// [`ConnectionTable::lookup`] with the key already built.
    #[inline]
    pub fn lookup_key(&self, key: &LookupKey) -> Option<Action> {
        self.db.owner_of_key(key).map(|(_, a)| a)
    }

    /// The full entry (with direction and install time) of a local connection.
    pub fn entry(&self, connection: &Connection) -> Option<Entry> {
        self.db.lookup(connection)
    }

    /// The install clock of this table, as [`ConnectionDatabase::now_secs`].
    pub fn entry_now_secs(&self) -> u32 {
        self.db.now_secs()
    }

    /// Every local connection, for a table sync.
    pub fn snapshot(&self) -> Vec<(Connection, Action)> {
        self.db.entries_of(self.me)
    }

    /// Calls `f` for every local entry.
    pub fn for_each(&self, f: impl FnMut(Entry)) {
        self.db.for_each(f)
    }

    /// Calls `f` for every local entry of one part, as [`ConnectionDatabase::for_each_in_part`].
    pub fn for_each_in_part(&self, part: usize, f: impl FnMut(Entry)) {
        self.db.for_each_in_part(part, f)
    }

    /// Number of local connections.
    pub fn len(&self) -> usize {
        self.db.len()
    }

    /// True when there is no local connection.
    pub fn is_empty(&self) -> bool {
        self.db.is_empty()
    }

    /// Local connections with `action`.
    pub fn count_of(&self, action: Action) -> usize {
        self.db.count_of(self.me, action)
    }

    /// Bytes held by the table.
    pub fn memory_bytes(&self) -> usize {
        self.db.memory_bytes()
    }

    /// Digest as [`ConnectionDatabase::digest`].
    pub fn digest(&self) -> u64 {
        self.db.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: Protocol, s: &str, d: &str) -> Connection {
        Connection::new(p, s.parse().unwrap(), d.parse().unwrap()).unwrap()
    }

    #[test]
    fn both_directions_find_the_entry() {
        let db = ConnectionDatabase::new();
        for conn in [
            c(Protocol::Tcp, "198.51.100.9:80", "192.0.2.1:40000"),
            c(Protocol::Udp, "[2001:db8::9]:53", "[2001:db8::1]:5353"),
        ] {
            assert_eq!(db.install(&conn, MemberId(3), Action::Forward), InstallOutcome::New);
            let e = db.lookup(&conn.reversed()).expect("reverse direction");
            assert_eq!(e.connection, conn, "originator's direction is kept");
            assert_eq!((e.owner, e.action), (MemberId(3), Action::Forward));
            assert_eq!(db.owner_of(&conn), Some((MemberId(3), Action::Forward)));
        }
        let other_proto = c(Protocol::Udp, "198.51.100.9:80", "192.0.2.1:40000");
        assert_eq!(db.lookup(&other_proto), None, "protocol is part of the key");
        assert_eq!(db.count_of(MemberId(3), Action::Forward), 2);
    }

    #[test]
    fn only_the_owner_removes_and_purge_drops_one_member() {
        let db = ConnectionDatabase::new();
        let a = c(Protocol::Tcp, "192.0.2.1:1", "192.0.2.2:2");
        let b = c(Protocol::Tcp, "192.0.2.1:3", "192.0.2.2:4");
        db.install(&a, MemberId(1), Action::Forward);
        db.install(&b, MemberId(2), Action::Bypass);
        assert_eq!(db.remove(&a, MemberId(2)), RemoveOutcome::NotOwner(MemberId(1)));
        // A second claim waits behind the lower member's.
        assert_eq!(db.install(&a, MemberId(2), Action::Forward), InstallOutcome::Contested { owner: MemberId(1) });
        assert_eq!(db.purge_owner(MemberId(2)), 1);
        assert_eq!(db.len(), 1);
        assert_eq!(db.owner_of(&a), Some((MemberId(1), Action::Forward)));
        assert_eq!(db.remove(&a, MemberId(2)), RemoveOutcome::NotOwner(MemberId(1)));
        assert_eq!(db.count_of(MemberId(2), Action::Bypass), 0);
        assert_eq!(db.purge_owner(MemberId(1)), 1);
        assert!(db.is_empty());
        assert_eq!(db.remove(&a, MemberId(1)), RemoveOutcome::NotFound);
    }

    #[test]
    fn digest_ignores_order_and_direction() {
        let (x, y) = (ConnectionDatabase::new(), ConnectionDatabase::new());
        let conns: Vec<_> =
            (0..100).map(|i| c(Protocol::Tcp, &format!("192.0.2.1:{}", 1000 + i), "192.0.2.2:80")).collect();
        for k in &conns {
            x.install(k, MemberId(1), Action::Forward);
        }
        for k in conns.iter().rev() {
            y.install(k, MemberId(1), Action::Forward);
        }
        assert_eq!(x.digest(), y.digest());
        y.install(&conns[0], MemberId(1), Action::Bypass);
        assert_ne!(x.digest(), y.digest());
    }

    #[test]
    fn a_million_ipv4_entries_fit_in_32_bytes_each() {
        // The paper's figure (section 3): about 32 bytes per IPv4 connection state.
        let db = ConnectionDatabase::new();
        for i in 0..1_000_000u32 {
            let src = SocketAddr::new(Ipv4Addr::from(0xC612_0000 | (i >> 12)).into(), 1024 + (i & 0xfff) as u16);
            let conn = Connection::new(Protocol::Tcp, src, "203.0.113.1:443".parse().unwrap()).unwrap();
            db.install(&conn, MemberId((i % 20) as u8), Action::Forward);
        }
        assert_eq!(db.len(), 1_000_000);
        let per_entry = db.memory_bytes() as f64 / db.len() as f64;
        assert!(per_entry <= 32.0, "{per_entry:.1} bytes per entry");
    }

    #[test]
    fn local_table() {
        let t = ConnectionTable::new(MemberId(0));
        let a = c(Protocol::Tcp, "192.0.2.1:1", "192.0.2.2:2");
        assert!(t.insert(&a, Action::Forward));
        assert!(!t.insert(&a, Action::Forward));
        assert_eq!(t.lookup(&a.reversed()), Some(Action::Forward));
        assert_eq!(t.snapshot(), vec![(a, Action::Forward)]);
        assert_eq!(t.remove(&a), Some(Action::Forward));
        assert_eq!(t.remove(&a), None);
    }

    #[test]
    fn concurrent_claims_go_to_the_lowest_member_in_any_order_and_removes_hand_over() {
        let conn = c(Protocol::Tcp, "192.0.2.1:40000", "198.51.100.7:80");
        for order in [[1u8, 2, 3], [3, 2, 1], [2, 3, 1], [2, 1, 3]] {
            let db = ConnectionDatabase::new();
            for o in order {
                db.install(&conn, MemberId(o), Action::Forward);
            }
            assert_eq!(db.owner_of(&conn), Some((MemberId(1), Action::Forward)), "order {order:?}");
            assert_eq!(db.count_of(MemberId(1), Action::Forward), 1);
            assert_eq!((db.len(), db.contested()), (1, 1));
            // The owner's REMOVE hands the connection to the next claim; a waiting claim's
            // REMOVE changes nothing visible.
            assert_eq!(db.remove(&conn, MemberId(3)), RemoveOutcome::Removed);
            assert_eq!(db.owner_of(&conn), Some((MemberId(1), Action::Forward)));
            assert_eq!(db.remove(&conn, MemberId(1)), RemoveOutcome::Removed);
            assert_eq!(db.owner_of(&conn.reversed()), Some((MemberId(2), Action::Forward)));
            assert_eq!((db.count_of(MemberId(1), Action::Forward), db.count_of(MemberId(2), Action::Forward)), (0, 1));
            assert_eq!(db.contested(), 0, "one claim left: no contest");
            assert_eq!(db.remove(&conn, MemberId(2)), RemoveOutcome::Removed);
            assert!(db.is_empty());
        }
    }

    #[test]
    fn purging_the_owner_of_a_contested_connection_hands_it_over() {
        let db = ConnectionDatabase::new();
        let conn = c(Protocol::Udp, "[2001:db8::1]:53", "[2001:db8::2]:5353");
        db.install(&conn, MemberId(4), Action::Bypass);
        db.install(&conn, MemberId(2), Action::Forward);
        assert_eq!(db.purge_owner(MemberId(2)), 1);
        assert_eq!(db.owner_of(&conn), Some((MemberId(4), Action::Bypass)));
        assert_eq!(db.count_of(MemberId(4), Action::Bypass), 1);
        assert_eq!(db.contested(), 0);
    }

    #[test]
    fn a_members_own_claim_takes_part() {
        let db = ConnectionDatabase::for_member(MemberId(2));
        let conn = c(Protocol::Tcp, "192.0.2.1:1", "192.0.2.2:2");
        // A higher member's claim yields to ours: the table keeps no peer claim for it.
        db.install(&conn, MemberId(5), Action::Forward);
        assert_eq!(db.local_claimed(&conn), MemberId(2));
        assert_eq!(db.lookup(&conn), None);
        assert_eq!(db.count_of(MemberId(5), Action::Forward), 0);
        // A lower member's claim beats ours.
        assert_eq!(db.install(&conn, MemberId(1), Action::Forward), InstallOutcome::New);
        assert_eq!(db.local_claimed(&conn), MemberId(1));
        db.local_ended(&conn);
        assert_eq!(db.owner_of(&conn), Some((MemberId(1), Action::Forward)));
        // When the winner goes, the waiting higher claim takes over.
        db.remove(&conn, MemberId(1));
        assert_eq!(db.owner_of(&conn), Some((MemberId(5), Action::Forward)));
    }

    /// Graceful restart: a restarting owner's entries stay, marked stale; those it installs
    /// again lose the mark; the rest go at the end of the grace period, each as its REMOVE
    /// would (a waiting claim takes over a contested one).
    #[test]
    fn stale_entries_not_installed_again_are_purged() {
        let db = ConnectionDatabase::new();
        let conn = |i: u16| c(Protocol::Tcp, &format!("192.0.2.1:{}", 1000 + i), "198.51.100.1:80");
        for i in 0..100 {
            db.install(&conn(i), MemberId(1), if i % 2 == 0 { Action::Forward } else { Action::Bypass });
        }
        // Contested: member 1 owns 200 (lower id), 3 waits; member 1 owns 201, 3 waits.
        for i in [200, 201] {
            db.install(&conn(i), MemberId(3), Action::Forward);
            db.install(&conn(i), MemberId(1), Action::Forward);
            assert_eq!(db.owner_of(&conn(i)), Some((MemberId(1), Action::Forward)));
        }
        let (stamp, marked) = db.mark_stale(MemberId(1));
        assert_eq!(marked, 102);
        assert_eq!(db.count_of(MemberId(1), Action::Forward) + db.count_of(MemberId(1), Action::Bypass), 102, "kept");
        for i in 0..40 {
            db.install(&conn(i), MemberId(1), Action::Forward);
        }
        db.install(&conn(201), MemberId(1), Action::Forward);
        db.install(&conn(500), MemberId(1), Action::Forward);
        assert_eq!(db.purge_stale(MemberId(1), stamp), 60 + 1);
        assert!(db.lookup(&conn(50)).is_none() && db.lookup(&conn(10)).is_some() && db.lookup(&conn(500)).is_some());
        assert_eq!(db.owner_of(&conn(200)), Some((MemberId(3), Action::Forward)), "the waiting claim took over");
        assert_eq!(db.owner_of(&conn(201)), Some((MemberId(1), Action::Forward)), "claimed again: kept");
        assert_eq!(db.count_of(MemberId(1), Action::Forward), 40 + 2);
        assert_eq!(db.count_of(MemberId(1), Action::Bypass), 0);
        assert_eq!(db.purge_stale(MemberId(1), stamp), 0, "nothing stale left");
    }

    proptest::proptest! {
        /// Every member applies the claims of each peer in that peer's order (one channel
        /// per peer), but the channels interleave at random: the table ends the same.
        #[test]
        fn claims_settle_the_same_whatever_the_interleaving(
            ops in proptest::collection::vec((1u8..5, 0usize..3, proptest::bool::ANY, proptest::bool::ANY), 0..60),
            picks_a in proptest::collection::vec(0usize..4, 0..200),
            picks_b in proptest::collection::vec(0usize..4, 0..200),
        ) {
            let conns = [
                c(Protocol::Tcp, "192.0.2.1:1000", "198.51.100.1:80"),
                c(Protocol::Tcp, "198.51.100.1:80", "192.0.2.1:1000"),
                c(Protocol::Udp, "[2001:db8::1]:53", "[2001:db8::2]:53"),
            ];
            // Per owner: its own sequence of claims and withdrawals.
            let mut per_owner: Vec<Vec<(usize, bool, bool)>> = vec![Vec::new(); 5];
            for (o, k, install, bypass) in ops {
                per_owner[o as usize].push((k, install, bypass));
            }
            let run = |picks: &[usize]| {
                let db = ConnectionDatabase::new();
                let mut at = [0usize; 5];
                let apply = |o: usize, at: &mut [usize; 5]| {
                    let (k, install, bypass) = per_owner[o][at[o]];
                    at[o] += 1;
                    if install {
                        db.install(&conns[k], MemberId(o as u8), if bypass { Action::Bypass } else { Action::Forward });
                    } else {
                        db.remove(&conns[k], MemberId(o as u8));
                    }
                };
                for &p in picks {
                    let o = p + 1;
                    if at[o] < per_owner[o].len() {
                        apply(o, &mut at);
                    }
                }
                for o in 1..5 {
                    while at[o] < per_owner[o].len() {
                        apply(o, &mut at);
                    }
                }
                let view: Vec<_> = conns.iter().map(|k| db.owner_of(k)).collect();
                let counts: Vec<_> = (1..5).map(|o| db.count_of(MemberId(o), Action::Forward) + db.count_of(MemberId(o), Action::Bypass)).collect();
                (view, counts, db.len(), db.digest())
            };
            let (a, b) = (run(&picks_a), run(&picks_b));
            proptest::prop_assert_eq!(&a, &b);
            // The counts agree with the table.
            proptest::prop_assert_eq!(a.1.iter().sum::<usize>(), a.2);
        }

        /// A batch of one peer's claims (a table sync's INSTALLs, with repeats, action changes,
        /// contests and this member's own claims already there) does what the same installs
        /// do one at a time: the same outcomes, table and counts.
        #[test]
        fn install_many_is_installs_one_at_a_time(
            before in proptest::collection::vec((0u8..4, 0usize..40, proptest::bool::ANY), 0..80),
            local in proptest::collection::vec(0usize..40, 0..10),
            batch in proptest::collection::vec((0usize..40, proptest::bool::ANY), 1..300),
            peer in 1u8..4,
        ) {
            let conn = |k: usize| {
                if k % 3 == 2 {
                    c(Protocol::Udp, &format!("[2001:db8::{}]:53", k + 1), "[2001:db8::ff]:53")
                } else {
                    c(Protocol::Tcp, &format!("192.0.2.{}:{}", k + 1, 1000 + k), "198.51.100.1:80")
                }
            };
            let action = |bypass: bool| if bypass { Action::Bypass } else { Action::Forward };
            let setup = || {
                let db = ConnectionDatabase::for_member(MemberId(2));
                for &(o, k, bypass) in &before {
                    db.install(&conn(k), MemberId(o), action(bypass));
                }
                for &k in &local {
                    db.local_claimed(&conn(k));
                }
                db
            };
            let items: Vec<(Connection, Action)> = batch.iter().map(|&(k, b)| (conn(k), action(b))).collect();
            let (one, many) = (setup(), setup());
            let t = one.now_secs();
            let singly: Vec<InstallOutcome> = items.iter().map(|(c, a)| one.install_at(c, MemberId(peer), *a, t)).collect();
            let mut outcomes = Vec::new();
            many.install_many(&items, MemberId(peer), t, &mut outcomes);
            proptest::prop_assert_eq!(&outcomes, &singly);
            proptest::prop_assert_eq!(many.digest(), one.digest());
            proptest::prop_assert_eq!(many.contested(), one.contested());
            for o in 0..4 {
                for a in [Action::Forward, Action::Bypass] {
                    proptest::prop_assert_eq!(many.count_of(MemberId(o), a), one.count_of(MemberId(o), a));
                }
            }
        }
    }
}
