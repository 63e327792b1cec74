//! The Fig. 2 part of `lb demo`: one downstream proxy downloads objects through the demo's
//! members acting as upstream proxies, chosen for every new connection by two
//! load-balancing members' owner policies: first a 5-tuple hash, then dictionary affinity.
//! Everything on the way is the real code: the redundancy-elimination codec with one
//! dictionary per downstream/upstream pair, each upstream's savings ledger, DICT_STATS
//! advertisements through the demo's control channels (version 2), the affinity engine and the
//! data plane's owner steering. Only the packets are left out: each download is encoded by the
//! chosen upstream and decoded at the downstream in memory.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cluster_proto::mesh::Mesh;
use cluster_proto::{Connection, MemberId, Protocol};
use dictionary_affinity::affinity::{decode_advertisement, encode_advertisement, AffinityConfig, AffinityEngine};
use dictionary_affinity::sample::Rng;
use dictionary_affinity::{Decoder, DecoderConfig, Encoder, EncoderConfig, Store};
use handoff::policy::OwnerPolicy;

use crate::affinity::Savings;
use crate::steering::{PolicyKind, Steering, SteeringPolicy};

const SITES: u8 = 4;
const SERVERS: u8 = 3;
const OBJECTS: u32 = 4;
const OBJECT: usize = 64 * 1024;
const ROUNDS: usize = 3;
const BUDGET: u64 = 64 << 20;

/// One upstream member: its dictionary with the downstream (response direction) and its ledger.
struct Upstream {
    encoder: Encoder,
    decoder_at_downstream: Decoder,
    savings: Savings,
    connections: u64,
}

