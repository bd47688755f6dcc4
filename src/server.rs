//! A whole running node: the store, the HTTP API, the peer channel, the
//! anti-entropy timer and gossip membership, started and stopped together.
//! `calmkv serve`, `calmkv demo` and `examples/cluster.rs` all go through
//! [`Server`].
//!
//! With gossip, membership decides the peers: every member the SWIM view knows
//! (alive, suspect or down; down members stay replicas until foca forgets them,
//! so a harvest read still counts them as missing) becomes a peer of the
//! channel, dialed at the peer address in its metadata. When a member comes up
//! (it joined, restarted under a new bump, or was down and is back) the node
//! starts an anti-entropy round with it at once, so it catches up without
//! waiting for the periodic round.

use crate::http::{AppState, HttpConfig, Tls};
use crate::metrics::Metrics;
use crate::quorum::{QuorumConfig, QuorumError, QuorumGroup, Timings};
use crate::replication::cluster::Cluster;
use crate::replication::frame::ClusterSecret;
use crate::replication::outbox::OUTBOX_BYTES_MAX;
use crate::replication::peer::{Peer, PeerChannel};
use crate::store::{self, Durability, MemoryStore, Store};
use crate::{Config, Node, NodeError};
use calmkv_crdts::NodeId;
use calmkv_gossip::{
    GossipConfig, GossipError, MemberInfo, MembersWatch, Membership, NodeMeta, UdpTransport,
};
use std::collections::BTreeMap;
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
    /// Serve the HTTP API over HTTPS with this certificate and key.
    pub tls: Option<Tls>,
    /// Secret that authenticates peer frames.
    pub cluster_secret: Option<ClusterSecret>,
    /// Period of anti-entropy rounds.
    pub anti_entropy_period: Duration,
    /// Gossip membership; `None` for a node whose peers are set by hand
    /// ([`connect_all`]) or that has none. Needs `peer_addr`.
    pub gossip: Option<GossipOptions>,
    /// The quorum group that admits operations declared invariants route to
    /// it; `None` for a cluster without one (those operations are refused).
    pub quorum: Option<QuorumOptions>,
}

/// How a server takes part in the quorum group.
#[derive(Clone, Debug, Default)]
pub struct QuorumOptions {
    /// Every voter's quorum address, the same list on every node.
    pub voters: Vec<String>,
    /// This node's quorum address if it is a voter.
    pub listen: Option<String>,
    /// This voter's id when it replaces a dead voter (else its position + 1).
    pub id: Option<u64>,
    /// Raft timings.
    pub timings: Timings,
    /// A listener already bound to `listen`, used instead of binding it: a
    /// caller that picks free ports keeps them bound until the voter serves,
    /// so no other process can take one in between.
    pub listener: Option<BoundListener>,
}

/// A bound TCP listener handed to the server once (see
/// [`QuorumOptions::listener`]); clones share it.
#[derive(Clone, Debug, Default)]
pub struct BoundListener(Arc<std::sync::Mutex<Option<std::net::TcpListener>>>);

impl BoundListener {
    /// Wraps a bound listener.
    pub fn new(listener: std::net::TcpListener) -> BoundListener {
        BoundListener(Arc::new(std::sync::Mutex::new(Some(listener))))
    }

    /// Takes the listener out, as a tokio listener; `None` once taken.
    fn take(&self) -> std::io::Result<Option<tokio::net::TcpListener>> {
        let taken = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        match taken {
            None => Ok(None),
            Some(listener) => {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener).map(Some)
            }
        }
    }
}

/// How a server gossips.
#[derive(Clone, Debug)]
pub struct GossipOptions {
    /// UDP address to gossip on (port 0 picks one).
    pub addr: String,
    /// Gossip addresses of nodes to join through (may include this node's own).
    pub seeds: Vec<SocketAddr>,
    /// SWIM timings and intervals. The server fills in the node id, the
    /// metadata, the seeds, the state file (`gossip.state` in the data
    /// directory) and the cluster secret.
    pub tuning: GossipConfig,
}

