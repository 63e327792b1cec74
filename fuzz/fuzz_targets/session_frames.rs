//! The peer session state machine fed arbitrary bytes in arbitrary pieces, as acceptor and
//! initiator, with timers firing in between: never panics, never reports an event after
//! closing, and only members' sessions ever install anything.
#![no_main]

use std::time::{Duration, Instant};

use cluster_proto::session::{Admission, Event, Role, Session, SessionConfig};
use cluster_proto::MemberId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let role = if mode & 1 == 0 { Role::Acceptor } else { Role::Initiator };
    let admission = if mode & 2 == 0 { Admission::Member } else { Admission::NotMember };
    let t0 = Instant::now();
    let mut now = t0;
    // Bit 2: the member speaks up to version 2 (advertisements), its peer being member 1.
    let version = if mode & 4 == 0 { 1 } else { 2 };
    let config = SessionConfig { version, ..SessionConfig::default() };
    let mut s = Session::new(role, admission, config, now).with_peer_member(MemberId(1));
    let mut closed = false;
    let mut at = 0;
    while at < rest.len() {
        let take = 1 + (rest[at] as usize % 23);
        let end = (at + 1 + take).min(rest.len());
        s.handle_bytes(now, &rest[at + 1..end.max(at + 1)]);
        at = end;
        while let Some(e) = s.poll_event() {
            assert!(!closed, "event after close: {e:?}");
            match e {
                Event::JoinRequested => s.accept(now),
                Event::Joined => s.send_table(now, &[]),
                // Only an acceptor judges membership (an initiator dialed a member).
                Event::Install { .. } | Event::Remove { .. } if role == Role::Acceptor => {
                    assert_eq!(admission, Admission::Member)
                }
                Event::Install { .. } | Event::Remove { .. } => {}
                Event::Advertisement(bytes) => {
                    assert!(s.version() >= 2, "advertisement at version {}", s.version());
                    assert_eq!(bytes[2], 1, "an advertisement for another member passed");
                }
                Event::Closed(_) => closed = true,
                Event::Established => {}
            }
        }
        if let Some(b) = s.poll_transmit() {
            let n = b.len();
            s.advance_transmit(n);
        }
        now += Duration::from_millis(mode as u64 * 7);
        if let Some(t) = s.poll_timeout() {
            if t <= now {
                s.handle_timeout(now);
            }
        }
    }
});
