//! Real-kernel tests of the packet I/O backends (NFQUEUE, raw IP-in-IP sockets, TUN).
//!
//! Needs root. Every test builds its own network namespaces (unique names, deleted on drop
//! even when the test fails) joined by veth pairs, uses only documentation and benchmarking
//! addresses, and sends a bounded number of packets with bounded waits. Nothing is added to
//! the namespace the test process runs in.

use std::ffi::CString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use etherparse::{IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder, SlicedPacket, TransportSlice};
use handoff::io::nfqueue::{Hook, NfQueue, NfVerdict, Queued};
use handoff::io::raw::RawTunnel;
use handoff::io::tun::Tun;
use handoff::netns::{veth, Netns};

/// The longest a test waits for a packet that should arrive.
const WAIT: Duration = Duration::from_secs(3);
/// How long a test waits to be sure a dropped packet does not arrive.
const ABSENT: Duration = Duration::from_millis(300);

fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ipv4(src, dst, 64).udp(sport, dport);
    let mut packet = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut packet, payload).expect("build IPv4/UDP");
    packet
}

fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).udp(sport, dport);
    let mut packet = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut packet, payload).expect("build IPv6/UDP");
    packet
}

/// The UDP ports and payload of an IP packet, or `None` if it is not UDP.
fn udp_of(packet: &[u8]) -> Option<(u16, u16, Vec<u8>)> {
    match SlicedPacket::from_ip(packet).ok()?.transport? {
        TransportSlice::Udp(udp) => Some((udp.source_port(), udp.destination_port(), udp.payload().to_vec())),
        _ => None,
    }
}

fn outer_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: IpNumber, inner: &[u8]) -> Vec<u8> {
    let mut header =
        Ipv4Header::new(inner.len().try_into().expect("inner fits"), 64, protocol, src.octets(), dst.octets())
            .expect("outer IPv4 header");
    header.header_checksum = header.calc_header_checksum();
    let mut packet = header.to_bytes().to_vec();
    packet.extend_from_slice(inner);
    packet
}

fn outer_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: IpNumber, inner: &[u8]) -> Vec<u8> {
    let header = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: inner.len().try_into().expect("inner fits"),
        next_header,
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
    };
    let mut packet = header.to_bytes().to_vec();
    packet.extend_from_slice(inner);
    packet
}

/// A UDP socket bound inside `ns`, with a receive timeout.
fn udp_in(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let _inside = ns.enter().expect("enter netns");
    let socket = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name()));
    socket.set_read_timeout(Some(WAIT)).expect("read timeout");
    socket
}

/// The next datagram on `socket`: (payload, sender).
fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).expect("datagram within the timeout");
    (buf[..n].to_vec(), from)
}

/// Asserts that nothing arrives on `socket` within [`ABSENT`].
fn assert_nothing(socket: &UdpSocket) {
    socket.set_read_timeout(Some(ABSENT)).expect("read timeout");
    let mut buf = [0u8; 2048];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => panic!("unexpected datagram from {from}: {:?}", &buf[..n]),
        Err(e) => assert!(matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{e}"),
    }
    socket.set_read_timeout(Some(WAIT)).expect("read timeout");
}

fn ifindex(ns: &Netns, ifname: &str) -> u32 {
    let _inside = ns.enter().expect("enter netns");
    let name = CString::new(ifname).expect("no NUL");
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {ifname} in {}", ns.name());
    index
}