/// The outcome of one policy's run.
pub struct Fig2Outcome {
    /// Policy name.
    pub policy: &'static str,
    /// Object bytes per round.
    pub object_bytes: u64,
    /// Wire bytes of the first round.
    pub first: u64,
    /// Wire bytes of the repeat rounds.
    pub repeats: u64,
    /// Connections per upstream member.
    pub per_upstream: Vec<u64>,
    /// Owner decisions by reason, summed over both balancers.
    pub decisions: Vec<(&'static str, u64)>,
}

/// Each site fetches its own objects (mailboxes, reports), so only the dictionary of the
/// upstream that served this site before can shrink them.
fn object(site: u8, server: u8, id: u32) -> Vec<u8> {
    Rng(u64::from(site) << 40 | u64::from(server) << 32 | u64::from(id)).bytes(OBJECT)
}

/// Runs the downloads under `policy` ("rendezvous" or "affinity"); fresh dictionaries.
pub async fn run_policy(meshes: &[Mesh], policy: &'static str) -> anyhow::Result<Fig2Outcome> {
    let members: Vec<MemberId> = meshes.iter().map(|m| m.me()).collect();
    let config = AffinityConfig { load_slack: 4.0, ..AffinityConfig::default() };
    // Two load-balancing members (the first two meshes), each with its own engine fed only by
    // what arrives over its control channels.
    let engines: Vec<Arc<AffinityEngine>> = (0..2).map(|_| Arc::new(AffinityEngine::new(config))).collect();
    let balancers: Vec<SteeringPolicy> = engines
        .iter()
        .map(|e| {
            let kind = if policy == "affinity" { PolicyKind::Affinity(e.clone()) } else { PolicyKind::Rendezvous };
            SteeringPolicy(Arc::new(Steering::new(kind, None, Duration::from_secs(60), 1 << 16)))
        })
        .collect();
    let received = Arc::new(Mutex::new(0u64));
    for (i, e) in engines.iter().enumerate() {
        let (e, received) = (e.clone(), received.clone());
        meshes[i].set_advertisement_listener(Box::new(move |_from, bytes| {
            if let Ok(adv) = decode_advertisement(bytes) {
                e.apply(Instant::now(), &adv);
                *received.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            }
        }));
    }
    let epoch = Savings::epoch_now();
    let mut upstreams: Vec<Upstream> = members
        .iter()
        .map(|_| -> anyhow::Result<Upstream> {
            Ok(Upstream {
                encoder: Encoder::new(Store::new(BUDGET), EncoderConfig::default())?,
                decoder_at_downstream: Decoder::new(Store::new(BUDGET), DecoderConfig::default()),
                savings: Savings::new(config.granularity, config.half_life, 4096, epoch),
                connections: 0,
            })
        })
        .collect::<anyhow::Result<_>>()?;

    let object_bytes = u64::from(SITES) * u64::from(SERVERS) * u64::from(OBJECTS) * OBJECT as u64;
    let (mut first, mut repeats) = (0u64, 0u64);
    let mut port = 40_000u16;
    for round in 0..ROUNDS {
        let mut wire_round = 0u64;
        for id in 0..OBJECTS {
            for site in 0..SITES {
                for server in 0..SERVERS {
                    port = port.wrapping_add(1).max(1024);
                    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2 + site, 10)), port);
                    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 80 + server)), 80);
                    let c = Connection::new(Protocol::Tcp, client, dst).context("one family")?;
                    // The downstream's connections alternate between the two balancers.
                    let lb = &balancers[usize::from(port % 2)];
                    let owner = lb.choose(&c, &members, members[usize::from(port % 2)]).owner;
                    let u = &mut upstreams[usize::from(owner.0)];
                    u.connections += 1;
                    let data = object(site, server, id);
                    let mut wire = Vec::new();
                    u.encoder.encode(&data, &mut wire);
                    u.encoder.flush(&mut wire);
                    let mut out = Vec::with_capacity(OBJECT);
                    u.decoder_at_downstream.decode(&wire, &mut out).context("downstream decoder")?;
                    if out != data {
                        bail!(
                            "object {id} of server {server} for site {site} came out wrong through member {}",
                            owner.0
                        );
                    }
                    wire_round += wire.len() as u64;
                    u.savings.record(
                        Instant::now(),
                        client,
                        dst,
                        (data.len() as u64).saturating_sub(wire.len() as u64),
                    );
                }
            }
            // Each upstream advertises what changed, as its timer would.
            for (m, u) in members.iter().zip(&upstreams) {
                let stats = u.savings.ledger().advertise(Instant::now(), *m, u.savings.epoch());
                if !stats.is_empty() {
                    meshes[usize::from(m.0)]
                        .advertise(&encode_advertisement(&stats, &[]))
                        .context("advertising dictionary statistics")?;
                }
            }
            // Let the advertisements cross the control channels before the next connections.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        if round == 0 {
            first = wire_round;
        } else {
            repeats += wire_round;
        }
    }
    let mut decisions: Vec<(&'static str, u64)> = Vec::new();
    for b in &balancers {
        for (r, n) in b.0.decisions() {
            match decisions.iter_mut().find(|d| d.0 == r) {
                Some(d) => d.1 += n,
                None => decisions.push((r, n)),
            }
        }
    }
    for m in meshes.iter().take(2) {
        m.set_advertisement_listener(Box::new(|_, _| {}));
    }
    Ok(Fig2Outcome {
        policy,
        object_bytes,
        first,
        repeats,
        per_upstream: upstreams.iter().map(|u| u.connections).collect(),
        decisions,
    })
}

fn pct(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

/// Runs both policies and prints the comparison.
pub async fn fig2_in_memory(meshes: &[Mesh]) -> anyhow::Result<()> {
    println!(
        "\n  Fig. 2, dictionary affinity: 1 downstream proxy, the 3 members as upstream proxies, 2 of them also \
         balancing;\n  {SITES} client sites x {SERVERS} servers x {OBJECTS} objects of {} KiB, {ROUNDS} rounds \
         (real codec, ledgers, DICT_STATS over the control channels, owner steering)",
        OBJECT / 1024
    );
    println!(
        "\n  policy         first round  repeat rounds  (bytes on the wire / object bytes)  connections per upstream"
    );
    let mut outcomes = Vec::new();
    for policy in ["rendezvous", "affinity"] {
        let o = run_policy(meshes, policy).await?;
        let label = if policy == "rendezvous" { "5-tuple hash" } else { "affinity" };
        println!(
            "  {label:<14} {:>10.1}%  {:>12.1}%  {:>38}",
            pct(o.first, o.object_bytes),
            pct(o.repeats, o.object_bytes * (ROUNDS as u64 - 1)),
            o.per_upstream.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" / ")
        );
        outcomes.push(o);
    }
    let aff = &outcomes[1];
    let why: Vec<String> = aff.decisions.iter().map(|(r, n)| format!("{r} {n}")).collect();
    println!("  affinity decisions: {}", why.join(", "));
    Ok(())
}
