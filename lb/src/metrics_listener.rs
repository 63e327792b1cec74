//! `admin.metrics_listen`: a listener that serves only `GET /metrics`, for a scraper that
//! should not reach the admin API's `POST`/`DELETE /connections`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cluster_proto::mesh::Mesh;

use crate::metrics::Metrics;

/// What the handler reads.
#[derive(Clone)]
struct Scrape {
    mesh: Mesh,
    metrics: Arc<Metrics>,
}

/// The listener's routes: `GET /metrics`; anything else is 404 (405 for another method on
/// `/metrics`), with a JSON error body.
pub fn router(mesh: Mesh, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text).fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED) }))
        .fallback(|| async { error(StatusCode::NOT_FOUND) })
        .with_state(Scrape { mesh, metrics })
}

fn error(status: StatusCode) -> Response {
    let message = format!("{}: this listener serves only GET /metrics", status.canonical_reason().unwrap_or(""));
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn metrics_text(State(s): State<Scrape>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render(&s.mesh)).into_response()
}

/// Binds `listen` and serves `/metrics` until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    mesh: Mesh,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let app = router(mesh, metrics);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    }))
}
