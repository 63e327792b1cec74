//! `lb`: the clustered connection-handoff load balancer.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand};
use lb::admin::{FlowsView, PeersView};
use lb::client;

#[derive(Parser)]
#[command(name = "lb", version, about = "Clustered connection-handoff load balancer for transparent proxy farms")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format of `lb run` and `lb demo` (default: the config's log.format, else text).
    #[arg(long, global = true, value_enum)]
    log_format: Option<lb::logging::LogFormat>,
    /// Log level or filter directives, e.g. debug or info,cluster_proto=debug (wins over
    /// RUST_LOG, which wins over the config's log.level; default info).
    #[arg(long, global = true)]
    log_level: Option<String>,
}

#[derive(Subcommand)]
enum Generate {
    /// Man pages in roff, into a directory (lb.1, lb-run.1, ...).
    Man {
        /// Where to write them (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// A completion script on standard output, e.g. `lb generate completions bash >
    /// /usr/share/bash-completion/completions/lb`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run a cluster member.
    Run {
        /// The configuration file (TOML; see docs/configuration.md).
        #[arg(long, short, default_value = lb::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Check a configuration file and print the members it defines.
    CheckConfig {
        /// The configuration file.
        #[arg(long, short, default_value = lb::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Generate a cluster CA and a certificate per member for the mutual-TLS control channel.
    GenCerts {
        /// Directory to write ca.pem, ca.key and ADDRESS.pem / ADDRESS.key into.
        #[arg(long)]
        out: PathBuf,
        /// The members' cluster addresses, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<std::net::IpAddr>,
        /// A name for the cluster, in the certificates' common names.
        #[arg(long, default_value = "lb")]
        name: String,
    },
    /// Print the netfilter rules `lb run` installs for the [dataplane] section.
    Rules {
        /// The configuration file.
        #[arg(long, short, default_value = lb::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// A 3-member cluster on loopback in one process: no root, no configuration.
    Demo {
        /// Connections each member installs.
        #[arg(long, default_value_t = 2000)]
        connections: usize,
        /// Keep the surviving members and their admin APIs up until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// Write the man pages (lb.1 and one per command) or a shell's completion script.
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// Show the whole cluster's connections as one member knows them.
    Flows {
        #[command(flatten)]
        admin: AdminArg,
        /// Only connections owned by this member address.
        #[arg(long)]
        member: Option<std::net::IpAddr>,
        /// Only connections with this address at either end.
        #[arg(long)]
        addr: Option<std::net::IpAddr>,
        /// Only tcp or udp.
        #[arg(long)]
        protocol: Option<String>,
        /// At most this many (0 for all).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the member's peers and their control-channel states.
    Peers {
        #[command(flatten)]
        admin: AdminArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Register a connection this member's proxy handles (sends INSTALL_CONNECTION).
    Install {
        #[command(flatten)]
        admin: AdminArg,
        #[command(flatten)]
        conn: ConnArgs,
        /// forward or bypass.
        #[arg(long, default_value = "forward")]
        action: String,
    },
    /// Unregister a connection (sends REMOVE_CONNECTION).
    Remove {
        #[command(flatten)]
        admin: AdminArg,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(clap::Args)]
struct AdminArg {
    /// The member's admin API address.
    #[arg(long, default_value = lb::config::DEFAULT_ADMIN)]
    admin: SocketAddr,
}

#[derive(clap::Args)]
struct ConnArgs {
    /// tcp or udp.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// Source endpoint, e.g. 192.0.2.1:40000 or [2001:db8::1]:40000.
    #[arg(long)]
    src: SocketAddr,
    /// Destination endpoint.
    #[arg(long)]
    dst: SocketAddr,
}

fn init_logs(flags: &LogFlags, config: Option<&lb::config::LogSection>) -> anyhow::Result<()> {
    let env = std::env::var("RUST_LOG").ok();
    let s = lb::logging::LogSettings::resolve(flags.0, flags.1.as_deref(), env.as_deref(), config);
    lb::logging::init(&s)
}

/// `--log-format` and `--log-level`.
struct LogFlags(Option<lb::logging::LogFormat>, Option<String>);

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("lb: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_flags = LogFlags(cli.log_format, cli.log_level);
    match cli.command {
        Command::Run { config } => {
            let c = lb::config::Config::load(&config)?;
            init_logs(&log_flags, Some(&c.log))?;
            runtime()?.block_on(lb::daemon::run(c, Some(config)))
        }
        Command::CheckConfig { config } => {
            let c = lb::config::Config::load(&config)?;
            let m = c.mesh()?;
            let tls = c.tls_settings()?;
            println!(
                "{}: ok, member {} of {}, control channel {}",
                config.display(),
                c.node.address,
                m.members.len(),
                if tls.is_some() { "mutual TLS (certificate files read and checked)" } else { "plaintext" }
            );
            for p in &m.members {
                let retries = match p.connect_retries {
                    cluster_proto::mesh::Retries::Infinite => "infinite".to_string(),
                    cluster_proto::mesh::Retries::Count(n) => n.to_string(),
                };
                println!(
                    "  {} keepalive {} ms, dead after {} intervals, connect retries {retries}",
                    SocketAddr::new(p.address, p.port),
                    p.session.keepalive.as_millis(),
                    p.session.dead_after,
                );
            }
            println!("  protocol version {} (highest spoken)", c.cluster.version);
            if let Some(d) = &c.dataplane {
                let owners = if d.owners.is_empty() {
                    "every member".to_string()
                } else {
                    d.owners.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
                };
                println!(
                    "  data plane: queue {}, policy {}, new flows owned by {owners}, fast path {}",
                    d.queue,
                    d.policy,
                    if d.fast_path { "on" } else { "off" }
                );
                if d.policy == lb::config::Policy::Affinity {
                    let a = &c.affinity;
                    println!(
                        "  affinity: pairs client /{} (v6 /{}) -> server /{} (v6 /{}), load bound {} x average \
                         (new pairs {}, slack {}), half-life {} s",
                        a.client_prefix_v4,
                        a.client_prefix_v6,
                        a.server_prefix_v4,
                        a.server_prefix_v6,
                        a.load_bound,
                        a.new_pair_bound,
                        a.load_slack,
                        a.half_life_s
                    );
                }
            }
            if let Some(p) = &c.proxy {
                let role = match p.role {
                    lb::config::ProxyRole::Plain => "plain",
                    lb::config::ProxyRole::Downstream => "downstream (encoder)",
                    lb::config::ProxyRole::Upstream => "upstream (decoder)",
                };
                println!("  proxy: {role} on {}, spoof {}", p.listen, p.spoof);
            }
            Ok(())
        }
        Command::GenCerts { out, members, name } => {
            let certs = lb::certs::generate(&name, &members)?;
            lb::certs::write(&out, &certs)?;
            println!("wrote {}/ca.pem (give to every member), ca.key (keep offline)", out.display());
            for m in &members {
                println!("wrote {0}/{1}.pem and {0}/{1}.key for member {1}", out.display(), m);
            }
            Ok(())
        }
        Command::Rules { config } => {
            let c = lb::config::Config::load(&config)?;
            if c.dataplane.is_none() && c.proxy.is_none() {
                bail!("{} has neither [dataplane] nor [proxy]: lb installs no rules", config.display());
            }
            if let Some(d) = &c.dataplane {
                print!("{}", lb::rules::describe(d));
            }
            if let Some(p) = &c.proxy {
                println!("\n# [proxy]: TPROXY, its policy rule and local route (removed on exit)");
                let families: &[bool] = if p.listen.is_ipv4() { &[false] } else { &[false, true] };
                for &v6 in families {
                    for cmd in lb::proxy::tproxy_rules(
                        p.listen.port(),
                        &p.intercept_tcp_ports,
                        p.tproxy_mark,
                        p.route_table,
                        v6,
                    ) {
                        println!("{}", cmd.join(" "));
                    }
                }
            }
            Ok(())
        }
        Command::Generate { what: Generate::Man { out } } => {
            std::fs::create_dir_all(&out)?;
            clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &out)?;
            Ok(())
        }
        Command::Generate { what: Generate::Completions { shell } } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "lb", &mut std::io::stdout());
            Ok(())
        }
        Command::Demo { connections, keep_running } => {
            if std::env::var_os("RUST_LOG").is_some() || log_flags.1.is_some() {
                init_logs(&log_flags, None)?;
            }
            runtime()?.block_on(lb::demo::run(lb::demo::DemoOptions { connections, keep_running }))
        }
        Command::Flows { admin, member, addr, protocol, limit, json } => {
            let mut filters = Vec::new();
            if let Some(m) = member {
                filters.push(format!("member={m}"));
            }
            if let Some(a) = addr {
                filters.push(format!("addr={a}"));
            }
            if let Some(p) = protocol {
                filters.push(format!("protocol={p}"));
            }
            // Pages of at most 10,000 flows, following the cursor, so a table of millions is
            // printed as it arrives and never held whole by either side.
            const PAGE: usize = 10_000;
            let wanted = if limit == 0 { usize::MAX } else { limit };
            let mut all: Option<FlowsView> = None;
            let mut after: Option<String> = None;
            let mut shown = 0usize;
            if !json {
                println!(
                    "{:<5} {:<45} {:<45} {:<8} {:<16} {:>6}",
                    "PROTO", "SOURCE", "DESTINATION", "ACTION", "OWNER", "AGE"
                );
            }
            let (total, member) = loop {
                let mut q = filters.clone();
                q.push(format!("limit={}", (wanted - shown).min(PAGE)));
                if let Some(c) = &after {
                    q.push(format!("after={c}"));
                }
                let v: FlowsView = client::get_json(admin.admin, &format!("/flows?{}", q.join("&")))?;
                shown += v.flows.len();
                if !json {
                    for f in &v.flows {
                        let owner = if f.local { format!("{} (local)", f.owner) } else { f.owner.to_string() };
                        println!(
                            "{:<5} {:<45} {:<45} {:<8} {:<16} {:>5}s",
                            f.protocol, f.src, f.dst, f.action, owner, f.age_secs
                        );
                    }
                }
                let (total, member, next) = (v.total, v.member, v.next.clone());
                if json {
                    match &mut all {
                        None => all = Some(v),
                        Some(a) => {
                            a.flows.extend(v.flows);
                            a.total = v.total;
                        }
                    }
                }
                match next {
                    Some(c) if shown < wanted => after = Some(c),
                    _ => break (total, member),
                }
            };
            if let Some(mut v) = all {
                v.next = None;
                return print_json(&v);
            }
            println!("{shown} of {total} flows known to {member}");
            Ok(())
        }
        Command::Peers { admin, json } => {
            let v: PeersView = client::get_json(admin.admin, "/peers")?;
            if json {
                return print_json(&v);
            }
            println!("{:<40} {:<12} {:<10} {:>9} {:>9} LAST CLOSE", "PEER", "STATE", "ROLE", "ENTRIES", "SINCE");
            for p in &v.peers {
                let role = match p.role {
                    Some(cluster_proto::session::Role::Initiator) => "initiator",
                    Some(cluster_proto::session::Role::Acceptor) => "acceptor",
                    None => "-",
                };
                println!(
                    "{:<40} {:<12} {:<10} {:>9} {:>8}s {}",
                    p.address,
                    p.state.as_str(),
                    role,
                    p.entries,
                    p.since_secs,
                    p.last_close.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        Command::Install { admin, conn, action } => send_connection(admin.admin, "POST", &conn, Some(&action)),
        Command::Remove { admin, conn } => send_connection(admin.admin, "DELETE", &conn, None),
    }
}

fn send_connection(admin: SocketAddr, method: &str, c: &ConnArgs, action: Option<&str>) -> anyhow::Result<()> {
    let mut body = serde_json::json!({ "protocol": c.protocol, "src": c.src, "dst": c.dst });
    if let Some(a) = action {
        body["action"] = a.into();
    }
    let (status, text) = client::request(admin, method, "/connections", Some(&body.to_string()))?;
    if !(200..300).contains(&status) {
        bail!("HTTP {status}: {text}");
    }
    println!("{text}");
    Ok(())
}
