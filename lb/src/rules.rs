//! The netfilter rules `lb run` installs for its data plane, and removes on exit. `lb rules`
//! prints them for operators who manage their own firewall.
//!
//! Interception lives in two chains of the raw table, LB-PRE (hooked from PREROUTING) and
//! LB-OUT (from OUTPUT), for iptables and ip6tables. Packets are sent to NFQUEUE with
//! `--queue-bypass`, so traffic flows untouched (fail-open) when no daemon listens.
//!
//! Why raw: a queued packet that gets an accept verdict continues with the next netfilter
//! hook, not the next rule. In the raw table (priority -300, after defragmentation) the
//! data plane sees every packet before conntrack and before the mangle table, where the
//! transparent proxy's TPROXY rules live. (An nftables `queue` chain between conntrack and
//! mangle would do too, but many kernels, this project's test machine among them, are built
//! without `CONFIG_NFT_QUEUE`; the xt NFQUEUE target works with iptables-legacy and -nft.)
//!
//! The fast path (`[dataplane] fast_path`, on by default) adds the nftables table `inet lb`,
//! whose chains run just before (-301) and just after (-299) the raw table:
//!
//! - the daemon's accept verdict for a packet of this member's own flow, classified on
//!   arrival, sets the packet mark bit `fast_path_mark` (the verdict bit);
//! - `mark_pre`/`mark_out` (-299, right after the verdict) add the flow of a packet with the
//!   verdict bit, in its direction (protocol, addresses, ports), to the set `local4` or
//!   `local6` with a timeout of `fast_path_sample_ms`, and clear both bits from every packet;
//! - `fast_pre`/`fast_out` (-301) set the next higher bit (the fast bit) on packets whose
//!   flow is in the set, except TCP SYN, FIN and RST; LB-PRE/LB-OUT return early for packets
//!   with the fast bit. Two bits, so that a fast-pathed packet reaching `mark_pre` just after
//!   its element expired cannot re-add the flow: only a verdict does.
//!
//! So a local flow's packets skip user space until its set element times out: then one
//! packet is queued again and its verdict re-adds the flow (`add` does not refresh the
//! timeout). That time-based sample keeps the idle timers right however slow the flow, and
//! bounds how long a flow that stopped being this member's (a tuple reused after REMOVE,
//! whose SYN also deletes the element) can bypass the queue. Encapsulated, held and other
//! non-local packets are never marked, so their flows never enter the set.

use std::fmt::Write as _;
use std::process::Command;

use anyhow::{bail, Context};

use crate::config::Dataplane;

/// Chain hooked from PREROUTING.
pub const PRE_CHAIN: &str = "LB-PRE";
/// Chain hooked from OUTPUT.
pub const OUT_CHAIN: &str = "LB-OUT";
/// The nftables table (family inet) of the fast path.
pub const TABLE: &str = "lb";
/// Elements per set at most; packets of further local flows are queued (slower, not wrong).
const SET_MAX: u32 = 1 << 18;

fn ports(list: &[u16]) -> Vec<String> {
    // multiport takes at most 15 ports per rule.
    list.chunks(15).map(|c| c.iter().map(u16::to_string).collect::<Vec<_>>().join(",")).collect()
}

/// The rules for one family, in iptables-restore format (to be applied with --noflush).
pub fn ruleset(d: &Dataplane, v6: bool) -> String {
    let q = format!("-j NFQUEUE --queue-num {} --queue-bypass", d.queue);
    let mut s = String::new();
    let _ = writeln!(s, "*raw");
    let _ = writeln!(s, ":{PRE_CHAIN} - [0:0]");
    let _ = writeln!(s, ":{OUT_CHAIN} - [0:0]");
    let _ = writeln!(s, "-A PREROUTING -j {PRE_CHAIN}");
    let _ = writeln!(s, "-A OUTPUT -j {OUT_CHAIN}");
    // Packets injected after decapsulation were classified already.
    let _ = writeln!(s, "-A {PRE_CHAIN} -i {} -j RETURN", d.tun);
    if d.fast_path {
        // Packets of local flows the fast path lets through (table inet lb).
        let (_, m) = d.fast_path_bits();
        for chain in [PRE_CHAIN, OUT_CHAIN] {
            let _ = writeln!(s, "-A {chain} -m mark --mark {m:#x}/{m:#x} -j RETURN");
        }
    }
    for chain in [PRE_CHAIN, OUT_CHAIN] {
        for p in ports(&d.intercept_tcp_ports) {
            let _ = writeln!(s, "-A {chain} -p tcp -m multiport --ports {p} {q}");
        }
        for p in ports(&d.intercept_udp_ports) {
            let _ = writeln!(s, "-A {chain} -p udp -m multiport --ports {p} {q}");
        }
    }
    // ICMP errors about intercepted flows are steered to the flow's owner.
    if v6 {
        for t in ["destination-unreachable", "packet-too-big", "time-exceeded"] {
            let _ = writeln!(s, "-A {PRE_CHAIN} -p ipv6-icmp -m icmp6 --icmpv6-type {t} {q}");
        }
    } else {
        for t in ["destination-unreachable", "time-exceeded"] {
            let _ = writeln!(s, "-A {PRE_CHAIN} -p icmp -m icmp --icmp-type {t} {q}");
        }
    }
    let _ = writeln!(s, "COMMIT");
    s
}

