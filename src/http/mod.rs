//! The HTTP API (DESIGN.md §7) on axum.
//!
//! Handlers only translate: they parse a request into an [`Op`](crate::Op) or a
//! read, call the [`Node`] on the blocking pool (a write waits for its fsync), and
//! render the answer. Around them, outermost first: metrics per route, load
//! shedding (at most `in_flight_requests_max` requests at once, the rest answered
//! `503 overloaded` at once, never queued) with the request timeout, and the
//! optional bearer token. `/healthz` and `/readyz` skip shedding and the token.

mod admin;
mod error;
pub mod invariants;
mod kv;

pub use error::{ApiError, RETRY_AFTER_SECS};

use crate::metrics::Metrics;
use crate::replication::cluster::Cluster;
use crate::replication::outbox::OUTBOX_BYTES_MAX;
use crate::replication::peer::PeerChannel;
use crate::{Key, Node};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Paths that answer without a token and are never shed.
const UNGUARDED_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    node: Arc<Node>,
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    auth_token: Option<String>,
    in_flight: Arc<Semaphore>,
    http_addr: String,
}

/// Settings of the HTTP face.
#[derive(Clone, Debug, Default)]
pub struct HttpConfig {
    /// Required bearer token, if any.
    pub auth_token: Option<String>,
    /// The address this node advertises for its HTTP API.
    pub http_addr: String,
}

impl AppState {
    /// State for a single node that replicates to nobody.
    pub fn new(node: Arc<Node>, metrics: Arc<Metrics>, config: HttpConfig) -> AppState {
        let channel = PeerChannel::new(node, None, OUTBOX_BYTES_MAX);
        AppState::with_cluster(Arc::new(Cluster::new(channel)), metrics, config)
    }

    /// State for a node that replicates through `cluster`.
    pub fn with_cluster(
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        config: HttpConfig,
    ) -> AppState {
        let node = cluster.channel().node().clone();
        let in_flight = Arc::new(Semaphore::new(node.limits().in_flight_requests_max));
        let auth_token = config.auth_token.filter(|t| !t.is_empty());
        let http_addr = config.http_addr;
        AppState {
            inner: Arc::new(Inner { node, cluster, metrics, auth_token, in_flight, http_addr }),
        }
    }

    fn cluster(&self) -> &Arc<Cluster> {
        &self.inner.cluster
    }

    fn node(&self) -> &Arc<Node> {
        &self.inner.node
    }

    /// Requests holding an in-flight permit right now (at most
    /// [`Limits::in_flight_requests_max`](crate::Limits)); `/healthz` and `/readyz`
    /// never take one. Exposed as the `calmkv_http_in_flight_requests` gauge.
    pub fn in_flight_requests(&self) -> usize {
        let max = self.node().limits().in_flight_requests_max;
        max.saturating_sub(self.inner.in_flight.available_permits())
    }
}

/// Every route the API serves, with its methods; the router is built from this
/// table, and `docs/openapi.yaml` is checked against it.
pub fn route_table() -> Vec<(&'static str, &'static [Method], MethodRouter<AppState>)> {
    let table: Vec<(&'static str, &'static [Method], MethodRouter<AppState>)> = vec![
        ("/v1/kv", &[Method::GET], get(kv::scan)),
        (
            "/v1/kv/{*key}",
            &[Method::GET, Method::PUT, Method::DELETE, Method::POST],
            get(kv::get).put(kv::put).delete(kv::delete).post(kv::post),
        ),
        ("/v1/cluster", &[Method::GET], get(admin::cluster)),
        ("/v1/invariants", &[Method::GET], get(invariants::invariants)),
        ("/v1/explain", &[Method::GET], get(invariants::explain_route)),
        ("/v1/quorum/replace", &[Method::POST], post(admin::replace_voter)),
        ("/metrics", &[Method::GET], get(admin::metrics)),
        ("/healthz", &[Method::GET], get(admin::healthz)),
        ("/readyz", &[Method::GET], get(admin::readyz)),
    ];
    table
        .into_iter()
        .map(|(path, methods, router)| {
            let router = router.fallback(|| async { ApiError::MethodNotAllowed });
            (path, methods, router)
        })
        .collect()
}

/// The API's router.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for (path, _, method_router) in route_table() {
        router = router.route(path, method_router);
    }
    router
        .fallback(unrouted)
        .layer(DefaultBodyLimit::max(state.node().limits().body_bytes_max))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), shed_and_time_out))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes, then finishes the
/// requests in flight and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

/// Answers what no route matched. `/v1/kv/` is the key path with an empty key
/// (`{*key}` needs at least one character): that is a bad key, not a missing
/// route, and must not read as `404` (which a client takes for an absent key).
async fn unrouted(State(state): State<AppState>, uri: Uri) -> ApiError {
    if uri.path() == "/v1/kv/" {
        let empty = Key::new("", state.node().limits()).expect_err("an empty key is refused");
        return ApiError::Node(empty);
    }
    ApiError::NotFound { what: "route".into() }
}

async fn record(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    state.inner.metrics.record_request(&route, &method, status, started.elapsed());
    response
}

async fn shed_and_time_out(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if UNGUARDED_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let Ok(_permit) = state.inner.in_flight.clone().try_acquire_owned() else {
        state.inner.metrics.shed.fetch_add(1, Ordering::Relaxed);
        let limit = state.node().limits().in_flight_requests_max;
        return ApiError::Overloaded { limit }.into_response();
    };
    let timeout = state.node().limits().request_timeout;
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            state.inner.metrics.timed_out.fetch_add(1, Ordering::Relaxed);
            ApiError::Timeout { timeout_ms: timeout.as_millis() }.into_response()
        }
    }
}

async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.inner.auth_token else { return next.run(request).await };
    if UNGUARDED_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` is `Bearer`.
        .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("Bearer").then_some(token));
    match presented {
        Some(presented) if constant_time_eq(presented.as_bytes(), token.as_bytes()) => {
            next.run(request).await
        }
        _ => {
            state.inner.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
            ApiError::Unauthorized.into_response()
        }
    }
}

/// Compares without an early exit, so timing does not reveal the matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
