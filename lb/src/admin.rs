//! The admin HTTP API: `/metrics`, `/peers`, `/flows`, and `/connections` for proxies that
//! register the connections they intercept or bypass (the integration API).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cluster_proto::mesh::Mesh;
use cluster_proto::{Action, Connection, Entry, Protocol};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The member's mesh.
    pub mesh: Mesh,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Set once everything the configuration asks for (data plane, proxy) is running.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The data plane's owner steering, to say why flows have their owners.
    pub steering: Option<Arc<crate::steering::Steering>>,
}

/// The API's routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/peers", get(peers))
        .route("/flows", get(flows))
        .route("/connections", axum::routing::post(install).delete(remove))
        .with_state(state)
}

/// Binds `listen` and serves the API until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let app = router(state);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    }))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// `GET /ready`: 200 once the member runs everything its configuration asks for, 503 before
/// (for orchestration and tests; `/peers` answers as soon as the admin API is up).
async fn ready(State(s): State<AdminState>) -> Response {
    if s.ready.load(std::sync::atomic::Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render(&s.mesh)).into_response()
}

/// `GET /peers` body.
#[derive(Serialize, Deserialize)]
pub struct PeersView {
    /// This member's address.
    pub node: IpAddr,
    /// Every other member.
    pub peers: Vec<serde_json::Value>,
}

async fn peers(State(s): State<AdminState>) -> Response {
    let peers = s.mesh.peers().into_iter().map(|p| serde_json::to_value(p).unwrap_or_default()).collect();
    Json(PeersView { node: s.mesh.address(), peers }).into_response()
}

/// Filters of `GET /flows`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    /// Only entries owned by this member address.
    pub member: Option<IpAddr>,
    /// Only connections with this address at either end.
    pub addr: Option<IpAddr>,
    /// Only tcp or udp.
    pub protocol: Option<String>,
    /// At most this many flows in the answer (default 1000, 0 for all).
    pub limit: Option<usize>,
    /// With the affinity policy: add the engine's reasoning for each flow's pair.
    pub explain: Option<bool>,
}

/// One connection as shown by `GET /flows` and `lb flows`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FlowView {
    /// tcp or udp.
    pub protocol: String,
    /// Source endpoint, in the originator's direction.
    pub src: SocketAddr,
    /// Destination endpoint.
    pub dst: SocketAddr,
    /// forward or bypass.
    pub action: String,
    /// The owning (originating) member's address.
    pub owner: IpAddr,
    /// True for this member's own connections.
    pub local: bool,
    /// Seconds since it was installed here.
    pub age_secs: u32,
    /// Why the flow has its owner, when this member chose the owner (owner policy reason,
    /// e.g. "affinity", "rendezvous_no_dictionary", "rendezvous").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// With `explain=true` and the affinity policy: scores, loads and bound for the flow's pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<String>,
}

/// `GET /flows` body: the whole cluster's connections as this member knows them.
#[derive(Serialize, Deserialize, Debug)]
pub struct FlowsView {
    /// The member answering.
    pub member: IpAddr,
    /// Flows matching the filters.
    pub total: usize,
    /// The first `limit` of them.
    pub flows: Vec<FlowView>,
}

async fn flows(
    State(s): State<AdminState>,
    q: Result<Query<FlowQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad query: use member=ADDR, addr=ADDR, protocol=tcp|udp, limit=N, explain=true|false",
        );
    };
    let protocol = match q.protocol.as_deref().map(str::parse::<Protocol>) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = match q.limit {
        None => 1000,
        Some(0) => usize::MAX,
        Some(n) => n,
    };
    let me = s.mesh.address();
    let steering = s.steering.as_deref();
    let explainer = steering.filter(|_| q.explain == Some(true)).and_then(|st| st.affinity().map(|e| (st, e)));
    let eligible = explainer.map(|(st, _)| st.eligible(&s.mesh.live_members())).unwrap_or_default();
    let (db_now, local_now) = (s.mesh.database().now_secs(), s.mesh.local().entry_now_secs());
    let mut out = Vec::new();
    let mut total = 0;
    let mut visit = |e: Entry, owner: IpAddr, local: bool, now: u32| {
        if q.member.is_some_and(|m| m != owner)
            || q.addr.is_some_and(|a| !e.connection.involves(a))
            || protocol.is_some_and(|p| p != e.connection.protocol())
        {
            return;
        }
        total += 1;
        if out.len() < limit {
            out.push(FlowView {
                protocol: e.connection.protocol().to_string(),
                src: e.connection.src(),
                dst: e.connection.dst(),
                action: e.action.to_string(),
                owner,
                local,
                age_secs: now.wrapping_sub(e.installed_at) & ((1 << 20) - 1),
                reason: steering.and_then(|st| st.recorded(&e.connection)).map(|r| r.reason.to_string()),
                explain: explainer.map(|(_, engine)| engine.explain(&engine.pair(&e.connection), &eligible)),
            });
        }
    };
    s.mesh.local().for_each(|e| visit(e, me, true, local_now));
    let members = s.mesh.members();
    s.mesh.database().for_each(|e| {
        let owner = members.get(e.owner.0 as usize).copied().unwrap_or(me);
        visit(e, owner, false, db_now)
    });
    Json(FlowsView { member: me, total, flows: out }).into_response()
}

/// Body of `POST /connections` and `DELETE /connections`.
#[derive(Deserialize, Serialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ConnectionRequest {
    /// tcp or udp.
    pub protocol: String,
    /// Source endpoint ("192.0.2.1:1234" or "[2001:db8::1]:1234").
    pub src: SocketAddr,
    /// Destination endpoint.
    pub dst: SocketAddr,
    /// forward (default) or bypass.
    #[serde(default)]
    pub action: Option<String>,
}

/// Parses a connection request; the error is the message for a 400 answer.
fn parse_request(body: &Bytes) -> Result<(Connection, Action), String> {
    let r: ConnectionRequest = serde_json::from_slice(body).map_err(|e| format!("bad body: {e}"))?;
    let protocol: Protocol = r.protocol.parse()?;
    let action: Action = match r.action.as_deref() {
        None => Action::Forward,
        Some(a) => a.parse()?,
    };
    let c = Connection::new(protocol, r.src, r.dst).map_err(|e| e.to_string())?;
    Ok((c, action))
}

async fn install(State(s): State<AdminState>, body: Bytes) -> Response {
    match parse_request(&body) {
        Err(e) => error(StatusCode::BAD_REQUEST, e),
        Ok((c, action)) => {
            let new = s.mesh.install(c, action);
            let status = if new { StatusCode::CREATED } else { StatusCode::OK };
            (
                status,
                Json(serde_json::json!({ "installed": new, "connection": c.to_string(), "action": action.as_str() })),
            )
                .into_response()
        }
    }
}

async fn remove(State(s): State<AdminState>, body: Bytes) -> Response {
    match parse_request(&body) {
        Err(e) => error(StatusCode::BAD_REQUEST, e),
        Ok((c, _)) => match s.mesh.remove(&c) {
            Some(a) => Json(serde_json::json!({ "removed": true, "connection": c.to_string(), "action": a.as_str() }))
                .into_response(),
            None => error(StatusCode::NOT_FOUND, format!("{c} is not a local connection of this member")),
        },
    }
}
