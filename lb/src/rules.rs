//! The netfilter rules `lb run` installs for its data plane, and removes on exit. `lb rules`
//! prints them for operators who manage their own firewall.
//!
//! Everything lives in two chains of the raw table, LB-PRE (hooked from PREROUTING) and
//! LB-OUT (from OUTPUT), for iptables and ip6tables. Packets are sent to NFQUEUE with
//! `--queue-bypass`, so traffic flows untouched (fail-open) when no daemon listens.
//!
//! Why raw: a queued packet that gets an accept verdict continues with the next netfilter
//! hook, not the next rule. In the raw table (priority -300, after defragmentation) the
//! data plane sees every packet before conntrack and before the mangle table, where the
//! transparent proxy's TPROXY rules live.

use std::fmt::Write as _;
use std::process::Command;

use anyhow::{bail, Context};

use crate::config::Dataplane;

/// Chain hooked from PREROUTING.
pub const PRE_CHAIN: &str = "LB-PRE";
/// Chain hooked from OUTPUT.
pub const OUT_CHAIN: &str = "LB-OUT";

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

/// Both families' rules with a heading each, as `lb rules` prints them.
pub fn describe(d: &Dataplane) -> String {
    format!(
        "# iptables-restore --noflush <<'EOF'\n{}# EOF\n\n# ip6tables-restore --noflush <<'EOF'\n{}# EOF\n",
        ruleset(d, false),
        ruleset(d, true)
    )
}

fn tool(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("ip6tables", "ip6tables-restore")
    } else {
        ("iptables", "iptables-restore")
    }
}

/// Installs the rules of both families (removing any left by an earlier run first).
pub fn install(d: &Dataplane) -> anyhow::Result<()> {
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

/// Removes the rules of both families; missing ones are not an error.
pub fn remove() {
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

    #[test]
    fn rules_queue_intercepted_ports_both_ways_and_skip_the_tun() {
        let d: Dataplane =
            toml::from_str("intercept_tcp_ports = [80, 443]\nintercept_udp_ports = [53]\nqueue = 9\n").unwrap();
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
}
