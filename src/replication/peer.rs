//! The peer channel: TCP connections that carry [`PeerMessage`] frames.
//!
//! Every node dials every peer it knows and writes only its own traffic on that
//! connection (deltas, anti-entropy steps, reads and their answers), starting
//! with [`PeerMessage::Hello`]. Connections it accepts are only read. So each
//! direction between two nodes is one connection with one writer, and an answer
//! travels on the answering node's own connection.
//!
//! A peer's traffic waits in its [`Outbox`]; the dialing task drains it and
//! reconnects with backoff when the connection breaks. Frames lost with a broken
//! connection, or dropped by a full outbox, are repaired by anti-entropy. A bad
//! frame (oversized, unauthenticated, malformed) closes the connection it came on
//! and is counted; the node keeps serving.

use super::anti_entropy;
use super::frame::{decode_frame, encode_frame, frame_len, ClusterSecret, FrameError};
use super::message::PeerMessage;
use super::outbox::Outbox;
use crate::envelope::Envelope;
use crate::op::Key;
use crate::Node;
use calmkv_crdts::NodeId;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bytes written per batch from an outbox.
const WRITE_BATCH_BYTES: usize = 1024 * 1024;
/// Longest wait between reconnection attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// First wait between reconnection attempts.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Accepted connections served at once; more are refused.
pub const INBOUND_CONNECTIONS_MAX: usize = 256;

/// A replica this node talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its node id.
    pub id: NodeId,
    /// Where its peer channel listens.
    pub addr: SocketAddr,
}

/// Counters of the peer channel.
#[derive(Debug, Default)]
pub struct PeerMetrics {
    /// Frames queued for sending.
    pub frames_queued: AtomicU64,
    /// Frames dropped because an outbox was full.
    pub frames_dropped: AtomicU64,
    /// Bytes written to peers.
    pub bytes_sent: AtomicU64,
    /// Frames received and accepted.
    pub frames_received: AtomicU64,
    /// Bytes received in accepted frames.
    pub bytes_received: AtomicU64,
    /// Frames refused (oversized, unauthenticated, malformed).
    pub frames_refused: AtomicU64,
    /// Deltas merged from peers that changed a key.
    pub deltas_applied: AtomicU64,
    /// Anti-entropy rounds started.
    pub anti_entropy_rounds: AtomicU64,
    /// Keys changed by anti-entropy.
    pub keys_repaired: AtomicU64,
    /// Connections (re)established to peers.
    pub connects: AtomicU64,
}

impl PeerMetrics {
    /// The counters as Prometheus metrics: (name, help, value).
    pub fn exposition(&self) -> Vec<(&'static str, &'static str, f64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        vec![
            (
                "calmkv_peer_frames_queued_total",
                "Frames queued for peers.",
                get(&self.frames_queued),
            ),
            (
                "calmkv_peer_frames_dropped_total",
                "Frames dropped because a peer's outbox was full.",
                get(&self.frames_dropped),
            ),
            ("calmkv_peer_bytes_sent_total", "Bytes written to peers.", get(&self.bytes_sent)),
            (
                "calmkv_peer_frames_received_total",
                "Frames received from peers and accepted.",
                get(&self.frames_received),
            ),
            (
                "calmkv_peer_bytes_received_total",
                "Bytes received in accepted frames.",
                get(&self.bytes_received),
            ),
            (
                "calmkv_peer_frames_refused_total",
                "Frames refused: oversized, unauthenticated or malformed.",
                get(&self.frames_refused),
            ),
            (
                "calmkv_replication_deltas_applied_total",
                "Deltas from peers that changed a key.",
                get(&self.deltas_applied),
            ),
            (
                "calmkv_anti_entropy_rounds_total",
                "Anti-entropy rounds started.",
                get(&self.anti_entropy_rounds),
            ),
            (
                "calmkv_anti_entropy_keys_repaired_total",
                "Keys changed by anti-entropy.",
                get(&self.keys_repaired),
            ),
            (
                "calmkv_peer_connects_total",
                "Connections established to peers.",
                get(&self.connects),
            ),
        ]
    }
}

struct Link {
    outbox: Arc<Outbox>,
    task: JoinHandle<()>,
}

/// Waiters for answers, by correlation id; several peers may answer one id.
type Pending = Mutex<HashMap<u64, mpsc::UnboundedSender<(NodeId, PeerMessage)>>>;

/// The peer channel of one node.
pub struct PeerChannel {
    node: Arc<Node>,
    secret: Option<ClusterSecret>,
    outbox_bytes_max: usize,
    links: Mutex<BTreeMap<NodeId, (Peer, Link)>>,
    pending: Pending,
    next_id: AtomicU64,
    metrics: Arc<PeerMetrics>,
}

