//! The packet parser, classifier and engine on arbitrary bytes, at both hooks and through
//! the tunnel path, against a small database: never panics.
#![no_main]

use std::time::{Duration, Instant};

use cluster_proto::{Action, Connection, ConnectionDatabase, ConnectionTable, MemberId, Protocol};
use handoff::classify::{Classifier, Hook, View};
use handoff::engine::{Engine, EngineConfig};
use handoff::policy::{Rendezvous, RendezvousKey};
use handoff::track::TrackConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let local = ConnectionTable::new(MemberId(0));
    let db = ConnectionDatabase::new();
    let c = Connection::new(Protocol::Tcp, "192.0.2.1:1000".parse().unwrap(), "198.51.100.1:80".parse().unwrap()).unwrap();
    db.install(&c, MemberId(1), Action::Forward);
    local.insert(&c.reversed(), Action::Bypass);
    let live = [MemberId(0), MemberId(1)];
    let view = View { me: MemberId(0), local: &local, db: &db, live: &live };
    let config = EngineConfig {
        address: "198.18.0.1".parse().unwrap(),
        members: vec!["198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap()],
        hold_time: Duration::from_millis(10),
        hold_packets: 4,
        hold_bytes: 4096,
        mtu: Some(1280),
        track: TrackConfig::default(),
    };
    let mut e: Engine<Vec<u8>> = Engine::new(
        config,
        Classifier::new(Box::new(Rendezvous { key: RendezvousKey::Connection }), vec![], Duration::from_millis(10)),
    );
    let now = Instant::now();
    let mut out = Vec::new();
    for hook in [Hook::Prerouting, Hook::Output] {
        e.handle(now, &view, data.to_vec(), hook, &mut out);
    }
    e.handle_tunnel(now, &view, "198.18.0.2".parse().unwrap(), data, &mut out);
    e.on_install(now, &view, &c, &mut out);
    e.poll(now + Duration::from_millis(20), &view, &mut out);
    let _ = handoff::encap::decapsulate(data);
});