impl GossipOptions {
    /// Gossip on `addr` with LAN timings, joining through `seeds`.
    pub fn new(addr: impl Into<String>, seeds: Vec<SocketAddr>) -> GossipOptions {
        GossipOptions {
            addr: addr.into(),
            seeds,
            tuning: GossipConfig::new(0, NodeMeta::unspecified()),
        }
    }
}

impl ServerConfig {
    /// A single node over `node` on `http_addr`, replicating with nobody.
    pub fn new(node: Config, http_addr: impl Into<String>) -> ServerConfig {
        ServerConfig {
            node,
            http_addr: http_addr.into(),
            peer_addr: None,
            auth_token: None,
            tls: None,
            cluster_secret: None,
            anti_entropy_period: ANTI_ENTROPY_PERIOD,
            gossip: None,
            quorum: None,
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
    /// The settings contradict each other.
    #[error("invalid server configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// Gossip membership could not start (state file, configuration).
    #[error("gossip membership could not start: {0}")]
    Gossip(#[source] GossipError),
    /// The quorum group could not start.
    #[error(transparent)]
    Quorum(#[from] QuorumError),
    /// A cluster listener would be reachable from other hosts without a
    /// cluster secret: anyone reaching it could write to every node. Nothing
    /// was opened or bound.
    #[error(
        "refusing to listen for {listener} traffic on {addr} without a cluster secret: \
         anyone who reaches it could change data on every node. Set --cluster-secret \
         (the same secret on every node), or bind {listener} to a loopback address"
    )]
    Unprotected {
        /// Which listener: `peer`, `gossip` or `quorum`.
        listener: &'static str,
        /// The address asked for.
        addr: String,
    },
}

/// A running node.
pub struct Server {
    node: Arc<Node>,
    cluster: Arc<Cluster>,
    http_addr: SocketAddr,
    peer_addr: Option<SocketAddr>,
    membership: Option<Membership>,
    quorum: Option<Arc<QuorumGroup>>,
    http_stop: Option<oneshot::Sender<()>>,
    http_task: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
}

async fn bind(addr: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr: addr.to_string(), source })
}

/// How long a stopping server waits for the requests in flight to finish.
pub const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(10);

/// How long a stopping server waits for its final flush.
pub const SHUTDOWN_FLUSH_MAX: Duration = Duration::from_secs(10);

