//! The HTTP API (the design's public contract) on axum, served by our own
//! accept loop on hyper.
//!
//! Handlers only translate: they parse a request into an [`Op`](crate::Op) or a
//! read, call the [`Node`] (a write is applied on the request's thread and
//! awaits its fsync without holding a thread; a scan runs on the blocking
//! pool), and render the answer. Bounded before trusted, outermost first:
//!
//! 1. the accept loop: at most `http_connections_per_ip_max` connections per
//!    client IP and `http_connections_max` in all (more are closed at once),
//!    then, with [`Tls`], a TLS handshake
//!    within `header_read_timeout`, and a connection that does not send a
//!    request's headers within `header_read_timeout` is closed;
//! 2. metrics per route;
//! 3. the optional bearer token;
//! 4. the body reserves its declared length (or `body_bytes_max`) in a budget
//!    of `body_buffer_bytes_max` over all connections (`503 overloaded` when
//!    it does not fit), then is read whole within `body_read_timeout` (a slow
//!    body is answered `408 body_timeout` and its connection closed) and
//!    within `body_bytes_max`;
//! 5. load shedding: only then does a request take one of the
//!    `in_flight_requests_max` permits (the rest are answered `503 overloaded`
//!    at once, never queued), held through the handler under the request
//!    timeout. A client that sends headers and no body holds no permit.
//!
//! `/healthz` and `/readyz` skip shedding and the token.

mod admin;
mod error;
pub mod invariants;
mod kv;

pub use admin::{READY_PROBES_MAX, READY_PROBE_TIMEOUT};
pub use error::{ApiError, RETRY_AFTER_SECS};

use crate::metrics::Metrics;
use crate::replication::cluster::Cluster;
use crate::replication::outbox::OUTBOX_BYTES_MAX;
use crate::replication::peer::PeerChannel;
use crate::{Key, Node};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// KiB of request bodies being read (see `body_buffer_bytes_max`).
    body_budget: Arc<Semaphore>,
    http_addr: String,
    connections: Arc<Connections>,
}

/// The body budget counts in KiB, so a semaphore's permits cover any size.
const BODY_BUDGET_UNIT_BYTES: usize = 1024;

/// Open HTTP connections per client IP, and the counters of the bounds the
/// accept loop and the body reader enforce.
#[derive(Debug, Default)]
pub struct Connections {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Connections closed at once: too many open from their IP, or in all.
    pub refused: AtomicU64,
    /// Requests answered `408 body_timeout`.
    pub body_timeouts: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Requests whose body is being read now (holding no in-flight permit).
    pub reading_bodies: AtomicU64,
}

/// A connection's place in [`Connections`], given back when dropped.
struct ConnectionSlot {
    connections: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    fn take(
        self: &Arc<Self>,
        ip: IpAddr,
        per_ip_max: usize,
        total_max: usize,
    ) -> Option<ConnectionSlot> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let total = self.open.load(Ordering::Relaxed) as usize;
        let open = per_ip.entry(ip).or_insert(0);
        if *open >= per_ip_max || total >= total_max {
            if *open == 0 {
                per_ip.remove(&ip);
            }
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *open += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionSlot { connections: self.clone(), ip })
    }

    /// The counters as Prometheus metrics: (name, help, value).
    pub fn exposition(&self) -> Vec<(&'static str, &'static str, f64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        vec![
            ("calmkv_http_connections_open", "HTTP connections open now.", get(&self.open)),
            (
                "calmkv_http_connections_refused_total",
                "HTTP connections closed at once: too many open from their IP, or in all.",
                get(&self.refused),
            ),
            (
                "calmkv_http_body_timeouts_total",
                "Requests whose body did not arrive within the body read timeout.",
                get(&self.body_timeouts),
            ),
            (
                "calmkv_http_bodies_reading",
                "Requests whose body is being read now; they hold no in-flight permit.",
                get(&self.reading_bodies),
            ),
        ]
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_ip = self.connections.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = per_ip.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.connections.open.fetch_sub(1, Ordering::Relaxed);
    }
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
        let connections = Arc::new(Connections::default());
        let budget_units = node.limits().body_buffer_bytes_max.div_ceil(BODY_BUDGET_UNIT_BYTES);
        let body_budget = Arc::new(Semaphore::new(budget_units.min(Semaphore::MAX_PERMITS)));
        AppState {
            inner: Arc::new(Inner {
                node,
                cluster,
                metrics,
                auth_token,
                in_flight,
                body_budget,
                http_addr,
                connections,
            }),
        }
    }

    fn cluster(&self) -> &Arc<Cluster> {
        &self.inner.cluster
    }

    fn node(&self) -> &Arc<Node> {
        &self.inner.node
    }

    /// The accept loop's connection counts and counters.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.inner.connections
    }

    /// Takes one in-flight permit as a request would (held until dropped), e.g.
    /// to hold the API at its bound in a test; `None` when none is free.
    pub fn take_in_flight_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner.in_flight.clone().try_acquire_owned().ok()
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
        .layer(middleware::from_fn_with_state(state.clone(), shed_and_time_out))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// HTTPS for the API: the server's certificate chain and private key.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
}