#[test]
fn tun_injects_into_the_stack() {
    let ns = Netns::new("lbt").expect("netns");
    ns.ip(&["addr", "add", "198.18.5.1/32", "dev", "lo"]).expect("v4 address");
    ns.ip(&["addr", "add", "2001:db8:5::1/128", "dev", "lo", "nodad"]).expect("v6 address");
    // Strict reverse-path filtering namespace-wide, as many distributions set it: configure()
    // must exempt the TUN device without loosening any other interface.
    ns.sh(
        "cd /proc/sys/net/ipv4/conf && echo 1 > all/rp_filter && echo 0 > lo/rp_filter && echo 0 > default/rp_filter",
    )
    .expect("strict rp_filter");
    let mut tun = {
        let _inside = ns.enter().expect("enter netns");
        let tun = Tun::open("lbtun0").expect("open tun");
        tun.configure().expect("configure tun");
        let conf = |ifname: &str, key: &str| {
            let path = format!("/proc/sys/net/ipv4/conf/{ifname}/{key}");
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")).trim().to_string()
        };
        assert_eq!(conf("lbtun0", "rp_filter"), "0");
        assert_eq!(conf("lbtun0", "accept_local"), "1");
        assert_eq!(conf("all", "rp_filter"), "0");
        assert_eq!(conf("lo", "rp_filter"), "1");
        assert_eq!(conf("default", "rp_filter"), "1");
        tun
    };
    assert_eq!(tun.name(), "lbtun0");
    let sock4 = udp_in(&ns, "198.18.5.1:9999".parse().unwrap());
    let sock6 = udp_in(&ns, "[2001:db8:5::1]:9999".parse().unwrap());

    tun.write(&udp4([198, 18, 6, 7], 1234, [198, 18, 5, 1], 9999, b"decapsulated v4")).expect("write v4");
    assert_eq!(recv(&sock4), (b"decapsulated v4".to_vec(), "198.18.6.7:1234".parse().unwrap()));

    let (src6, dst6) = ("2001:db8:6::7".parse().unwrap(), "2001:db8:5::1".parse().unwrap());
    tun.write(&udp6(src6, 1234, dst6, 9999, b"decapsulated v6")).expect("write v6");
    assert_eq!(recv(&sock6), (b"decapsulated v6".to_vec(), "[2001:db8:6::7]:1234".parse().unwrap()));

    // Gone with the device (dropped in its namespace): the namespace's settings as they were.
    {
        let _inside = ns.enter().expect("enter netns");
        drop(tun);
    }
    let after = ns.sh("cd /proc/sys/net/ipv4/conf && cat all/rp_filter lo/rp_filter default/rp_filter").unwrap();
    assert_eq!(after.split_whitespace().collect::<Vec<_>>(), ["1", "0", "0"], "rp_filter restored");
}

#[test]
fn tun_reads_what_the_stack_routes_to_it() {
    let ns = Netns::new("lbt").expect("netns");
    ns.ip(&["addr", "add", "198.18.8.1/32", "dev", "lo"]).expect("v4 address");
    let mut tun = {
        let _inside = ns.enter().expect("enter netns");
        let tun = Tun::open("lbtun%d").expect("open tun");
        tun.configure().expect("configure tun");
        tun
    };
    assert!(tun.name().starts_with("lbtun"), "{}", tun.name());
    ns.ip(&["route", "add", "198.18.7.0/24", "dev", tun.name(), "src", "198.18.8.1"]).expect("route");
    let sender = udp_in(&ns, "198.18.8.1:5555".parse().unwrap());
    sender.send_to(b"out through the tun", "198.18.7.9:4444").expect("send");

    // The kernel may also send its own packets (e.g. IPv6 router solicitations) out of the
    // device; look at a bounded number of them for ours.
    let mut buf = [0u8; 2048];
    let mut seen = Vec::new();
    for _ in 0..20 {
        let n = tun.read_timeout(&mut buf, WAIT).expect("read tun").expect("a packet within the timeout");
        let packet = &buf[..n];
        if let Some(udp) = udp_of(packet) {
            if packet[0] >> 4 == 4 && packet[16..20] == [198, 18, 7, 9] {
                assert_eq!(&packet[12..16], &[198, 18, 8, 1]);
                assert_eq!(udp, (5555, 4444, b"out through the tun".to_vec()));
                assert_eq!(tun.read_timeout(&mut buf, Duration::ZERO).expect("poll tun"), None);
                return;
            }
        }
        seen.push(packet.to_vec());
    }
    panic!("our datagram never came out of the tun; saw {seen:?}");
}