impl PeerChannel {
    /// A channel for `node`; call [`PeerChannel::serve`] to accept connections and
    /// [`PeerChannel::set_peers`] to dial.
    pub fn new(
        node: Arc<Node>,
        secret: Option<ClusterSecret>,
        outbox_bytes_max: usize,
    ) -> Arc<PeerChannel> {
        Arc::new(PeerChannel {
            node,
            secret,
            outbox_bytes_max,
            links: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            metrics: Arc::new(PeerMetrics::default()),
        })
    }

    /// The channel's counters.
    pub fn metrics(&self) -> &Arc<PeerMetrics> {
        &self.metrics
    }

    /// The node behind the channel.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The peers dialed now.
    pub fn peers(&self) -> Vec<Peer> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(peer, _)| peer.clone())
            .collect()
    }

    /// Bytes waiting in each peer's outbox.
    pub fn outbox_bytes(&self) -> Vec<(NodeId, usize)> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.iter().map(|(id, (_, link))| (*id, link.outbox.queued_bytes())).collect()
    }

    /// Makes the dialed peers exactly `peers`: new ones are dialed, gone ones
    /// (or ones whose address changed) are hung up.
    pub fn set_peers(self: &Arc<Self>, peers: Vec<Peer>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|id, (known, link)| {
            let keep = peers.iter().any(|p| p == known);
            if !keep {
                tracing::debug!(peer = %id, "hanging up");
                link.task.abort();
            }
            keep
        });
        for peer in peers {
            if peer.id == self.node.id() || links.contains_key(&peer.id) {
                continue;
            }
            let outbox = Arc::new(Outbox::new(self.outbox_bytes_max));
            let task = tokio::spawn(self.clone().dial(peer.clone(), outbox.clone()));
            links.insert(peer.id, (peer, Link { outbox, task }));
        }
    }

    /// Queues a message for one peer; `false` when it is unknown or its outbox
    /// is full (the message is dropped and counted).
    pub fn send(&self, to: NodeId, message: &PeerMessage) -> bool {
        let frame = match encode_frame(message, self.secret.as_ref()) {
            Ok(frame) => frame,
            Err(error) => {
                tracing::warn!(%error, "message not sent");
                return false;
            }
        };
        self.send_frame(to, frame)
    }

    fn send_frame(&self, to: NodeId, frame: Vec<u8>) -> bool {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, link)) = links.get(&to) else { return false };
        match link.outbox.push(frame) {
            Ok(()) => {
                self.metrics.frames_queued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.metrics.frames_dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Pushes a local write's delta to every peer. Never waits: a peer whose
    /// outbox is full misses it until anti-entropy. Returns the peers it was
    /// queued for.
    pub fn replicate(&self, key: &str, delta: &Envelope, ack: Option<u64>) -> Vec<NodeId> {
        let message = PeerMessage::Deltas { deltas: vec![(key.to_string(), delta.clone())], ack };
        let Ok(frame) = encode_frame(&message, self.secret.as_ref()) else { return vec![] };
        let peers: Vec<NodeId> = self.peers().iter().map(|p| p.id).collect();
        peers.into_iter().filter(|id| self.send_frame(*id, frame.clone())).collect()
    }

    /// Registers a waiter for the answers with `id`, from any peer; call
    /// [`PeerChannel::forget`] when done. At most one answer per peer arrives
    /// per request, so the channel is bounded by the number of peers.
    pub fn wait_for(&self, id: u64) -> mpsc::UnboundedReceiver<(NodeId, PeerMessage)> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, sender);
        receiver
    }

    /// Forgets a waiter whose answer no longer matters.
    pub fn forget(&self, id: u64) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// A fresh correlation id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn complete(&self, id: u64, from: NodeId, message: PeerMessage) {
        if let Some(waiter) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            let _ = waiter.send((from, message));
        }
    }

    /// Starts an anti-entropy round with `peer`.
    pub fn start_anti_entropy(&self, peer: NodeId) -> bool {
        self.metrics.anti_entropy_rounds.fetch_add(1, Ordering::Relaxed);
        let top = anti_entropy::start(&self.node);
        self.send(peer, &PeerMessage::AntiEntropy(top))
    }

    /// Accepts peer connections on `listener` until the task is aborted; aborting
    /// it also closes every connection it accepted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Some(_) = connections.join_next() => continue,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "peer accept failed");
                    tokio::time::sleep(RECONNECT_BACKOFF_MIN).await;
                    continue;
                }
            };
            if connections.len() >= INBOUND_CONNECTIONS_MAX {
                tracing::warn!(%remote, "too many peer connections; refusing one");
                continue;
            }
            let channel = self.clone();
            connections.spawn(async move {
                if let Err(error) = channel.read_connection(stream).await {
                    channel.metrics.frames_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%remote, %error, "closing peer connection after a bad frame");
                }
            });
        }
    }

    async fn read_connection(&self, mut stream: TcpStream) -> Result<(), FrameError> {
        let mut from: Option<NodeId> = None;
        loop {
            let mut prefix = [0u8; 4];
            if stream.read_exact(&mut prefix).await.is_err() {
                return Ok(()); // closed
            }
            let len = frame_len(prefix)?;
            let mut body = vec![0u8; len];
            if stream.read_exact(&mut body).await.is_err() {
                return Err(FrameError::Truncated);
            }
            let message = decode_frame(&body, self.secret.as_ref())?;
            self.metrics.frames_received.fetch_add(1, Ordering::Relaxed);
            self.metrics.bytes_received.fetch_add(len as u64 + 4, Ordering::Relaxed);
            match (from, message) {
                (None, PeerMessage::Hello { from: id }) => from = Some(NodeId(id)),
                (None, _) => {
                    return Err(FrameError::Malformed {
                        reason: "the first frame is not Hello".into(),
                    })
                }
                (Some(peer), message) => self.dispatch(peer, message).await,
            }
        }
    }

    async fn dispatch(&self, from: NodeId, message: PeerMessage) {
        match message {
            PeerMessage::Hello { .. } => {}
            PeerMessage::Acked { id } => self.complete(id, from, PeerMessage::Acked { id }),
            PeerMessage::ReadReply { id, state } => {
                self.complete(id, from, PeerMessage::ReadReply { id, state })
            }
            other => {
                let node = self.node.clone();
                let metrics = self.metrics.clone();
                let answer =
                    tokio::task::spawn_blocking(move || handle_request(&node, &metrics, other))
                        .await;
                match answer {
                    Ok(Some(reply)) => {
                        self.send(from, &reply);
                    }
                    Ok(None) => {}
                    Err(join) => std::panic::resume_unwind(join.into_panic()),
                }
            }
        }
    }

    async fn dial(self: Arc<Self>, peer: Peer, outbox: Arc<Outbox>) {
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer.addr)).await {
                Ok(Ok(stream)) => {
                    backoff = RECONNECT_BACKOFF_MIN;
                    self.metrics.connects.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.set_nodelay(true);
                    if let Err(error) = self.write_connection(stream, &outbox).await {
                        tracing::debug!(peer = %peer.id, %error, "peer connection broke");
                    }
                }
                Ok(Err(error)) => tracing::debug!(peer = %peer.id, %error, "cannot reach peer"),
                Err(_) => tracing::debug!(peer = %peer.id, "connecting timed out"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    async fn write_connection(&self, stream: TcpStream, outbox: &Outbox) -> std::io::Result<()> {
        let mut writer = BufWriter::new(stream);
        let hello =
            encode_frame(&PeerMessage::Hello { from: self.node.id().0 }, self.secret.as_ref())
                .map_err(std::io::Error::other)?;
        writer.write_all(&hello).await?;
        writer.flush().await?;
        loop {
            outbox.ready().await;
            for frame in outbox.take(WRITE_BATCH_BYTES) {
                writer.write_all(&frame).await?;
                self.metrics.bytes_sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
            writer.flush().await?;
        }
    }
}

impl Drop for PeerChannel {
    fn drop(&mut self) {
        for (_, (_, link)) in self.links.get_mut().unwrap_or_else(|p| p.into_inner()).iter() {
            link.task.abort();
        }
    }
}

/// Handles a request from a peer on the blocking pool; returns the answer.
fn handle_request(node: &Node, metrics: &PeerMetrics, message: PeerMessage) -> Option<PeerMessage> {
    let result: Result<Option<PeerMessage>, crate::NodeError> = (|| match message {
        PeerMessage::Deltas { deltas, ack } => {
            for (key, delta) in deltas {
                if node.merge(&Key::new(key, node.limits())?, &delta)? {
                    metrics.deltas_applied.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(ack.map(|id| PeerMessage::Acked { id }))
        }
        PeerMessage::AntiEntropy(step) => {
            let (reply, handled) = anti_entropy::handle(node, &step)?;
            metrics.keys_repaired.fetch_add(handled.keys_repaired as u64, Ordering::Relaxed);
            Ok(reply.map(PeerMessage::AntiEntropy))
        }
        PeerMessage::Read { id, key } => {
            let state = node.envelope(&Key::new(key, node.limits())?)?;
            Ok(Some(PeerMessage::ReadReply { id, state }))
        }
        PeerMessage::Hello { .. } | PeerMessage::Acked { .. } | PeerMessage::ReadReply { .. } => {
            Ok(None)
        }
    })();
    result.unwrap_or_else(|error| {
        tracing::warn!(%error, "peer request failed");
        None
    })
}