/// Why the TLS settings could not be used. Nothing was served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable or holds no PEM certificate.
    #[error("cannot read the certificate chain {path}: {reason}")]
    Certificates {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The key file is missing, unreadable or holds no PEM private key.
    #[error("cannot read the private key {path}: {reason}")]
    Key {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The certificate and key do not make a server configuration (say, the
    /// key does not match the certificate).
    #[error("the certificate and key cannot serve TLS: {reason}")]
    Config {
        /// What rustls said.
        reason: String,
    },
}

impl Tls {
    /// Loads a PEM certificate chain (the server's first) and a PEM private key.
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Tls, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs_error = |reason: String| TlsError::Certificates { path: cert.into(), reason };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| certs_error(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| certs_error(e.to_string()))?;
        if chain.is_empty() {
            return Err(certs_error("no certificate in the file".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| TlsError::Key { path: key.into(), reason: e.to_string() })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .map_err(|e| TlsError::Config { reason: e.to_string() })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) })
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

/// Serves the API over plain HTTP on `listener` until `shutdown` completes,
/// then finishes the requests in flight and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, None, shutdown).await
}

/// Serves the API, over HTTPS with `tls`, until `shutdown` completes. A TLS
/// handshake must finish within the header read timeout; the per-IP cap
/// applies before it.
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.node().limits().clone();
    let connections = state.connections().clone();
    let service = hyper_util::service::TowerToHyperService::new(router(state));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!(%error, "HTTP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (per_ip_max, total_max) =
            (limits.http_connections_per_ip_max, limits.http_connections_max);
        let Some(slot) = connections.take(remote.ip(), per_ip_max, total_max) else {
            tracing::debug!(%remote, "too many HTTP connections from one client; closing one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (http, service, watcher, tls) =
            (http.clone(), service.clone(), graceful.watcher(), tls.clone());
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let served = match tls {
                None => {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    watcher.watch(http.serve_connection(io, service)).await
                }
                Some(tls) => {
                    let accepted =
                        tokio::time::timeout(handshake_timeout, tls.acceptor.accept(stream)).await;
                    match accepted {
                        Ok(Ok(stream)) => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            watcher.watch(http.serve_connection(io, service)).await
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%remote, %error, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%remote, %error, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
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
    // Both are reference-counted or inline: recording allocates nothing.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    state.inner.metrics.record_request(route, method.as_str(), status, started.elapsed());
    response
}

/// Reads the request body whole, within the body read timeout and the body
/// limit, before the request takes an in-flight permit.
async fn read_body(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limits = state.node().limits();
    let (parts, body) = request.into_parts();
    // Reserve the body's room in the budget first: its declared length, or
    // the largest body when it declares none (a chunked body).
    let declared = axum::body::HttpBody::size_hint(&body).exact().map(|n| n as usize);
    let reserved = declared.unwrap_or(limits.body_bytes_max).min(limits.body_bytes_max);
    let units = u32::try_from(reserved.div_ceil(BODY_BUDGET_UNIT_BYTES)).unwrap_or(u32::MAX);
    let _reservation = if units == 0 {
        None
    } else {
        match state.inner.body_budget.clone().try_acquire_many_owned(units) {
            Ok(reservation) => Some(reservation),
            Err(_) => {
                state.inner.metrics.shed.fetch_add(1, Ordering::Relaxed);
                let bytes_max = limits.body_buffer_bytes_max;
                return ApiError::BodiesOverloaded { bytes_max }.into_response();
            }
        }
    };
    let timeout = limits.body_read_timeout;
    let reading = &state.inner.connections.reading_bodies;
    reading.fetch_add(1, Ordering::Relaxed);
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limits.body_bytes_max));
    let read = read.await;
    reading.fetch_sub(1, Ordering::Relaxed);
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
            if too_large {
                return ApiError::BodyTooLarge { max: limits.body_bytes_max }.into_response();
            }
            // The client broke the connection mid-body; nobody reads this.
            return ApiError::BadRequest { reason: format!("cannot read the body: {error}") }
                .into_response();
        }
        Err(_) => {
            state.inner.connections.body_timeouts.fetch_add(1, Ordering::Relaxed);
            let mut response =
                ApiError::BodyTimeout { timeout_ms: timeout.as_millis() }.into_response();
            // The rest of the body may still be on its way: the connection's
            // framing cannot be trusted, so it closes after this answer.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
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