/// Two namespaces on one veth with their addresses, and a RawTunnel opened inside each.
fn tunnel_pair(a_addr: IpAddr, b_addr: IpAddr, prefix_len: u8) -> (Netns, Netns, RawTunnel, RawTunnel) {
    let a = Netns::new("lbt").expect("netns a");
    let b = Netns::new("lbt").expect("netns b");
    veth(&a, "va", &b, "vb").expect("veth");
    for (ns, ifname, addr) in [(&a, "va", a_addr), (&b, "vb", b_addr)] {
        let cidr = format!("{addr}/{prefix_len}");
        let mut args = vec!["addr", "add", &cidr, "dev", ifname];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        ns.ip(&args).expect("address");
    }
    let open = |ns: &Netns, addr| {
        let _inside = ns.enter().expect("enter netns");
        RawTunnel::open(addr).expect("open raw tunnel")
    };
    let (ta, tb) = (open(&a, a_addr), open(&b, b_addr));
    (a, b, ta, tb)
}

/// Sends `outer` from `from` and asserts `to` receives exactly `inner` with the right outer
/// addresses, and that the sender hears nothing back (no echo of its own packets).
fn assert_carried(from: &mut RawTunnel, to: &mut RawTunnel, outer: &[u8], inner: &[u8]) {
    from.send(outer).expect("send");
    let mut buf = vec![0u8; 65535];
    let got = to.recv_timeout(&mut buf, WAIT).expect("recv").expect("the peer received nothing");
    assert_eq!(got.outer_src, from.local());
    assert_eq!(got.outer_dst, Some(to.local()));
    assert_eq!(&buf[got.inner.clone()], inner);
    assert_eq!(from.recv_timeout(&mut buf, Duration::ZERO).expect("poll sender"), None);
}

