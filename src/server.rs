//! A whole running node: the store, the HTTP API, the peer channel and the
//! anti-entropy timer, started and stopped together. `calmkv serve`,
//! `calmkv demo` and `examples/cluster.rs` all go through [`Server`].

use crate::http::{AppState, HttpConfig};
use crate::metrics::Metrics;
use crate::replication::cluster::Cluster;
use crate::replication::frame::ClusterSecret;
use crate::replication::outbox::OUTBOX_BYTES_MAX;
use crate::replication::peer::{Peer, PeerChannel};
use crate::{Config, Node, NodeError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How often a node starts an anti-entropy round with a random peer by default.
pub const ANTI_ENTROPY_PERIOD: Duration = Duration::from_secs(2);

/// Everything a server needs to start.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The node: data directory, durability, limits.
    pub node: Config,
    /// Address of the HTTP API (port 0 picks one).
    pub http_addr: String,
    /// Address of the peer channel (port 0 picks one); `None` for a node that
    /// replicates with nobody.
    pub peer_addr: Option<String>,
    /// Bearer token the HTTP API requires.
    pub auth_token: Option<String>,
    /// Secret that authenticates peer frames.
    pub cluster_secret: Option<ClusterSecret>,
    /// Period of anti-entropy rounds.
    pub anti_entropy_period: Duration,
}

impl ServerConfig {
    /// A single node over `node` on `http_addr`, replicating with nobody.
    pub fn new(node: Config, http_addr: impl Into<String>) -> ServerConfig {
        ServerConfig {
            node,
            http_addr: http_addr.into(),
            peer_addr: None,
            auth_token: None,
            cluster_secret: None,
            anti_entropy_period: ANTI_ENTROPY_PERIOD,
        }
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The node could not open its data.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// An address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A running node.
pub struct Server {
    node: Arc<Node>,
    cluster: Arc<Cluster>,
    http_addr: SocketAddr,
    peer_addr: Option<SocketAddr>,
    http_stop: Option<oneshot::Sender<()>>,
    http_task: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
}

async fn bind(addr: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr: addr.to_string(), source })
}

impl Server {
    /// Opens the node and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let node_config = config.node.clone();
        let node = match tokio::task::spawn_blocking(move || node_config.open_node()).await {
            Ok(node) => Arc::new(node?),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        };
        let http = bind(&config.http_addr).await?;
        let http_addr = http
            .local_addr()
            .map_err(|source| ServerError::Bind { addr: config.http_addr.clone(), source })?;
        let channel =
            PeerChannel::new(node.clone(), config.cluster_secret.clone(), OUTBOX_BYTES_MAX);
        let cluster = Arc::new(Cluster::new(channel.clone()));
        let mut background = Vec::new();
        let mut peer_addr = None;
        if let Some(addr) = &config.peer_addr {
            let listener = bind(addr).await?;
            peer_addr = Some(
                listener
                    .local_addr()
                    .map_err(|source| ServerError::Bind { addr: addr.clone(), source })?,
            );
            background.push(tokio::spawn(channel.clone().serve(listener)));
            background
                .push(tokio::spawn(cluster.clone().run_anti_entropy(config.anti_entropy_period)));
        }
        let state = AppState::with_cluster(
            cluster.clone(),
            Metrics::new(),
            HttpConfig { auth_token: config.auth_token.clone(), http_addr: http_addr.to_string() },
        );
        let (http_stop, stopped) = oneshot::channel::<()>();
        let http_task = tokio::spawn(crate::http::serve(http, state, async move {
            let _ = stopped.await;
        }));
        tracing::info!(node = %node.id(), %http_addr, ?peer_addr, "node started");
        Ok(Server {
            node,
            cluster,
            http_addr,
            peer_addr,
            http_stop: Some(http_stop),
            http_task,
            background,
        })
    }

    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The cluster layer (peers, writes with `w`, harvest reads).
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Where the HTTP API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// This node as a peer of others, if it has a peer channel.
    pub fn peer(&self) -> Option<Peer> {
        self.peer_addr.map(|addr| Peer { id: self.node.id(), addr })
    }

    /// Stops: the HTTP API finishes the requests in flight, peer traffic stops,
    /// and the store is flushed.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.http_stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.http_task).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "HTTP server stopped with an error"),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => {}
        }
        for task in &self.background {
            task.abort();
        }
        self.cluster.channel().set_peers(Vec::new());
        let node = self.node.clone();
        match tokio::task::spawn_blocking(move || node.flush()).await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
        self.http_task.abort();
    }
}

/// Connects servers into a full mesh of peers (each knows every other).
pub fn connect_all(servers: &[Server]) {
    let peers: Vec<Peer> = servers.iter().filter_map(Server::peer).collect();
    for server in servers {
        server.cluster().channel().set_peers(peers.clone());
    }
}
