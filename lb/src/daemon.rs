//! `lb run`: the member daemon.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use cluster_proto::mesh::Mesh;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::metrics::Metrics;

/// Runs a member until SIGTERM or SIGINT, then leaves the cluster with PEER_LEAVE.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let mesh_config = config.mesh()?;
    let metrics = Metrics::new();
    let mesh = Mesh::start(mesh_config, metrics.clone()).await?;
    tracing::info!(address = %mesh.address(), port = mesh.port(), members = mesh.members().len(), "member started");
    let dataplane = match &config.dataplane {
        Some(d) => {
            let dp = crate::dataplane::start(d, &mesh)?;
            metrics.set_dataplane(dp.stats.clone());
            tracing::info!(queue = d.queue, tun = %d.tun, policy = %d.policy, "data plane started");
            Some(dp)
        }
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_admin = stop_rx.clone();
    let admin = admin::serve(config.admin.listen, AdminState { mesh: mesh.clone(), metrics }, async move {
        let _ = stop_admin.wait_for(|s| *s).await;
    })
    .await
    .with_context(|| format!("cannot listen on admin.listen {}", config.admin.listen))?;
    tracing::info!(listen = %config.admin.listen, "admin API up");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: leaving the cluster"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: leaving the cluster"),
    }
    if let Some(dp) = dataplane {
        // Rules go first, so traffic is never queued to a queue nobody reads.
        tokio::task::spawn_blocking(move || dp.stop()).await?;
    }
    mesh.shutdown(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
    tracing::info!("left the cluster");
    Ok(())
}