#[test]
fn raw_tunnel_round_trip_v4() {
    let (a_ip, b_ip) = (Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 2));
    let (_a, _b, mut ta, mut tb) = tunnel_pair(a_ip.into(), b_ip.into(), 24);

    let inner = udp4([198, 51, 100, 1], 1111, [203, 0, 113, 2], 2222, b"inner IPv4 in outer IPv4");
    assert_carried(&mut ta, &mut tb, &outer_v4(a_ip, b_ip, IpNumber::IPV4, &inner), &inner);

    // IPv6 inside IPv4 (protocol 41) goes through the second socket, in the other direction.
    let inner6 = udp6("2001:db8:a::1".parse().unwrap(), 1111, "2001:db8:b::2".parse().unwrap(), 2222, b"v6 in v4");
    assert_carried(&mut tb, &mut ta, &outer_v4(b_ip, a_ip, IpNumber::IPV6, &inner6), &inner6);

    // An outer packet that is not IP-in-IP is refused before it reaches the kernel.
    let err = ta.send(&outer_v4(a_ip, b_ip, IpNumber::UDP, &inner)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn raw_tunnel_round_trip_v6() {
    let a_ip: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    let b_ip: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
    let (_a, _b, mut ta, mut tb) = tunnel_pair(a_ip.into(), b_ip.into(), 64);

    let inner = udp6("2001:db8:a::1".parse().unwrap(), 1111, "2001:db8:b::2".parse().unwrap(), 2222, b"v6 in v6");
    assert_carried(&mut ta, &mut tb, &outer_v6(a_ip, b_ip, IpNumber::IPV6, &inner), &inner);

    // IPv4 inside IPv6 (next header 4), the other way.
    let inner4 = udp4([198, 51, 100, 1], 1111, [203, 0, 113, 2], 2222, b"v4 in v6");
    assert_carried(&mut tb, &mut ta, &outer_v6(b_ip, a_ip, IpNumber::IPV4, &inner4), &inner4);

    // Extension headers in the outer header, and a source that is not ours, are refused.
    let with_ext = outer_v6(a_ip, b_ip, IpNumber::IPV6_DESTINATION_OPTIONS, &inner);
    assert_eq!(ta.send(&with_ext).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    let spoofed = outer_v6("2001:db8:1::9".parse().unwrap(), b_ip, IpNumber::IPV6, &inner);
    assert_eq!(ta.send(&spoofed).unwrap_err().kind(), io::ErrorKind::InvalidInput);
}

/// The next queued packet, which must be a UDP datagram carrying `payload`.
fn expect_queued(queue: &mut NfQueue, payload: &[u8]) -> Queued {
    let queued = queue.recv_timeout(WAIT).expect("recv from queue").expect("nothing queued within the timeout");
    let (_, _, got) = udp_of(queued.payload()).expect("queued packet is UDP");
    assert_eq!(got, payload);
    assert_eq!(queued.original_len(), queued.payload().len());
    queued
}

#[test]
fn nfqueue_sees_prerouting_and_drops_or_accepts() {
    const QUEUE: u16 = 7;
    let client = Netns::new("lbt").expect("client netns");
    let member = Netns::new("lbt").expect("member netns");
    veth(&client, "vc", &member, "vm").expect("veth");
    client.ip(&["addr", "add", "198.18.2.1/24", "dev", "vc"]).expect("address");
    client.ip(&["addr", "add", "2001:db8:2::1/64", "dev", "vc", "nodad"]).expect("address");
    member.ip(&["addr", "add", "198.18.2.2/24", "dev", "vm"]).expect("address");
    member.ip(&["addr", "add", "2001:db8:2::2/64", "dev", "vm", "nodad"]).expect("address");
    for tool in ["iptables", "ip6tables"] {
        member
            .sh(&format!(
                "{tool} -t mangle -A PREROUTING -p udp --dport 7777 -j NFQUEUE --queue-num {QUEUE} --queue-bypass && \
                 {tool} -t mangle -A OUTPUT -p udp --dport 7778 -j NFQUEUE --queue-num {QUEUE} --queue-bypass"
            ))
            .expect("install NFQUEUE rules");
    }
    let mut queue = {
        let _inside = member.enter().expect("enter member");
        NfQueue::open(QUEUE).expect("open NFQUEUE")
    };
    assert_eq!(queue.queue_num(), QUEUE);
    let vm = ifindex(&member, "vm");
    let listener = udp_in(&member, "198.18.2.2:7777".parse().unwrap());
    let listener6 = udp_in(&member, "[2001:db8:2::2]:7777".parse().unwrap());
    let member_sender = udp_in(&member, "198.18.2.2:0".parse().unwrap());
    let client_sender = udp_in(&client, "198.18.2.1:4000".parse().unwrap());
    let client_sender6 = udp_in(&client, "[2001:db8:2::1]:4000".parse().unwrap());
    let client_listener = udp_in(&client, "198.18.2.1:7778".parse().unwrap());
    let to_member: SocketAddr = "198.18.2.2:7777".parse().unwrap();

    // Accept: queued at PREROUTING from the veth, then delivered unchanged.
    client_sender.send_to(b"accept me", to_member).expect("send");
    let queued = expect_queued(&mut queue, b"accept me");
    assert_eq!(queued.hook(), Hook::Prerouting);
    assert_eq!((queued.indev(), queued.outdev()), (Some(vm), None));
    queue.verdict(queued, NfVerdict::Accept).expect("verdict");
    assert_eq!(recv(&listener), (b"accept me".to_vec(), "198.18.2.1:4000".parse().unwrap()));

    // Drop: queued, then never delivered.
    client_sender.send_to(b"drop me", to_member).expect("send");
    let queued = expect_queued(&mut queue, b"drop me");
    queue.verdict(queued, NfVerdict::Drop).expect("verdict");
    assert_nothing(&listener);

    // AcceptModified: the listener gets the rewritten datagram (new length, new checksums).
    client_sender.send_to(b"modify me", to_member).expect("send");
    let queued = expect_queued(&mut queue, b"modify me");
    let rewritten = udp4([198, 18, 2, 1], 4000, [198, 18, 2, 2], 7777, b"modified by the verdict");
    queue.verdict(queued, NfVerdict::AcceptModified(rewritten)).expect("verdict");
    assert_eq!(recv(&listener).0, b"modified by the verdict");

    // IPv6 uses the same queue.
    client_sender6.send_to(b"accept me too", "[2001:db8:2::2]:7777").expect("send");
    let queued = expect_queued(&mut queue, b"accept me too");
    assert_eq!(queued.payload()[0] >> 4, 6);
    assert_eq!(queued.hook(), Hook::Prerouting);
    queue.verdict(queued, NfVerdict::Accept).expect("verdict");
    assert_eq!(recv(&listener6).0, b"accept me too");

    // OUTPUT: the member's own datagram is queued on its way out of the veth.
    member_sender.send_to(b"from the member", "198.18.2.1:7778").expect("send");
    let queued = expect_queued(&mut queue, b"from the member");
    assert_eq!(queued.hook(), Hook::Output);
    assert_eq!((queued.indev(), queued.outdev()), (None, Some(vm)));
    queue.verdict(queued, NfVerdict::Accept).expect("verdict");
    assert_eq!(recv(&client_listener).0, b"from the member");

    // Fail-open: with room for one packet in the kernel queue, a second datagram that finds it
    // full is accepted unseen while the first still waits for its verdict.
    queue.set_max_len(1).expect("queue length");
    client_sender.send_to(b"waits for a verdict", to_member).expect("send");
    client_sender.send_to(b"overflows the queue", to_member).expect("send");
    assert_eq!(recv(&listener).0, b"overflows the queue");
    let queued = expect_queued(&mut queue, b"waits for a verdict");
    queue.verdict(queued, NfVerdict::Accept).expect("verdict");
    assert_eq!(recv(&listener).0, b"waits for a verdict");

    // A second daemon cannot take the queue over, and says why.
    let err = {
        let _inside = member.enter().expect("enter member");
        NfQueue::open(QUEUE).unwrap_err()
    };
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    assert_eq!(queue.verdict_errors(), 0);
    assert_eq!(queue.recv_timeout(Duration::ZERO).expect("poll queue").map(|q| q.id()), None);

    // Once the queue is closed, --queue-bypass lets traffic through instead of dropping it.
    drop(queue);
    client_sender.send_to(b"bypassed", to_member).expect("send");
    assert_eq!(recv(&listener).0, b"bypassed");
}

#[test]
fn nfqueue_socket_buffer_overflow_is_counted_and_a_bigger_buffer_holds_the_burst() {
    const QUEUE: u16 = 8;
    // Small enough for the listener's own socket buffer (the default), which must not drop.
    const BURST: usize = 100;
    let client = Netns::new("lbt").expect("client netns");
    let member = Netns::new("lbt").expect("member netns");
    veth(&client, "vc", &member, "vm").expect("veth");
    client.ip(&["addr", "add", "198.18.3.1/24", "dev", "vc"]).expect("address");
    member.ip(&["addr", "add", "198.18.3.2/24", "dev", "vm"]).expect("address");
    member
        .sh(&format!(
            "iptables -t mangle -A PREROUTING -p udp --dport 7777 -j NFQUEUE --queue-num {QUEUE} --queue-bypass"
        ))
        .expect("install NFQUEUE rule");
    let mut queue = {
        let _inside = member.enter().expect("enter member");
        NfQueue::open(QUEUE).expect("open NFQUEUE")
    };
    queue.set_max_len(8192).expect("queue length");
    let listener = udp_in(&member, "198.18.3.2:7777".parse().unwrap());
    let sender = udp_in(&client, "198.18.3.1:4000".parse().unwrap());
    let burst = |queue: &mut NfQueue| {
        for i in 0..BURST {
            let mut d = vec![0u8; 300];
            d[..8].copy_from_slice(&(i as u64).to_be_bytes());
            sender.send_to(&d, "198.18.3.2:7777").expect("send");
        }
        // Every datagram reaches the listener: queued ones once accepted, the rest unseen.
        let mut queued = 0;
        while let Some(q) = queue.recv_timeout(Duration::from_millis(200)).expect("recv") {
            queue.verdict(q, NfVerdict::Accept).expect("verdict");
            queued += 1;
        }
        for _ in 0..BURST {
            recv(&listener);
        }
        queued
    };
    assert_eq!(queue.overflowed(), 0);

    // A buffer of a few packets: the burst overflows it, and every overflowed packet is counted.
    let small = queue.set_socket_buffer(4096).expect("small buffer");
    assert!(small < 64 * 1024, "granted {small}");
    let queued = burst(&mut queue);
    let overflowed = queue.overflowed();
    assert!(queued < BURST && overflowed > 0, "queued {queued}, overflowed {overflowed}");
    assert_eq!(queued as u64 + overflowed, BURST as u64, "each datagram was queued or counted");

    // A buffer beyond net.core.rmem_max (SO_RCVBUFFORCE): the same burst waits for the daemon.
    let big = queue.set_socket_buffer(16 << 20).expect("big buffer");
    assert!(big >= 16 << 20, "granted {big}");
    assert_eq!(burst(&mut queue), BURST);
    assert_eq!(queue.overflowed(), overflowed, "nothing more passed unseen");
}
