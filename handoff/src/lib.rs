//! The packet data plane: parse packets into flows, classify them against the connection
//! database (paper 2.5), hand packets of other members' flows over in IP-in-IP, hold partial
//! flows while an INSTALL may be in transit (paper section 3), and the packet I/O backends.
//!
//! The core is sans-IO: [`classify::Classifier`] returns a [`classify::Verdict`] and the
//! I/O loop carries it out.

#![warn(missing_docs)]

pub mod classify;
pub mod driver;
pub mod encap;
pub mod engine;
pub mod hold;
pub mod io;
pub mod mss;
pub mod netns;
pub mod packet;
/// The owner-policy trait and the local and rendezvous policies (the `owner-policy` crate).
pub use owner_policy as policy;
pub mod track;

#[cfg(test)]
mod fixtures;