/// The fast path's nftables table in `nft -f` syntax, replacing an existing one atomically;
/// empty when the fast path is off.
pub fn fast_path_table(d: &Dataplane) -> String {
    if !d.fast_path {
        return String::new();
    }
    let ((verdict, fast), t) = (d.fast_path_bits(), d.fast_path_sample_ms);
    let clear = !(verdict | fast);
    let mut s = String::new();
    // Declaring then deleting the table in one transaction removes a stale copy (kill -9)
    // without failing when there is none.
    let _ = writeln!(s, "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{");
    let keys = [("4", "ip", "ipv4_addr"), ("6", "ip6", "ipv6_addr")];
    for (v, _, addr) in keys {
        let _ = writeln!(
            s,
            "\tset local{v} {{\n\t\ttype inet_proto . {addr} . {addr} . inet_service . inet_service\n\
             \t\tsize {SET_MAX}\n\t\tflags dynamic,timeout\n\t\ttimeout {t}ms\n\t}}"
        );
    }
    let key = |ip: &str| format!("meta l4proto . {ip} saddr . {ip} daddr . th sport . th dport");
    for (chain, hook) in [("fast_pre", "prerouting"), ("fast_out", "output")] {
        let _ = writeln!(s, "\tchain {chain} {{\n\t\ttype filter hook {hook} priority -301; policy accept;");
        // A new connection on a reused tuple starts from user space.
        for (v, ip, _) in keys {
            let _ = writeln!(s, "\t\ttcp flags & syn != 0 delete @local{v} {{ {} }}", key(ip));
        }
        // Opens and closes always reach the tracker.
        let _ = writeln!(s, "\t\ttcp flags & (fin | syn | rst) != 0 return");
        for (v, ip, _) in keys {
            let _ = writeln!(s, "\t\t{} @local{v} meta mark set meta mark | {fast:#x}", key(ip));
        }
        let _ = writeln!(s, "\t}}");
    }
    for (chain, hook) in [("mark_pre", "prerouting"), ("mark_out", "output")] {
        let _ = writeln!(s, "\tchain {chain} {{\n\t\ttype filter hook {hook} priority -299; policy accept;");
        for (v, ip, _) in keys {
            let _ = writeln!(
                s,
                "\t\tmeta mark & {verdict:#x} != 0 meta l4proto {{ tcp, udp }} add @local{v} {{ {} }}",
                key(ip)
            );
        }
        // The bit is lb's own signal; nothing after this chain sees it.
        let _ = writeln!(s, "\t\tmeta mark & {:#x} != 0 meta mark set meta mark & {clear:#x}", verdict | fast);
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "}}");
    s
}

/// Both families' rules and the fast path's table, with a heading each, as `lb rules`
/// prints them.
pub fn describe(d: &Dataplane) -> String {
    let mut s = format!(
        "# iptables-restore --noflush <<'EOF'\n{}# EOF\n\n# ip6tables-restore --noflush <<'EOF'\n{}# EOF\n",
        ruleset(d, false),
        ruleset(d, true)
    );
    if d.fast_path {
        let _ = write!(s, "\n# nft -f - <<'EOF'\n{}# EOF\n", fast_path_table(d));
    }
    s
}

fn tool(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("ip6tables", "ip6tables-restore")
    } else {
        ("iptables", "iptables-restore")
    }
}

/// Installs the rules of both families (removing any left by an earlier run first). Returns
/// whether the fast path is on: when `nft` is missing or refuses the table (kernels before
/// 5.4 cannot look up dynamic sets), the data plane runs without it, every packet of the
/// intercepted ports through the queue, rather than not at all.
pub fn install(d: &Dataplane) -> anyhow::Result<bool> {
    install_iptables(d)?;
    if !d.fast_path {
        return Ok(false);
    }
    if let Err(e) = apply_fast_path_table(d) {
        tracing::warn!(error = %e, "fast path unavailable: every intercepted packet goes through the queue");
        let slow = Dataplane { fast_path: false, ..d.clone() };
        install_iptables(&slow)?;
        return Ok(false);
    }
    Ok(true)
}

