//! Health, readiness, cluster membership and metrics.

use super::{ApiError, AppState};
use crate::metrics::Histogram;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// `GET /healthz`: the process is up.
pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: the store answers reads.
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let node = state.node().clone();
    let probe = tokio::task::spawn_blocking(move || node.store().get(b"readyz-probe")).await;
    match probe {
        Ok(Ok(_)) => "ready\n".into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response(),
    }
}

/// `GET /v1/cluster`: this node and the members it knows (itself, for now).
pub(super) async fn cluster(State(state): State<AppState>) -> Json<serde_json::Value> {
    let id = state.node().id().to_string();
    let me =
        json!({ "id": id, "http_addr": state.inner.http_addr, "state": "alive", "incarnation": 0 });
    Json(json!({ "node": me, "members": [me], "quorum": null }))
}

/// `GET /metrics`: Prometheus text format.
pub(super) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let node = state.node().clone();
    let store = match tokio::task::spawn_blocking(move || node.store().stats()).await {
        Ok(stats) => stats.map_err(crate::NodeError::from)?,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    };
    let histograms: Vec<(&str, &str, &Histogram)> = match &store.flush_latency {
        Some(h) => vec![("calmkv_store_flush_seconds", "Latency of store flushes (fsync).", h)],
        None => vec![],
    };
    let mut gauges = store.gauges();
    gauges.push((
        "calmkv_http_in_flight_requests",
        "HTTP requests being served (this one included), bounded by the in-flight limit.",
        state.in_flight_requests() as f64,
    ));
    let channel = state.cluster().channel();
    gauges.extend(channel.metrics().exposition());
    gauges.push(("calmkv_peers", "Peers this node replicates to.", channel.peers().len() as f64));
    let backlog: usize = channel.outbox_bytes().iter().map(|(_, bytes)| bytes).sum();
    gauges.push((
        "calmkv_replication_backlog_bytes",
        "Bytes waiting in peer outboxes: how far replication lags behind local writes.",
        backlog as f64,
    ));
    let text = state.inner.metrics.render(&gauges, &histograms);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
