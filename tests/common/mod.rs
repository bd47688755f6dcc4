//! The shared harness of the HTTP tests: a real calmkv server on an ephemeral
//! loopback port, a client for it, and the node under it so that a test can check
//! what the store holds.
//!
//! ```ignore
//! let server = TestServer::builder().limits(limits).auth_token("t").start().await;
//! let response = server.put("/v1/kv/k").body("v").send().await.unwrap();
//! server.stop().await;
//! ```
//!
//! Every request the harness builds carries the bearer token when the server has
//! one; `server.client` sends requests exactly as written. The server stops when
//! the handle is dropped, or explicitly (and checked) with [`TestServer::stop`].

// Each test crate uses a different part of the harness.
#![allow(dead_code)]

use bytes::Bytes;
use calmkv::http::{AppState, HttpConfig};
use calmkv::metrics::Metrics;
use calmkv::store::Entry;
use calmkv::{Config, Limits, Node};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long any one request of a test may take before the client gives up: a
/// hung server fails the test instead of hanging the suite.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test waits for a condition (see [`wait_until`]).
pub const CONDITION_DEADLINE: Duration = Duration::from_secs(5);

/// What to start.
#[derive(Clone, Debug, Default)]
pub struct Builder {
    limits: Limits,
    auth_token: Option<String>,
    on_disk: bool,
    invariants: Option<Arc<calmkv::invariants::Invariants>>,
}

impl Builder {
    /// The bounds the node enforces.
    pub fn limits(mut self, limits: Limits) -> Builder {
        self.limits = limits;
        self
    }

    /// Require `Authorization: Bearer <token>`.
    pub fn auth_token(mut self, token: &str) -> Builder {
        self.auth_token = Some(token.to_string());
        self
    }

    /// Enforce these invariants.
    pub fn invariants(mut self, toml: &str) -> Builder {
        let parsed = calmkv::invariants::Invariants::parse(toml).expect("valid declarations");
        self.invariants = Some(Arc::new(parsed));
        self
    }

    /// Keep the data in a sled store in a temporary directory instead of memory.
    pub fn on_disk(mut self) -> Builder {
        self.on_disk = true;
        self
    }

    /// Opens the node and serves it on `127.0.0.1:0`.
    pub async fn start(self) -> TestServer {
        let (config, dir) = if self.on_disk {
            let dir = tempfile::tempdir().expect("a temporary directory");
            (Config::new(dir.path()), Some(dir))
        } else {
            (Config::in_memory(), None)
        };
        let mut config = Config { limits: self.limits, ..config };
        if let Some(invariants) = self.invariants {
            config.invariants = invariants;
        }
        let node = tokio::task::spawn_blocking(move || config.open_node())
            .await
            .expect("opening the node does not panic")
            .expect("the node opens");
        let node = Arc::new(node);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let state = AppState::new(
            node.clone(),
            Metrics::new(),
            HttpConfig { auth_token: self.auth_token.clone(), http_addr: addr.to_string() },
        );
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(calmkv::http::serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(CLIENT_TIMEOUT)
            .build()
            .expect("a client");
        TestServer {
            base: format!("http://{addr}"),
            client,
            node,
            state,
            token: self.auth_token,
            shutdown: Some(shutdown),
            task: Some(task),
            _dir: dir,
        }
    }
}

/// A running server and a client for it.
pub struct TestServer {
    base: String,
    /// A client that adds nothing to the requests it sends (no token).
    pub client: reqwest::Client,
    node: Arc<Node>,
    state: AppState,
    token: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server with the default limits, in memory, without a token.
    pub async fn start() -> TestServer {
        Builder::default().start().await
    }

    /// What to start, for anything but the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The absolute URL of `path_and_query` (which starts with `/`), taken as
    /// written: percent-encodings stay as they are.
    pub fn url(&self, path_and_query: &str) -> String {
        assert!(path_and_query.starts_with('/'), "{path_and_query:?} must start with /");
        format!("{}{path_and_query}", self.base)
    }

