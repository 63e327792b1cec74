//! Admission of accepted control channels until their join completes.
//!
//! An accepted connection holds a [`Pending`] place from `accept` through the TLS handshake
//! (which has its own timeout) until its PEER_JOIN is answered. Places are counted per
//! source address, and members never compete with strangers:
//!
//! - a member's address has its own [`MEMBER_PENDING`] places, which no other address can
//!   take, so connections from strangers can never keep a member out;
//! - every other address (a stranger, told PEER_REJECT once it sends its PEER_JOIN) gets at
//!   most `max_pending_per_source` places, out of `max_pending_joins` shared by all strangers.
//!
//! A connection that finds no place is closed at once, without a reply.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Places reserved for each member's address: a restart's new channel while the old one's
/// close is still on its way, and both members dialing at once, fit with room to spare.
pub const MEMBER_PENDING: usize = 4;

/// Counts of accepted channels not yet joined.
pub(super) struct Admission {
    max_strangers: usize,
    max_per_source: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    strangers: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One accepted channel's place; given back when dropped (join done, or channel closed).
pub(super) struct Pending {
    admission: Arc<Admission>,
    source: IpAddr,
    stranger: bool,
}

impl Admission {
    /// `max_strangers` places shared by non-members, at most `max_per_source` per address.
    pub(super) fn new(max_strangers: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Admission { max_strangers, max_per_source, state: Mutex::new(State::default()) })
    }

    /// A place for a channel from `source` (`member`: the address is a member's), or the
    /// reason there is none.
    pub(super) fn admit(self: &Arc<Self>, source: IpAddr, member: bool) -> Result<Pending, &'static str> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let held = st.by_source.get(&source).copied().unwrap_or(0);
        if member {
            if held >= MEMBER_PENDING {
                return Err("too_many_pending_joins_from_member");
            }
        } else {
            if held >= self.max_per_source {
                return Err("too_many_pending_joins_from_source");
            }
            if st.strangers >= self.max_strangers {
                return Err("too_many_pending_joins");
            }
            st.strangers += 1;
        }
        *st.by_source.entry(source).or_default() += 1;
        Ok(Pending { admission: self.clone(), source, stranger: !member })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut st = self.admission.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.stranger {
            st.strangers -= 1;
        }
        if let Some(n) = st.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                st.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn strangers_are_capped_per_source_and_in_total_and_never_take_members_places() {
        let a = Admission::new(5, 2);
        let s1: Vec<_> = (0..2).map(|_| a.admit(ip("192.0.2.9"), false).unwrap()).collect();
        assert_eq!(a.admit(ip("192.0.2.9"), false).err(), Some("too_many_pending_joins_from_source"));
        let others: Vec<_> = (10..13).map(|i| a.admit(ip(&format!("192.0.2.{i}")), false).unwrap()).collect();
        assert_eq!(a.admit(ip("192.0.2.20"), false).err(), Some("too_many_pending_joins"));
        // Strangers hold every shared place: members still get theirs.
        let m: Vec<_> = (0..MEMBER_PENDING).map(|_| a.admit(ip("198.51.100.1"), true).unwrap()).collect();
        assert_eq!(a.admit(ip("198.51.100.1"), true).err(), Some("too_many_pending_joins_from_member"));
        assert!(a.admit(ip("198.51.100.2"), true).is_ok());
        // Places come back when dropped.
        drop(s1);
        drop(others);
        drop(m);
        assert!(a.state.lock().unwrap().by_source.is_empty());
        assert_eq!(a.state.lock().unwrap().strangers, 0);
        assert!(a.admit(ip("192.0.2.9"), false).is_ok());
    }
}