fn install_iptables(d: &Dataplane) -> anyhow::Result<()> {
    remove();
    for v6 in [false, true] {
        let (_, restore) = tool(v6);
        let mut child = Command::new(restore)
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| {
                format!("cannot run {restore} (install iptables, or set dataplane.manage_rules = false)")
            })?;
        use std::io::Write;
        child.stdin.take().expect("piped").write_all(ruleset(d, v6).as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{restore} refused the rules: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(())
}

fn apply_fast_path_table(d: &Dataplane) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft (install nftables, or set dataplane.fast_path = false)")?;
    use std::io::Write;
    child.stdin.take().expect("piped").write_all(fast_path_table(d).as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft refused the fast path's table: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Removes the rules of both families and the fast path's table; missing ones are not an
/// error.
pub fn remove() {
    let _ = Command::new("nft").args(["delete", "table", "inet", TABLE]).output();
    for v6 in [false, true] {
        let (ipt, _) = tool(v6);
        for (hook, chain) in [("PREROUTING", PRE_CHAIN), ("OUTPUT", OUT_CHAIN)] {
            let run = |args: &[&str]| {
                let _ = Command::new(ipt).args(["-w", "-t", "raw"]).args(args).output();
            };
            // The hook may have been added more than once by hand; remove every copy.
            for _ in 0..8 {
                let ok = Command::new(ipt)
                    .args(["-w", "-t", "raw", "-D", hook, "-j", chain])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if !ok {
                    break;
                }
            }
            run(&["-F", chain]);
            run(&["-X", chain]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataplane(extra: &str) -> Dataplane {
        toml::from_str(&format!("intercept_tcp_ports = [80, 443]\nintercept_udp_ports = [53]\nqueue = 9\n{extra}"))
            .unwrap()
    }

    #[test]
    fn rules_queue_intercepted_ports_both_ways_and_skip_the_tun() {
        let d = dataplane("");
        let v4 = ruleset(&d, false);
        assert!(v4.contains("-A LB-PRE -i lbtun0 -j RETURN"));
        assert!(v4.contains("-A LB-PRE -p tcp -m multiport --ports 80,443 -j NFQUEUE --queue-num 9 --queue-bypass"));
        assert!(v4.contains("-A LB-OUT -p tcp -m multiport --ports 80,443 -j NFQUEUE --queue-num 9 --queue-bypass"));
        assert!(v4.contains("-A LB-PRE -p udp -m multiport --ports 53"));
        assert!(v4.contains("--icmp-type destination-unreachable"));
        let v6 = ruleset(&d, true);
        assert!(v6.contains("--icmpv6-type packet-too-big"));
        let many: Vec<u16> = (1..=20).collect();
        assert_eq!(ports(&many).len(), 2);
    }

    #[test]
    fn fast_path_returns_marked_packets_before_the_queue() {
        let d = dataplane("fast_path_mark = 0x100\nfast_path_sample_ms = 250");
        for v6 in [false, true] {
            let r = ruleset(&d, v6);
            // The fast bit (0x200), set by the table, not the verdict bit.
            let ret = r.find("-A LB-PRE -m mark --mark 0x200/0x200 -j RETURN").expect("pre");
            assert!(ret < r.find("NFQUEUE").unwrap(), "{r}");
            assert!(r.contains("-A LB-OUT -m mark --mark 0x200/0x200 -j RETURN"));
        }
        let t = fast_path_table(&d);
        assert!(t.starts_with("table inet lb\ndelete table inet lb\ntable inet lb {"), "{t}");
        assert_eq!(t.matches("timeout 250ms").count(), 2);
        assert_eq!(t.matches("priority -301;").count(), 2);
        assert_eq!(t.matches("priority -299;").count(), 2);
        let key4 = "meta l4proto . ip saddr . ip daddr . th sport . th dport";
        let fast = &t[t.find("chain fast_pre").unwrap()..t.find("chain fast_out").unwrap()];
        let flags = fast.find("tcp flags & (fin | syn | rst) != 0 return").unwrap();
        assert!(fast.find(&format!("tcp flags & syn != 0 delete @local4 {{ {key4} }}")).unwrap() < flags);
        assert!(fast.find(&format!("{key4} @local4 meta mark set meta mark | 0x200")).unwrap() > flags);
        assert!(fast.contains("@local6 meta mark set meta mark | 0x200"));
        let mark = &t[t.find("chain mark_pre").unwrap()..t.find("chain mark_out").unwrap()];
        assert!(mark.contains(&format!("meta mark & 0x100 != 0 meta l4proto {{ tcp, udp }} add @local4 {{ {key4} }}")));
        // Only a verdict adds a flow; both bits are cleared from every packet.
        assert_eq!(mark.matches("add @local").count(), 2);
        assert!(mark.contains("meta mark & 0x300 != 0 meta mark set meta mark & 0xfffffcff"));
        assert!(describe(&d).contains("# nft -f - <<'EOF'"));

        let off = dataplane("fast_path = false");
        assert!(fast_path_table(&off).is_empty() && !describe(&off).contains("nft"));
        assert!(!ruleset(&off, false).contains("-m mark"));
        // Off, the raw-table rules are exactly those of the versions before the fast path.
        let on = ruleset(&dataplane(""), false);
        let plain: String = on.lines().filter(|l| !l.contains("-m mark")).map(|l| format!("{l}\n")).collect();
        assert_eq!(ruleset(&off, false), plain);
    }
}
