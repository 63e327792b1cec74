//! IP-in-IP in user space over raw sockets: RFC 2003 (outer IPv4) and RFC 2473 (outer IPv6).
//!
//! The kernels we run on have no `ipip`/`ip6_tunnel`/`sit` modules, so a member sends the outer
//! packets it builds through raw sockets and receives the ones addressed to it the same way;
//! the decapsulated inner packet then goes into the stack through [`super::tun::Tun`].
//!
//! While a raw socket for protocol 4 or 41 is open, the kernel delivers those packets to it and
//! sends no ICMP "protocol unreachable" (IPv4) or "parameter problem" (IPv6) back. A member
//! without an open [`RawTunnel`] does answer encapsulated packets with those errors.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// IP protocol number of IPv4 as a payload (IP-in-IP, RFC 2003).
const PROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6 as a payload (RFC 2473, and IPv6-in-IPv4).
const PROTO_IPV6: u8 = 41;
const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;

/// One decapsulated packet in the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The outer source: the member that sent the packet.
    pub outer_src: IpAddr,
    /// The outer destination (one of this member's addresses), when known.
    pub outer_dst: Option<IpAddr>,
    /// Where the inner packet lies in the buffer given to [`RawTunnel::recv_timeout`].
    pub inner: Range<usize>,
}

/// Raw sockets that send and receive IP-in-IP packets for one local (cluster) address.
///
/// Holds one socket per inner protocol: 4 (inner IPv4) and 41 (inner IPv6).
#[derive(Debug)]
pub struct RawTunnel {
    local: IpAddr,
    /// Indexed by [`slot`]: 0 for protocol 4, 1 for protocol 41.
    sockets: [Socket; 2],
    /// Which socket `recv_timeout` tries first, so that neither protocol starves the other.
    next: usize,
}

