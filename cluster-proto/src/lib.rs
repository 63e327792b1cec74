//! The cluster control protocol of "A Novel Approach to Manage Asymmetric Traffic Flows for
//! Secure Network Proxies" (Qing Li), version 1 byte-exact, and version 2 (version 1 plus the
//! DICT_STATS and LOAD advertisements, negotiated in PEER_JOIN): the wire codec ([`wire`]), the
//! sans-IO peer session ([`session`]), the connection database ([`database`]) and the tokio
//! mesh driver ([`mesh`]).

#![warn(missing_docs)]

pub mod database;
pub mod flow;
pub mod mesh;
pub mod session;
pub mod table;
pub mod wire;

pub use database::{ConnectionDatabase, ConnectionTable, Entry, LookupKey, MemberId};
pub use flow::{Action, Connection, Protocol};
pub use session::{Session, SessionConfig};
pub use wire::{ErrorCode, Message};