    /// A request carrying the server's token, if it has one.
    pub fn request(&self, method: Method, path_and_query: &str) -> RequestBuilder {
        let request = self.client.request(method, self.url(path_and_query));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `GET`, with the token.
    pub fn get(&self, path_and_query: &str) -> RequestBuilder {
        self.request(Method::GET, path_and_query)
    }

    /// `PUT`, with the token.
    pub fn put(&self, path_and_query: &str) -> RequestBuilder {
        self.request(Method::PUT, path_and_query)
    }

    /// `POST`, with the token.
    pub fn post(&self, path_and_query: &str) -> RequestBuilder {
        self.request(Method::POST, path_and_query)
    }

    /// `DELETE`, with the token.
    pub fn delete(&self, path_and_query: &str) -> RequestBuilder {
        self.request(Method::DELETE, path_and_query)
    }

    /// `POST /v1/kv/{key}` of a CRDT operation; `key` is put in the path as is.
    pub fn post_op(&self, key: &str, op: serde_json::Value) -> RequestBuilder {
        self.post(&format!("/v1/kv/{key}")).json(&op)
    }

    /// The node behind the server.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The server's shared state (in-flight gauge and the like).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Every entry of the store, data and indexes alike: two equal snapshots mean
    /// nothing was written in between.
    pub fn store_snapshot(&self) -> Vec<Entry> {
        self.node.store().scan_prefix(b"", None, usize::MAX).expect("the store scans")
    }

    /// Stops accepting, lets the requests in flight finish, and checks that the
    /// server stopped cleanly and in time.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().expect("not stopped yet").send(());
        let task = self.task.take().expect("not stopped yet");
        // Idle pooled connections would keep a graceful shutdown waiting.
        self.client = reqwest::Client::new();
        tokio::time::timeout(CONDITION_DEADLINE, task)
            .await
            .expect("the server stops within the deadline")
            .expect("the server task does not panic")
            .expect("the server stops without an error");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits until `condition` holds, checking every millisecond, and panics naming
/// `what` if it does not within [`CONDITION_DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Sends a request, panicking with the request's description if it fails at
/// the transport level.
pub async fn send(request: RequestBuilder) -> Response {
    let described = format!("{request:?}");
    request.send().await.unwrap_or_else(|e| panic!("{described} failed: {e}"))
}

/// The status and error code of an error answer (which must be the JSON error
/// shape of docs/openapi.yaml, with a non-empty message).
pub async fn error_of(response: Response) -> (StatusCode, String) {
    let (status, code, body) = answer_of(response).await;
    let code = code.unwrap_or_else(|| panic!("{status} is not a JSON error: {body:?}"));
    (status, code)
}

/// The status of any answer, its error code if it is a JSON error with a code
/// and a non-empty message, and its body.
pub async fn answer_of(response: Response) -> (StatusCode, Option<String>, String) {
    let status = response.status();
    let body = response.text().await.expect("a body");
    let json: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let code = json.as_ref().and_then(|json| {
        let error = &json["error"];
        let message = error["message"].as_str().filter(|m| !m.is_empty());
        error["code"].as_str().filter(|_| message.is_some()).map(str::to_string)
    });
    (status, code, body)
}

/// The JSON body of a response, checking its status first.
pub async fn json_of(response: Response, status: StatusCode) -> serde_json::Value {
    let actual = response.status();
    let body = response.text().await.expect("a body");
    assert_eq!(actual, status, "unexpected status; body: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?} is not JSON: {e}"))
}

/// A header of a response as text.
pub fn header<'r>(response: &'r Response, name: &str) -> Option<&'r str> {
    response.headers().get(name).map(|v| v.to_str().expect("a text header"))
}

/// A request body the test finishes when it wants: until [`HeldBody::finish`]
/// (or drop), the server sees a request whose body is still arriving.
pub struct HeldBody {
    chunks: mpsc::Sender<Bytes>,
}

impl HeldBody {
    /// The test's end of the body, and the body to send.
    pub fn new() -> (HeldBody, reqwest::Body) {
        let (chunks, rx) = mpsc::channel(4);
        (HeldBody { chunks }, reqwest::Body::wrap(ChannelBody { rx }))
    }

    /// Sends the last chunk and ends the body.
    pub async fn finish(self, last: impl Into<Bytes>) {
        self.chunks.send(last.into()).await.expect("the request is still sending its body");
    }
}

/// A body of `chunks` in chunked transfer encoding: no `Content-Length` tells the
/// server its size up front.
pub fn chunked(chunks: Vec<Bytes>) -> reqwest::Body {
    let (tx, rx) = mpsc::channel(chunks.len().max(1));
    for chunk in chunks {
        tx.try_send(chunk).expect("the channel holds every chunk");
    }
    reqwest::Body::wrap(ChannelBody { rx })
}

struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|bytes| Ok(http_body::Frame::data(bytes))))
    }
}
