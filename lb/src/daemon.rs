//! `lb run`: the member daemon.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cluster_proto::mesh::Mesh;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::metrics::Metrics;

/// Runs a member until SIGTERM or SIGINT (leave to restart) or SIGUSR2 (leave for good), then
/// leaves the cluster with PEER_LEAVE. `path` is
/// the file `config` came from: SIGHUP reloads it (see [`reload_on_hangup`]).
pub async fn run(mut config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    raise_descriptor_limit();
    let mut mesh_config = config.mesh()?;
    mesh_config.tls = config.tls_settings()?;
    if mesh_config.tls.is_none() {
        tracing::warn!(
            "control channel in plaintext (cluster.plaintext = true): anyone who can reach port {} can install \
             forwarding state; configure [tls] (docs/security.md)",
            config.cluster.port
        );
    }
    let metrics = Metrics::new();
    let mesh = Mesh::start(mesh_config, metrics.clone()).await?;
    metrics.set_mesh(&mesh);
    tracing::info!(address = %mesh.address(), port = mesh.port(), members = mesh.members().len(), "member started");
    // This member's own connections from before its restart: registered again, so its table
    // sync sends them and its peers' stale entries (graceful restart) are reclaimed.
    let restored = match &config.cluster.state_file {
        Some(file) => restore_state(&mesh, file),
        None => Vec::new(),
    };
    // The admin API first: everything after it installs system state (rules, routes), and
    // must not be left behind if a later step fails.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steering = config.dataplane.as_ref().map(|d| crate::dataplane::steering(d, &config.affinity, &mesh));
    if let Some(st) = &steering {
        metrics.set_steering(st.clone());
        if let Some(engine) = st.affinity() {
            crate::affinity::apply_advertisements(&mesh, engine.clone());
            if config.cluster.version < cluster_proto::wire::VERSION_2 {
                tracing::warn!(
                    "policy affinity on cluster.version 1: no dictionary statistics (DICT_STATS needs version 2); \
                     choosing by rendezvous on the client/server pair within the load bound"
                );
            }
        }
    }
    let mut stop_admin = stop_rx.clone();
    let admin = admin::serve(
        config.admin.listen,
        AdminState { mesh: mesh.clone(), metrics: metrics.clone(), ready: ready.clone(), steering: steering.clone() },
        config.admin.limits(),
        async move {
            let _ = stop_admin.wait_for(|s| *s).await;
        },
    )
    .await
    .with_context(|| format!("cannot listen on admin.listen {}", config.admin.listen))?;
    tracing::info!(listen = %config.admin.listen, "admin API up");
    let metrics_listener = match config.admin.metrics_listen {
        Some(listen) => {
            let mut stop = stop_rx.clone();
            let task = crate::metrics_listener::serve(listen, mesh.clone(), metrics.clone(), async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            .with_context(|| format!("cannot listen on admin.metrics_listen {listen}"))?;
            tracing::info!(%listen, "metrics listener up");
            Some(task)
        }
        None => None,
    };
    let dataplane = match (&config.dataplane, &steering) {
        (Some(d), Some(st)) => {
            let dp = crate::dataplane::start(d, st.clone(), &mesh, &restored)?;
            metrics.set_dataplane(dp.stats.clone());
            tracing::info!(queue = d.queue, tun = %d.tun, policy = %d.policy, "data plane started");
            Some(dp)
        }
        _ => None,
    };
    // Dropped on any exit (error included): removes the proxy's rules.
    // An upstream proxy's dictionaries are what the affinity engines steer by: it records
    // their savings per client/server pair and advertises them (DICT_STATS).
    let savings = match &config.proxy {
        Some(p) if p.role == crate::config::ProxyRole::Upstream => {
            let a = config.affinity.engine_config();
            let savings = std::sync::Arc::new(crate::affinity::Savings::new(
                a.granularity,
                a.half_life,
                a.max_pairs,
                crate::affinity::Savings::epoch_now(),
            ));
            if config.cluster.version < cluster_proto::wire::VERSION_2 {
                tracing::warn!("proxy role upstream on cluster.version 1: dictionary statistics are not advertised");
            }
            tokio::spawn(crate::affinity::advertise(
                mesh.clone(),
                savings.clone(),
                steering.as_ref().and_then(|st| st.affinity().cloned()),
                Duration::from_millis(config.affinity.advertise_ms),
                stop_rx.clone(),
            ));
            Some(savings)
        }
        _ => None,
    };
    let (_proxy_rules, proxy_task) = match &config.proxy {
        Some(p) => {
            let sink = savings.map(|s| s as std::sync::Arc<dyn crate::chain::SavingsSink>);
            let (rules, task) = start_proxy(p, config.node.address, sink, stop_rx.clone(), &metrics).await?;
            (Some(rules), Some(task))
        }
        None => (None, None),
    };

    // SIGHUP must not end the member (its default action), whatever the reload does.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())?;
    // SIGTERM and SIGINT stop to restart (peers keep this member's entries for its restart
    // time, version 2); SIGUSR2 takes the member out for good (they purge them at once).
    let mut for_good = false;
    ready.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!("ready");
    let status = format!("member {} of {}, ready", mesh.address(), mesh.members().len());
    crate::notify::ready(&status);
    if let Some(every) = crate::notify::watchdog_every() {
        let dp = dataplane.as_ref().map(|d| d.stats.clone());
        let healthy = move || match &dp {
            Some(s) if !s.lock().unwrap_or_else(|e| e.into_inner()).running => Err("the data plane stopped"),
            _ => Ok(()),
        };
        tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
        tokio::spawn(crate::notify::watchdog(every, healthy, stop_rx.clone()));
    }
    let saver = config.cluster.state_file.clone().map(|file| {
        let every = Duration::from_millis(config.cluster.state_save_ms);
        tokio::spawn(save_state_every(mesh.clone(), file, every, stop_rx.clone()))
    });
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: leaving the cluster");
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT: leaving the cluster");
                break;
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: leaving the cluster for good (peers purge this member's entries at once)");
                for_good = true;
                break;
            }
            _ = hangup.recv() => {
                let bypass = dataplane.as_ref().map(|d| &d.bypass);
                reload_on_hangup(path.as_deref(), &mut config, &mesh, steering.as_deref(), bypass);
                crate::notify::status(&status);
            }
        }
    }
    crate::notify::stopping("leaving the cluster");
    if let Some(dp) = dataplane {
        // The queue closes, then the rules go; --queue-bypass lets packets through between.
        tokio::task::spawn_blocking(move || dp.stop()).await?;
    }
    let _ = stop_tx.send(true);
    if let Some(task) = proxy_task {
        // The proxy saves the chain's pair dictionaries (dictionary_dir) as it stops.
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    drop(_proxy_rules);
    if let Some(task) = saver {
        // Ended by the stop signal; a save under way finishes first.
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    if let Some(file) = &config.cluster.state_file {
        if for_good {
            // Out of service: nothing to come back to.
            match std::fs::remove_file(file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(file = %file.display(), error = %e, "cannot remove the state file")
                }
                _ => {}
            }
        } else {
            save_state(&mesh, file).await;
        }
    }
    if for_good {
        mesh.leave_for_good(Duration::from_secs(2)).await;
    } else {
        mesh.shutdown(Duration::from_secs(2)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
    if let Some(task) = metrics_listener {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    tracing::info!("left the cluster");
    Ok(())
}

/// Registers the connections of the state file again. A file that cannot be used is reported
/// and left as it is (for a look), and the member starts with no connection of its own.
fn restore_state(mesh: &Mesh, file: &std::path::Path) -> Vec<cluster_proto::Connection> {
    match crate::state::load(file) {
        Ok(entries) => {
            let mut lost = 0;
            for &(c, action) in &entries {
                if let cluster_proto::mesh::Claim::Lost { .. } = mesh.claim(c, action) {
                    lost += 1;
                }
            }
            tracing::info!(file = %file.display(), restored = entries.len() - lost, lost, "own connections registered again from the state file");
            entries.into_iter().map(|(c, _)| c).collect()
        }
        Err(e) => {
            tracing::error!(error = %e, "state file not used: starting with no connection of this member's own");
            Vec::new()
        }
    }
}

/// Writes this member's own connections to the state file (off the runtime).
async fn save_state(mesh: &Mesh, file: &std::path::Path) {
    let (mesh, path) = (mesh.clone(), file.to_path_buf());
    let done = tokio::task::spawn_blocking(move || {
        let entries = mesh.local().snapshot();
        crate::state::save(&path, &entries).map(|_| entries.len())
    })
    .await;
    match done {
        Ok(Ok(n)) => tracing::debug!(file = %file.display(), connections = n, "state file saved"),
        Ok(Err(e)) => tracing::warn!(file = %file.display(), error = %e, "cannot write the state file"),
        Err(e) => tracing::warn!(error = %e, "the state file task failed"),
    }
}

/// Saves the state file every `every` while the connections change, until `stop`.
async fn save_state_every(mesh: Mesh, file: PathBuf, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut saved = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let generation = mesh.local().generation();
        if saved != Some(generation) {
            save_state(&mesh, &file).await;
            saved = Some(generation);
        }
    }
}

/// SIGHUP (`systemctl reload`, logrotate): reads the configuration file again and applies what
/// can change while the member runs (`reload.rs`); a file that changes anything else is
/// refused as a whole, with the keys named, and an invalid file changes nothing. Either way the
/// member keeps running, and `running` is what is in force afterwards.
fn reload_on_hangup(
    path: Option<&std::path::Path>,
    running: &mut Config,
    mesh: &Mesh,
    steering: Option<&crate::steering::Steering>,
    bypass: Option<&handoff::classify::BypassList>,
) {
    let Some(path) = path else {
        tracing::info!("SIGHUP: no configuration file to reload; nothing changed");
        return;
    };
    let new = match Config::load(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(
                path = %path.display(),
                error = %format!("{e:#}"),
                "SIGHUP: the configuration file is invalid; the running configuration stays"
            );
            return;
        }
    };
    match crate::reload::plan(running, &new) {
        crate::reload::Plan::Unchanged => tracing::info!(path = %path.display(), "SIGHUP: configuration unchanged"),
        crate::reload::Plan::Refuse { keys } => tracing::warn!(
            path = %path.display(),
            keys = %keys.join(", "),
            "SIGHUP: not applied: these keys cannot change while the member runs; restart the member to apply \
             them (the running configuration stays)"
        ),
        crate::reload::Plan::Apply { changes, keys } => {
            for change in changes {
                apply(&change, mesh, steering, bypass);
            }
            *running = new;
            tracing::info!(path = %path.display(), keys = %keys.join(", "), "SIGHUP: configuration reloaded");
            tracing::debug!("SIGHUP: reload done");
        }
    }
}

/// Carries out one change of a reload plan (each was checked by `reload::plan`).
fn apply(
    change: &crate::reload::Change,
    mesh: &Mesh,
    steering: Option<&crate::steering::Steering>,
    bypass: Option<&handoff::classify::BypassList>,
) {
    use crate::reload::Change;
    match change {
        Change::Bypass(entries) => {
            let d = crate::config::Dataplane { bypass: entries.clone(), ..Default::default() };
            match (bypass, crate::dataplane::bypass_rules(&d)) {
                (Some(list), Ok(rules)) => list.set(rules),
                (_, Err(e)) => tracing::error!(error = %e, "SIGHUP: dataplane.bypass not changed"),
                (None, _) => {}
            }
        }
        Change::FloodGuard { max_entries_per_member, max_install_rate } => {
            mesh.set_flood_guard(*max_entries_per_member, *max_install_rate);
        }
        Change::Owners(owners) => {
            if let Some(st) = steering {
                st.set_owners(crate::dataplane::owner_ids(owners, &mesh.members()));
            }
        }
        Change::Policy(policy) => {
            if let (Some(st), Some(kind)) = (steering, crate::dataplane::policy_kind(*policy)) {
                if let Err(e) = st.set_policy(kind) {
                    tracing::error!(error = e, "SIGHUP: dataplane.policy not changed");
                }
            }
        }
        Change::AffinityBounds(load_bound, new_pair_bound, load_slack) => {
            // Only the affinity policy decides by them.
            if let Some(engine) = steering.and_then(|st| st.affinity()) {
                engine.set_load_bounds(*load_bound, *new_pair_bound, *load_slack);
            }
        }
        Change::LogLevel(level) => match crate::logging::set_level(level.as_deref()) {
            Ok(crate::logging::LevelChange::Overridden) => tracing::warn!(
                "SIGHUP: log.level changed, but --log-level or RUST_LOG set the level at start and keep it"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "SIGHUP: log.level not changed"),
        },
    }
}

/// The proxy's rules, removed when dropped.
struct InstalledRules(Vec<Vec<String>>);

impl Drop for InstalledRules {
    fn drop(&mut self) {
        let _ = run_commands(&undo(&self.0), false);
    }
}

/// The chain role of `[proxy]`, if any; an upstream reports its savings to `savings`.
fn chain_config(
    p: &crate::config::ProxySection,
    node: std::net::IpAddr,
    savings: Option<std::sync::Arc<dyn crate::chain::SavingsSink>>,
) -> Option<crate::chain::ChainConfig> {
    use crate::chain::Role;
    use crate::config::ProxyRole;
    let role = match p.role {
        ProxyRole::Plain => return None,
        ProxyRole::Downstream => Role::Downstream,
        ProxyRole::Upstream => Role::Upstream,
    };
    Some(crate::chain::ChainConfig {
        role,
        chain_ports: p.chain_ports.clone(),
        detect: Duration::from_millis(p.detect_ms),
        hello_timeout: Duration::from_millis(p.connect_timeout_ms),
        budget: p.dictionary_budget_mb << 20,
        dictionary_dir: p.dictionary_dir.clone(),
        id: p.chain_id.clone().unwrap_or_else(|| node.to_string()),
        zstd: p.zstd,
        shared: p.shared_dictionaries,
        max_pairs: p.max_dictionary_pairs,
        savings,
        codec_version: dictionary_affinity::codec::VERSION,
    })
}

/// Starts the transparent proxy and installs its rules (after removing any an earlier run
/// left behind, so a restart after a crash works).
async fn start_proxy(
    p: &crate::config::ProxySection,
    node: std::net::IpAddr,
    savings: Option<std::sync::Arc<dyn crate::chain::SavingsSink>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    metrics: &Metrics,
) -> anyhow::Result<(InstalledRules, tokio::task::JoinHandle<()>)> {
    let proxy = crate::proxy::bind(crate::proxy::ProxyConfig {
        listen: p.listen,
        spoof: p.spoof,
        connect_timeout: Duration::from_millis(p.connect_timeout_ms),
        idle_timeout: Duration::from_millis(p.idle_timeout_ms),
        max_connections: p.max_connections,
        chain: chain_config(p, node, savings),
    })
    .await
    .with_context(|| format!("cannot listen on proxy.listen {} (IP_TRANSPARENT needs root)", p.listen))?;
    metrics.set_proxy(proxy.stats());
    if let Some(chain) = proxy.chain_stats() {
        metrics.set_chain(chain);
    }
    let mut rules = Vec::new();
    if p.manage_rules {
        let families: &[bool] = if p.listen.is_ipv4() { &[false] } else { &[false, true] };
        for &v6 in families {
            rules.extend(crate::proxy::tproxy_rules(
                p.listen.port(),
                &p.intercept_tcp_ports,
                p.tproxy_mark,
                p.route_table,
                v6,
            ));
        }
        // Stale copies from a crashed run would duplicate rules and make `ip route add` fail.
        for _ in 0..4 {
            let _ = run_commands(&undo(&rules), false);
        }
        if let Err(e) = run_commands(&rules, true) {
            let _ = run_commands(&undo(&rules), false);
            return Err(e);
        }
        tracing::info!(listen = %p.listen, ports = ?p.intercept_tcp_ports, "TPROXY rules installed");
    }
    let task = tokio::spawn(proxy.serve(async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    tracing::info!(listen = %p.listen, spoof = p.spoof, role = ?p.role, "transparent proxy up");
    Ok((InstalledRules(rules), task))
}

/// Runs argv commands in order; with `strict`, the first failure is an error.
fn run_commands(cmds: &[Vec<String>], strict: bool) -> anyhow::Result<()> {
    for c in cmds {
        let out = std::process::Command::new(&c[0]).args(&c[1..]).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) if strict => {
                anyhow::bail!("`{}` failed: {}", c.join(" "), String::from_utf8_lossy(&o.stderr).trim())
            }
            Err(e) if strict => anyhow::bail!("cannot run `{}`: {e}", c.join(" ")),
            _ => {}
        }
    }
    Ok(())
}

/// The commands that remove what `cmds` added, in reverse order.
fn undo(cmds: &[Vec<String>]) -> Vec<Vec<String>> {
    cmds.iter()
        .rev()
        .map(|c| {
            c.iter()
                .map(|w| match w.as_str() {
                    "-A" => "-D".to_string(),
                    "add" => "del".to_string(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect()
}

/// Raises the soft descriptor limit to the hard one: the default soft limit of 1,024 is
/// used up by a few hundred peers', proxies' and admin clients' sockets, after which every
/// listener fails to accept.
fn raise_descriptor_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}
