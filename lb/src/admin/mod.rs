//! The admin HTTP API: `/metrics`, `/peers`, `/flows`, and `/connections` for proxies that
//! register the connections they intercept or bypass (the integration API).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cluster_proto::mesh::{Claim, Mesh};
use cluster_proto::{Action, Connection, Protocol};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

pub mod flows;
pub mod server;

use flows::{Filter, FlowKey, MAX_PAGE};
pub use server::ServerLimits;

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

/// The API's routes. An unknown path is 404 and a known path with another method 405, both
/// with a JSON error body like every other refusal.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/peers", get(peers))
        .route("/flows", get(flows))
        .route("/connections", axum::routing::post(install).delete(remove))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such path (GET /metrics, /ready, /peers, /flows; POST or DELETE /connections)",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this path (POST and DELETE on /connections, GET elsewhere)",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Largest request body accepted (room for a [`MAX_BATCH`] array with IPv6 addresses).
pub const MAX_BODY: usize = 16 << 20;

/// The JSON error refusing a body that could not be read (413 over [`MAX_BODY`]).
fn body_refused(e: BytesRejection) -> Response {
    error(e.status(), format!("{} (at most {MAX_BODY} bytes)", e.body_text()))
}

/// Binds `listen` and serves the API, within `limits`, until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    state: AdminState,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    server::serve(listen, router(state), limits, shutdown).await
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
    pub peers: Vec<cluster_proto::mesh::PeerInfo>,
}

async fn peers(State(s): State<AdminState>) -> Response {
    Json(PeersView { node: s.mesh.address(), peers: s.mesh.peers() }).into_response()
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
    /// At most this many flows in the answer (default 1000, at most 100,000; 0 streams all).
    pub limit: Option<usize>,
    /// Start after this flow: the `next` of the previous page.
    pub after: Option<String>,
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
    /// The first `limit` of them after the cursor, in order.
    pub flows: Vec<FlowView>,
    /// The cursor of the next page (`after=`), when there are more flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

async fn flows(
    State(s): State<AdminState>,
    q: Result<Query<FlowQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad query: use member=ADDR, addr=ADDR, protocol=tcp|udp, limit=N, after=CURSOR, explain=true|false",
        );
    };
    let protocol = match q.protocol.as_deref().map(str::parse::<Protocol>) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let after = match q.after.as_deref().map(FlowKey::parse) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let filter = Filter { member: q.member, addr: q.addr, protocol };
    let explain = q.explain == Some(true);
    match q.limit.unwrap_or(1000) {
        0 => stream_flows(s, filter, after, explain),
        n if n > MAX_PAGE => {
            error(StatusCode::BAD_REQUEST, format!("limit is at most {MAX_PAGE} (0 streams every flow)"))
        }
        limit => {
            let page = tokio::task::spawn_blocking(move || {
                let page = scan_page(&s, &filter, after.as_ref(), limit);
                let flows = Viewer::new(&s, explain).views(&page.flows);
                FlowsView { member: s.mesh.address(), total: page.total, next: page.next(), flows }
            })
            .await;
            match page {
                Ok(v) => Json(v).into_response(),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("flow scan failed: {e}")),
            }
        }
    }
}

/// One table scan at a time: each is a full pass over millions of entries.
static SCAN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Flows per page of a streamed (`limit=0`) answer: a page's JSON is about 10 MiB.
const STREAM_PAGE: usize = 50_000;

/// Runs one scan of the local table and the database for a page (on a blocking thread).
fn scan_page(s: &AdminState, filter: &Filter, after: Option<&FlowKey>, limit: usize) -> flows::Page {
    let _one_at_a_time = SCAN.lock().unwrap_or_else(|e| e.into_inner());
    let me = s.mesh.address();
    let members = s.mesh.members();
    let (db_now, local_now) = (s.mesh.database().now_secs(), s.mesh.local().entry_now_secs());
    flows::select(
        |f| {
            s.mesh.local().for_each(|e| f(e, me, true, local_now));
            s.mesh.database().for_each(|e| f(e, members.get(e.owner.0 as usize).copied().unwrap_or(me), false, db_now));
        },
        filter,
        after,
        limit,
    )
}

/// Builds the views of picked flows: the owner policy's reason, and with `explain` the
/// affinity engine's reasoning.
struct Viewer<'a> {
    steering: Option<&'a crate::steering::Steering>,
    explainer: Option<&'a dictionary_affinity::affinity::AffinityEngine>,
    eligible: Vec<cluster_proto::MemberId>,
}

impl<'a> Viewer<'a> {
    fn new(s: &'a AdminState, explain: bool) -> Self {
        let steering = s.steering.as_deref();
        let explainer = steering.filter(|_| explain).and_then(|st| st.affinity().map(|e| &**e));
        let eligible = match (steering, explainer) {
            (Some(st), Some(_)) => st.eligible(&s.mesh.live_members()),
            _ => Vec::new(),
        };
        Viewer { steering, explainer, eligible }
    }

    fn views(&self, picked: &[flows::Picked]) -> Vec<FlowView> {
        picked
            .iter()
            .map(|p| {
                let c = &p.entry.connection;
                flows::view(
                    p,
                    self.steering.and_then(|st| st.recorded(c)).map(|r| r.reason.to_string()),
                    self.explainer.map(|engine| engine.explain(&engine.pair(c), &self.eligible)),
                )
            })
            .collect()
    }
}

