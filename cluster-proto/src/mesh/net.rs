//! The listener on the cluster port and the per-member dialers.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};

use super::admission::Admission;
use super::channel::{self, Outcome};
use super::{Inner, MeshEvent, PeerState, Retries};
use crate::database::MemberId;
use crate::session::Role;
use crate::wire::ErrorCode;

/// Binds the control port with SO_REUSEADDR, so a restarted member can listen again at once.
pub(super) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Accepts control channels. A member is recognized by its source address; anyone else gets
/// a session too, only to be told PEER_REJECT(not a member) after its PEER_JOIN. Channels
/// not yet joined are admitted per source address (see [`super::admission`]).
pub(super) async fn listen(inner: Arc<Inner>, listener: TcpListener) {
    let admission = Admission::new(inner.config.max_pending_joins, inner.config.max_pending_per_source);
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, from) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let remote = canonical(from.ip());
        let peer = inner.member_id(remote).filter(|&p| p != inner.me);
        let permit = match admission.admit(remote, peer.is_some()) {
            Ok(p) => p,
            Err(reason) => {
                inner.observer.on_event(&MeshEvent::ChannelRefused { peer: remote, reason });
                tracing::warn!(%remote, reason, "too many channels waiting for PEER_JOIN, refusing one");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let inner = inner.clone();
        tokio::spawn(async move {
            match inner.config.tls.clone() {
                None => {
                    let fd = stream.as_raw_fd();
                    channel::run(inner, stream, Some(fd), Role::Acceptor, peer, remote, Some(permit)).await;
                }
                Some(tls) => {
                    let timeout = inner.session_config(peer).dead_interval().max(Duration::from_secs(1));
                    match tls.accept(stream, remote, timeout).await {
                        Ok(s) => {
                            channel::run(inner, s, None, Role::Acceptor, peer, remote, Some(permit)).await;
                        }
                        Err(reason) => {
                            inner.observer.on_event(&MeshEvent::ChannelRefused { peer: remote, reason });
                            tracing::warn!(%remote, reason, "control channel refused: no valid credentials");
                        }
                    }
                }
            }
        });
    }
}

async fn connect(inner: &Inner, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Peers recognize members by source address: dial from the cluster address.
    socket.bind(SocketAddr::new(inner.config.address, 0))?;
    socket.connect(to).await
}

/// Keeps a control channel to one peer: dials whenever the peer has no current channel,
/// with exponential backoff, until the configured attempts are used up.
pub(super) async fn dial(inner: Arc<Inner>, peer: MemberId) {
    let member = inner.config.members[peer.0 as usize].clone();
    let to = SocketAddr::new(member.address, member.port);
    let mut shutdown = inner.shutdown.subscribe();
    let mut backoff = inner.config.backoff_min;
    let mut failures = 0u32;
    let connect_timeout = member.session.dead_interval().max(Duration::from_secs(1));
    loop {
        // Wait until the peer has no current channel (it may have dialed us). A channel that
        // joined in the meantime counts as a success: start counting failures afresh.
        loop {
            let changed = inner.peer_changed[peer.0 as usize].notified();
            if inner.slot(peer).current.is_none() {
                break;
            }
            failures = 0;
            backoff = inner.config.backoff_min;
            tokio::select! {
                _ = changed => {}
                _ = shutdown.changed() => return,
            }
        }
        if *shutdown.borrow() {
            return;
        }
        {
            let mut slot = inner.slot(peer);
            if slot.current.is_none() {
                slot.set_state(PeerState::Connect);
            }
        }
        let attempt = tokio::select! {
            _ = shutdown.changed() => return,
            r = tokio::time::timeout(connect_timeout, connect(&inner, to)) => r,
        };
        let offered = inner.channel_config(Some(peer), Role::Initiator).version;
        let outcome = match attempt {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                match inner.config.tls.clone() {
                    None => {
                        let fd = stream.as_raw_fd();
                        channel::run(inner.clone(), stream, Some(fd), Role::Initiator, Some(peer), member.address, None)
                            .await
                    }
                    Some(tls) => match tls.connect(stream, member.address, connect_timeout).await {
                        Ok(s) => {
                            channel::run(inner.clone(), s, None, Role::Initiator, Some(peer), member.address, None)
                                .await
                        }
                        Err(reason) => {
                            tracing::warn!(peer = %member.address, reason, "TLS to peer failed");
                            Outcome::Failed("tls handshake failed")
                        }
                    },
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %member.address, error = %e, "connect failed");
                Outcome::Failed("connect failed")
            }
            Err(_) => Outcome::Failed("connect timed out"),
        };
        let pause = match outcome {
            Outcome::WasCurrent => {
                failures = 0;
                backoff = inner.config.backoff_min;
                backoff
            }
            Outcome::Duplicate => inner.config.backoff_min,
            // A version-1 peer refused our PEER_JOIN(2): dial again at once offering 1.
            Outcome::Rejected(ErrorCode::VERSION_MISMATCH) if inner.version_refused(peer, offered) => {
                inner.config.backoff_min
            }
            Outcome::Rejected(_) | Outcome::Failed(_) => {
                failures += 1;
                let mut slot = inner.slot(peer);
                slot.connect_failures = failures;
                if slot.current.is_none() {
                    slot.set_state(PeerState::Down);
                    if let Outcome::Failed(why) = outcome {
                        slot.last_close = Some(why.to_string());
                    }
                }
                if let Retries::Count(n) = member.connect_retries {
                    if failures >= n {
                        if slot.current.is_none() {
                            slot.set_state(PeerState::GaveUp);
                        }
                        tracing::warn!(peer = %member.address, attempts = failures, "giving up on peer");
                        return;
                    }
                }
                let pause = backoff;
                backoff = (backoff * 2).min(inner.config.backoff_max);
                pause
            }
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