impl RawTunnel {
    /// Opens raw sockets for protocols 4 and 41 bound to `local` (needs CAP_NET_RAW).
    ///
    /// For an IPv4 `local` the sockets are AF_INET with IP_HDRINCL: [`RawTunnel::send`] passes
    /// the caller's outer header through. For an IPv6 `local` they are AF_INET6 and the kernel
    /// writes the outer header itself.
    pub fn open(local: IpAddr) -> io::Result<Self> {
        let open_one = |proto: u8| -> io::Result<Socket> {
            let domain = if local.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
            let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(i32::from(proto))))
                .map_err(|e| context(e, format!("open raw socket for IP protocol {proto}")))?;
            if local.is_ipv4() {
                socket.set_header_included_v4(true)?;
            }
            socket
                .bind(&SocketAddr::new(local, 0).into())
                .map_err(|e| context(e, format!("bind raw socket for IP protocol {proto} to {local}")))?;
            socket.set_nonblocking(true)?;
            // Bursts of handed-over packets (a server's reply stream) must not overflow the
            // default buffer; the kernel caps this at net.core.rmem_max.
            let _ = socket.set_recv_buffer_size(8 << 20);
            Ok(socket)
        };
        Ok(RawTunnel { local, sockets: [open_one(PROTO_IPIP)?, open_one(PROTO_IPV6)?], next: 0 })
    }

    /// The local address the sockets are bound to.
    pub fn local(&self) -> IpAddr {
        self.local
    }

    /// The sockets' descriptors, for an outside poll loop; then call `recv_timeout` with a zero
    /// timeout until it returns `None`.
    pub fn raw_fds(&self) -> [RawFd; 2] {
        [self.sockets[0].as_raw_fd(), self.sockets[1].as_raw_fd()]
    }

    /// Sends one complete outer packet (outer header + inner packet) to its outer destination.
    ///
    /// An outer IPv4 packet (protocol 4 or 41) goes out as it is; the kernel fills in the total
    /// length and the header checksum. Of an outer IPv6 packet (next header 4 or 41) only the
    /// payload is handed to the kernel, which builds a new outer header with the same source
    /// (which must be the local address) and destination but its own hop limit, traffic class
    /// and flow label. Extension headers in the outer IPv6 header are not supported and
    /// rejected with `InvalidInput`.
    pub fn send(&mut self, outer: &[u8]) -> io::Result<()> {
        let (slot, payload, dst) = match outer.first().map(|b| b >> 4) {
            Some(4) => {
                if !self.local.is_ipv4() {
                    return Err(invalid("IPv4 outer packet on a tunnel with an IPv6 local address"));
                }
                let ihl = usize::from(outer[0] & 0x0f) * 4;
                if outer.len() < IPV4_MIN_HEADER || ihl < IPV4_MIN_HEADER || outer.len() < ihl {
                    return Err(invalid("outer IPv4 packet shorter than its header"));
                }
                let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&outer[16..20]).expect("4 bytes"));
                (slot(outer[9])?, outer, IpAddr::V4(dst))
            }
            Some(6) => {
                if !self.local.is_ipv6() {
                    return Err(invalid("IPv6 outer packet on a tunnel with an IPv4 local address"));
                }
                if outer.len() < IPV6_HEADER {
                    return Err(invalid("outer IPv6 packet shorter than its header"));
                }
                let next_header = outer[6];
                if next_header != PROTO_IPIP && next_header != PROTO_IPV6 {
                    return Err(invalid(format!(
                        "outer IPv6 next header {next_header}: only 4 or 41 directly after the fixed \
                         header (extension headers are not supported)"
                    )));
                }
                let payload_len = usize::from(u16::from_be_bytes([outer[4], outer[5]]));
                if payload_len != outer.len() - IPV6_HEADER {
                    return Err(invalid(format!(
                        "outer IPv6 payload length {payload_len} but {} bytes follow the header",
                        outer.len() - IPV6_HEADER
                    )));
                }
                let src = Ipv6Addr::from(<[u8; 16]>::try_from(&outer[8..24]).expect("16 bytes"));
                if IpAddr::V6(src) != self.local {
                    return Err(invalid(format!("outer source {src} is not this tunnel's address {}", self.local)));
                }
                let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&outer[24..40]).expect("16 bytes"));
                (slot(next_header)?, &outer[IPV6_HEADER..], IpAddr::V6(dst))
            }
            _ => return Err(invalid("outer packet is neither IPv4 nor IPv6")),
        };
        let sent = self.sockets[slot].send_to(payload, &SockAddr::from(SocketAddr::new(dst, 0)))?;
        if sent != payload.len() {
            return Err(io::Error::other(format!("raw socket sent {sent} of {} bytes", payload.len())));
        }
        Ok(())
    }

    /// Waits up to `timeout` for an encapsulated packet addressed to the local address and
    /// returns where its inner packet lies in `buf`; `None` when the time ran out.
    ///
    /// Packets whose outer source is the local address (the host talking to itself) are
    /// skipped. A packet larger than `buf` is consumed and reported as `InvalidInput`; size
    /// `buf` for the largest outer packet (65535 bytes is always enough).
    pub fn recv_timeout(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<Received>> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            for i in 0..self.sockets.len() {
                let slot = (self.next + i) % self.sockets.len();
                if let Some(received) = self.try_recv(slot, buf)? {
                    self.next = (slot + 1) % self.sockets.len();
                    if received.outer_src == self.local {
                        continue;
                    }
                    return Ok(Some(received));
                }
            }
            let remaining = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(remaining) if !remaining.is_zero() => Some(remaining),
                    _ => return Ok(None),
                },
                None => None,
            };
            poll_readable(self.raw_fds(), remaining)?;
        }
    }

    /// One non-blocking receive on one socket; `None` when it has nothing queued.
    fn try_recv(&self, slot: usize, buf: &mut [u8]) -> io::Result<Option<Received>> {
        let socket = &self.sockets[slot];
        // SAFETY: recv only ever writes initialized bytes into the buffer, and u8 and
        // MaybeUninit<u8> have the same layout.
        let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
        let received = match self.local {
            IpAddr::V4(_) => socket.recv_with_flags(uninit, libc::MSG_TRUNC).map(|n| (n, None)),
            IpAddr::V6(_) => socket.recv_from_with_flags(uninit, libc::MSG_TRUNC).map(|(n, from)| (n, Some(from))),
        };
        let (len, from) = match received {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if len > buf.len() {
            return Err(invalid(format!(
                "dropped a {len}-byte packet that does not fit the {}-byte buffer",
                buf.len()
            )));
        }
        let packet = &buf[..len];
        match from {
            // AF_INET raw sockets deliver the outer IPv4 header as it came off the wire.
            None => {
                let ihl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
                if len < IPV4_MIN_HEADER || packet[0] >> 4 != 4 || ihl < IPV4_MIN_HEADER || ihl > len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "raw socket returned a malformed IPv4 header",
                    ));
                }
                let total = usize::from(u16::from_be_bytes([packet[2], packet[3]])).clamp(ihl, len);
                let src = Ipv4Addr::from(<[u8; 4]>::try_from(&packet[12..16]).expect("4 bytes"));
                let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&packet[16..20]).expect("4 bytes"));
                Ok(Some(Received { outer_src: src.into(), outer_dst: Some(dst.into()), inner: ihl..total }))
            }
            // AF_INET6 raw sockets deliver only the payload; the sender comes from recvfrom and
            // the socket is bound, so the destination was the local address.
            Some(from) => {
                let src = from
                    .as_socket()
                    .map(|a| a.ip())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "raw socket returned no source"))?;
                Ok(Some(Received { outer_src: src, outer_dst: Some(self.local), inner: 0..len }))
            }
        }
    }
}

/// Socket slot for an inner protocol number.
fn slot(protocol: u8) -> io::Result<usize> {
    match protocol {
        PROTO_IPIP => Ok(0),
        PROTO_IPV6 => Ok(1),
        other => Err(invalid(format!("outer protocol {other} is neither 4 (IPv4) nor 41 (IPv6)"))),
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

fn context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Waits until one of `fds` is readable or `timeout` (forever if `None`) passes; returns which
/// ones are readable (all `false` on timeout or when a signal interrupted the wait).
///
/// Shared by the packet I/O backends, which all keep their descriptors non-blocking.
pub(crate) fn poll_readable<const N: usize>(fds: [RawFd; N], timeout: Option<Duration>) -> io::Result<[bool; N]> {
    let mut pollfds = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: t.subsec_nanos().into(),
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |ts| ts as *const libc::timespec);
    // SAFETY: pollfds and ts outlive the call; N entries are valid.
    let n = unsafe { libc::ppoll(pollfds.as_mut_ptr(), N as libc::nfds_t, ts_ptr, std::ptr::null()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    // Errors and hang-ups count as readable: the following read reports them.
    Ok(pollfds.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0))
}
