//! The affinity engine: which member should own a new flow, by whose compression dictionary
//! is best for the flow's client/server pair, bounded by load (paper sections 1.2 and 3:
//! the WAN-optimization module picks the member with the better dictionary and the connection
//! is installed off-box, "connection handoff").
//!
//! The module is split by concern:
//! - [`pair`]: what a pair is, from a connection and the [`PairGranularity`];
//! - [`decay`]: exponential decay with a half-life ([`Decay`], [`DecayedBytes`]);
//! - [`advert`]: the DICT_STATS and LOAD messages that carry savings and loads between members;
//! - [`ledger`]: a member's own savings per pair ([`SavingsLedger`]), the source of its DICT_STATS;
//! - [`engine`]: the [`AffinityEngine`], its inputs, its decision and its [`Reason`]s.
//!
//! Every public item is re-exported here, so `dictionary_affinity::affinity::X` names it.

pub mod advert;
pub mod decay;
pub mod engine;
pub mod ledger;
pub mod pair;

pub use advert::*;
pub use decay::*;
pub use engine::*;
pub use ledger::*;
pub use pair::*;