/// `limit=0`: every flow, in order, written page by page as the pages are computed (memory
/// bounded by a few pages, whatever the table). The answer is not a snapshot: flows installed
/// or removed while it is written may or may not appear; `total` is the last page's count.
fn stream_flows(s: AdminState, filter: Filter, after: Option<FlowKey>, explain: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::task::spawn_blocking(move || {
        let head = format!("{{\"member\":{},\"flows\":[", serde_json::json!(s.mesh.address()));
        if tx.blocking_send(Ok(head.into())).is_err() {
            return;
        }
        let viewer = Viewer::new(&s, explain);
        let mut cursor = after;
        let mut first = true;
        let total = loop {
            let page = scan_page(&s, &filter, cursor.as_ref(), STREAM_PAGE);
            let mut buf = Vec::with_capacity(page.flows.len() * 160);
            for v in viewer.views(&page.flows) {
                if !first {
                    buf.push(b',');
                }
                first = false;
                serde_json::to_writer(&mut buf, &v).expect("a flow view serializes");
            }
            // The client went away: stop scanning.
            if tx.blocking_send(Ok(buf.into())).is_err() {
                return;
            }
            match page.next() {
                Some(_) => cursor = page.flows.last().map(|p| p.key),
                None => break page.total,
            }
        };
        let _ = tx.blocking_send(Ok(format!("],\"total\":{total}}}").into()));
    });
    let body = axum::body::Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
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

impl ConnectionRequest {
    /// The connection and action asked for; the error is the message for a 400 answer.
    fn parse(&self) -> Result<(Connection, Action), String> {
        let protocol: Protocol = self.protocol.parse()?;
        let action: Action = match self.action.as_deref() {
            None => Action::Forward,
            Some(a) => a.parse()?,
        };
        let c = Connection::new(protocol, self.src, self.dst).map_err(|e| e.to_string())?;
        Ok((c, action))
    }
}

/// Parses a connection request; the error is the message for a 400 answer.
fn parse_request(body: &Bytes) -> Result<(Connection, Action), String> {
    let r: ConnectionRequest = serde_json::from_slice(body).map_err(|e| format!("bad body: {e}"))?;
    r.parse()
}

/// At most this many connections in one `POST /connections` array.
pub const MAX_BATCH: usize = 100_000;

/// `POST /connections`: one connection (an object), or many (an array of them, registered
/// off the async runtime; all are checked before any is registered).
async fn install(State(s): State<AdminState>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_refused(e),
    };
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return install_many(s, body).await;
    }
    match parse_request(&body) {
        Err(e) => error(StatusCode::BAD_REQUEST, e),
        Ok((c, action)) => {
            let (status, installed) = match s.mesh.claim(c, action) {
                Claim::Installed => (StatusCode::CREATED, true),
                Claim::Unchanged => (StatusCode::OK, false),
                Claim::Lost { owner } => {
                    return error(
                        StatusCode::CONFLICT,
                        format!(
                        "{c} is claimed by member {owner}, whose claim wins (lower address); it owns the connection"
                    ),
                    )
                }
            };
            (
                status,
                Json(serde_json::json!({ "installed": installed, "connection": c.to_string(), "action": action.as_str() })),
            )
                .into_response()
        }
    }
}

/// The array form of `POST /connections`: answers 200 with how many were installed, were
/// already there, and lost to another member's claim (the first few of those named).
async fn install_many(s: AdminState, body: Bytes) -> Response {
    let requests: Vec<ConnectionRequest> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad body: {e}")),
    };
    if requests.len() > MAX_BATCH {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{} connections in one request; at most {MAX_BATCH}", requests.len()),
        );
    }
    let mut parsed = Vec::with_capacity(requests.len());
    for (i, r) in requests.into_iter().enumerate() {
        match r.parse() {
            Ok(c) => parsed.push(c),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("connection {i}: {e}; none registered")),
        }
    }
    let mesh = s.mesh.clone();
    let tally = tokio::task::spawn_blocking(move || {
        let (mut installed, mut unchanged, mut lost) = (0usize, 0usize, Vec::new());
        for (c, action) in parsed {
            match mesh.claim(c, action) {
                Claim::Installed => installed += 1,
                Claim::Unchanged => unchanged += 1,
                Claim::Lost { owner } => lost.push((c, owner)),
            }
        }
        (installed, unchanged, lost)
    })
    .await;
    let Ok((installed, unchanged, lost)) = tally else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "the registration task failed");
    };
    let named: Vec<String> =
        lost.iter().take(10).map(|(c, owner)| format!("{c} is claimed by member {owner}, whose claim wins")).collect();
    Json(serde_json::json!({ "installed": installed, "unchanged": unchanged, "lost": lost.len(), "lost_first": named }))
        .into_response()
}

async fn remove(State(s): State<AdminState>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_refused(e),
    };
    match parse_request(&body) {
        Err(e) => error(StatusCode::BAD_REQUEST, e),
        Ok((c, _)) => match s.mesh.remove(&c) {
            Some(a) => Json(serde_json::json!({ "removed": true, "connection": c.to_string(), "action": a.as_str() }))
                .into_response(),
            None => error(StatusCode::NOT_FOUND, format!("{c} is not a local connection of this member")),
        },
    }
}