impl Server {
    /// Opens the node and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        check_protected(&config).await?;
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
        let http_task =
            tokio::spawn(crate::http::serve_with(http, state, config.tls.clone(), async move {
                let _ = stopped.await;
            }));
        let membership = match (&config.gossip, peer_addr) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ServerError::InvalidConfig { reason: "gossip needs a peer address" })
            }
            (Some(gossip), Some(peer_addr)) => {
                let invariants_hash = node.invariants().hash();
                let meta = NodeMeta { http_addr, peer_addr, invariants_hash };
                let membership = start_gossip(&config, gossip, node.id(), meta).await?;
                cluster.set_membership(membership.watch());
                background
                    .push(tokio::spawn(follow_membership(cluster.clone(), membership.watch())));
                Some(membership)
            }
        };
        let quorum = match &config.quorum {
            Some(options) => Some(start_quorum(&config, options, node.clone()).await?),
            None => None,
        };
        if let Some(group) = &quorum {
            cluster.set_coordinator(group.clone());
        }
        let gossip_addr = membership.as_ref().map(|m| m.identity().gossip_addr);
        tracing::info!(node = %node.id(), %http_addr, ?peer_addr, ?gossip_addr, "node started");
        Ok(Server {
            node,
            cluster,
            http_addr,
            peer_addr,
            membership,
            quorum,
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

    /// Where gossip listens, if the node gossips.
    pub fn gossip_addr(&self) -> Option<SocketAddr> {
        self.membership.as_ref().map(|m| m.identity().gossip_addr)
    }

    /// The membership view, if the node gossips.
    pub fn membership(&self) -> Option<MembersWatch> {
        self.membership.as_ref().map(Membership::watch)
    }

    /// The node's part in the quorum group, if configured.
    pub fn quorum(&self) -> Option<&Arc<QuorumGroup>> {
        self.quorum.as_ref()
    }

    /// This node as a peer of others, if it has a peer channel.
    pub fn peer(&self) -> Option<Peer> {
        self.peer_addr.map(|addr| Peer { id: self.node.id(), addr })
    }

    /// Stops: the node leaves the gossip cluster (the others mark it down at
    /// once instead of suspecting it), the HTTP API finishes the requests in
    /// flight, peer traffic stops, and the store is flushed.
    ///
    /// Bounded, so that a disk that does not answer cannot keep a stopping node
    /// alive: requests still in flight after [`SHUTDOWN_DRAIN_MAX`] are
    /// dropped (their writes were not acknowledged), and a final flush that
    /// has not returned after [`SHUTDOWN_FLUSH_MAX`] is given up with
    /// `StoreError::WritesStalled` (what it covers may not be durable).
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        if let Some(membership) = self.membership.take() {
            if let Err(error) = membership.leave().await {
                tracing::warn!(%error, "leaving the gossip cluster failed");
            }
        }
        if let Some(stop) = self.http_stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(SHUTDOWN_DRAIN_MAX, &mut self.http_task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "HTTP server stopped with an error"),
            Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Ok(Err(_)) => {}
            Err(_) => {
                tracing::warn!(
                    "requests still in flight after {SHUTDOWN_DRAIN_MAX:?} are dropped unanswered"
                );
                self.http_task.abort();
            }
        }
        for task in &self.background {
            task.abort();
        }
        if let Some(quorum) = self.quorum.take() {
            quorum.shutdown().await;
        }
        self.cluster.channel().set_peers(Vec::new());
        let node = self.node.clone();
        let flush = tokio::task::spawn_blocking(move || node.mark_clean());
        match tokio::time::timeout(SHUTDOWN_FLUSH_MAX, flush).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
            Err(_) => {
                tracing::error!("the final flush has not returned after {SHUTDOWN_FLUSH_MAX:?}");
                let stalled_for = SHUTDOWN_FLUSH_MAX;
                Err(NodeError::from(crate::store::StoreError::WritesStalled { stalled_for }))
            }
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

/// Protected mode: without a cluster secret, the peer, gossip and quorum
/// listeners may only bind to loopback addresses (every address a name
/// resolves to must be loopback). Runs before anything is opened or bound.
async fn check_protected(config: &ServerConfig) -> Result<(), ServerError> {
    if config.cluster_secret.is_some() {
        return Ok(());
    }
    let listeners = [
        ("peer", config.peer_addr.as_deref()),
        ("gossip", config.gossip.as_ref().map(|g| g.addr.as_str())),
        ("quorum", config.quorum.as_ref().and_then(|q| q.listen.as_deref())),
    ];
    for (listener, addr) in listeners {
        let Some(addr) = addr else { continue };
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host(addr)
            .await
            .map_err(|source| ServerError::Bind { addr: addr.to_string(), source })?
            .collect();
        if resolved.is_empty() || resolved.iter().any(|a| !a.ip().is_loopback()) {
            return Err(ServerError::Unprotected { listener, addr: addr.to_string() });
        }
    }
    Ok(())
}

async fn start_quorum(
    config: &ServerConfig,
    options: &QuorumOptions,
    node: Arc<Node>,
) -> Result<Arc<QuorumGroup>, ServerError> {
    let store: Arc<dyn Store> = if config.node.in_memory || options.listen.is_none() {
        Arc::new(MemoryStore::new())
    } else {
        let dir = config.node.data_dir.join("quorum");
        let (engine, free_bytes_min) = (config.node.engine, config.node.free_bytes_min);
        let open = move || store::open_reserving(engine, &dir, Durability::Sync, free_bytes_min);
        match tokio::task::spawn_blocking(open).await {
            Ok(store) => Arc::from(store.map_err(NodeError::from)?),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    };
    let quorum = QuorumConfig {
        voters: options.voters.clone(),
        listen: options.listen.clone(),
        id: options.id,
        secret: config.cluster_secret.clone(),
        timings: options.timings,
    };
    let bound = match &options.listener {
        Some(listener) => listener.take().map_err(|source| ServerError::Bind {
            addr: options.listen.clone().unwrap_or_default(),
            source,
        })?,
        None => None,
    };
    match bound {
        Some(listener) => Ok(QuorumGroup::start_on(quorum, Some(listener), node, store).await?),
        None => Ok(QuorumGroup::start(quorum, node, store).await?),
    }
}

async fn start_gossip(
    config: &ServerConfig,
    gossip: &GossipOptions,
    id: NodeId,
    meta: NodeMeta,
) -> Result<Membership, ServerError> {
    let bind_error = |source| ServerError::Bind { addr: gossip.addr.clone(), source };
    let addr = tokio::net::lookup_host(&gossip.addr)
        .await
        .map_err(bind_error)?
        .next()
        .ok_or_else(|| bind_error(std::io::Error::other("the address resolves to nothing")))?;
    let transport = UdpTransport::bind(addr).await.map_err(bind_error)?;
    let mut settings = gossip.tuning.clone();
    settings.node_id = id.0;
    settings.meta = meta;
    settings.seeds = gossip.seeds.clone();
    settings.state_path =
        (!config.node.in_memory).then(|| config.node.data_dir.join("gossip.state"));
    settings.cluster_secret = config.cluster_secret.as_ref().map(|s| s.as_bytes().to_vec());
    settings.accepted_secrets =
        config.cluster_secret.iter().flat_map(|s| s.all().skip(1).map(<[u8]>::to_vec)).collect();
    Membership::start(settings, Arc::new(transport)).await.map_err(ServerError::Gossip)
}

/// Keeps the peer channel's peers equal to the membership view, and gives
/// every member that comes up a fresh connection, which opens with an
/// anti-entropy round.
async fn follow_membership(cluster: Arc<Cluster>, mut watch: MembersWatch) {
    let mut known: BTreeMap<u64, MemberInfo> = BTreeMap::new();
    let mut members = watch.members();
    loop {
        let peers = members
            .iter()
            .filter(|m| m.identity.meta.peer_addr.port() != 0)
            .map(|m| Peer { id: NodeId(m.identity.node_id), addr: m.identity.meta.peer_addr })
            .collect();
        cluster.channel().set_peers(peers);
        for member in &members {
            let id = member.identity.node_id;
            let came_up = member.state.is_active()
                && known.get(&id).is_none_or(|old| {
                    !old.state.is_active() || old.identity.bump != member.identity.bump
                });
            if came_up {
                // A fresh connection (a new link's first, or a redial of a
                // connection that may have lived through the outage) opens
                // with an anti-entropy round.
                tracing::info!(peer = %NodeId(id), "member up: redial and anti-entropy round");
                if known.contains_key(&id) {
                    cluster.channel().redial(NodeId(id));
                }
            }
        }
        known = members.iter().map(|m| (m.identity.node_id, *m)).collect();
        match watch.members_changed().await {
            Some(next) => members = next,
            None => return,
        }
    }
}

/// Connects servers into a full mesh of peers (each knows every other).
pub fn connect_all(servers: &[Server]) {
    let peers: Vec<Peer> = servers.iter().filter_map(Server::peer).collect();
    for server in servers {
        server.cluster().channel().set_peers(peers.clone());
    }
}
