//! Packet data plane (issue: data plane). Not built yet: classification, IP-in-IP handoff and the hold queue land here.
