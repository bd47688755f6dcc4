//! The peer channel: TCP connections that carry [`PeerMessage`] frames.
//!
//! Every node dials every peer it knows and writes only its own traffic on that
//! connection (deltas, anti-entropy steps, reads and their answers). Connections
//! it accepts are only read. So each direction between two nodes is one
//! connection with one writer, and an answer travels on the answering node's
//! own connection.
//!
//! Every connection starts with the fixed-size [`handshake`]: with a cluster
//! secret, both ends prove they hold it, and the sender of every later frame is
//! the node id the dialer proved. Until then an accepted connection is a
//! stranger: it has [`PeerSettings::handshake_timeout`] to finish, at most
//! [`HANDSHAKE_READ_BYTES`] are read from it, and it waits in a pool of
//! [`PeerSettings::handshakes_max`] slots of its own, where a new stranger
//! evicts the oldest; strangers never take the slots of authenticated peers
//! ([`PeerSettings::inbound_connections_max`], one per peer id: a peer that
//! reconnects replaces its old connection).
//!
//! A peer's traffic waits in its [`Outbox`]; the dialing task drains it and
//! reconnects with backoff when the connection breaks or falls silent (the
//! dialer pings, the acceptor answers each ping with one byte, and either end
//! drops a connection that stays silent for [`PeerSettings::heartbeat_timeout`]).
//! Every new connection opens with an anti-entropy round. Frames lost with a broken
//! connection, or dropped by a full outbox, are repaired by anti-entropy. A bad
//! frame (oversized, unauthenticated, malformed) closes the connection it came on
//! and is counted; the node keeps serving. A frame's body is read as its bytes
//! arrive, never allocated from its announced length, and the bytes held by
//! unfinished frames are the `calmkv_peer_inbound_buffered_bytes` gauge.
//!
//! [`handshake`]: super::handshake
//! [`HANDSHAKE_READ_BYTES`]: super::handshake::HANDSHAKE_READ_BYTES

use super::admission;
use super::anti_entropy::{self, AntiEntropy};
use super::frame::{
    decode_body, encode_body, frame_len, ClusterSecret, FrameError, SessionKey, TAG_BYTES,
};
use super::handshake::{self, HandshakeError, RefusalKind};
use super::message::PeerMessage;
use super::outbox::{Outbox, Queued};
pub use super::parts::{frames_of, ASSEMBLY_BYTES_MAX, PART_BYTES, PEER_MESSAGE_BYTES_MAX};
use super::parts::{Assembly, PartIn};
use crate::envelope::Envelope;
use crate::op::Key;
use crate::Node;
use calmkv_crdts::NodeId;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// Bytes written per batch from an outbox.
const WRITE_BATCH_BYTES: usize = 1024 * 1024;
/// Longest wait between reconnection attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// First wait between reconnection attempts.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default authenticated inbound connections served at once (one per peer);
/// more are refused.
pub const INBOUND_CONNECTIONS_MAX: usize = 256;
/// Default connections in their handshake at once; a new one evicts the oldest.
pub const HANDSHAKES_MAX: usize = 64;
/// Bytes a frame body is read by at a time: what one connection can make the
/// node hold beyond what its peer really sent.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Least time between two log lines about refused handshakes.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);
/// Default time between two pings a dialer sends on an established connection.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Default time a connection may go without sign of life from its other end
/// (a pong for the dialer, any frame for the acceptor) before it is dropped;
/// also the longest a single frame write may take.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// Least time between two follow-up anti-entropy rounds with one peer (see
/// [`PeerChannel::follow_up_round`]).
pub const FOLLOW_UP_ROUND_PERIOD: Duration = Duration::from_millis(20);

/// The byte an acceptor writes back for every [`PeerMessage::Ping`]: the only
/// thing it ever writes after the handshake.
pub const PONG: u8 = 0x50;

/// Bounds of the peer channel's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSettings {
    /// Time a connection has to finish its handshake.
    pub handshake_timeout: Duration,
    /// Connections in their handshake at once.
    pub handshakes_max: usize,
    /// Authenticated inbound connections at once.
    pub inbound_connections_max: usize,
    /// Time between the pings a dialer sends.
    pub heartbeat_interval: Duration,
    /// Silence after which a connection is taken for dead and dropped (the
    /// dialer then reconnects); also the bound on writing one frame. Must be
    /// longer than `heartbeat_interval`.
    pub heartbeat_timeout: Duration,
    /// Bytes of messages being joined from their parts, over every
    /// connection at once.
    pub assembly_bytes_max: usize,
}

impl Default for PeerSettings {
    fn default() -> Self {
        PeerSettings {
            handshake_timeout: handshake::HANDSHAKE_TIMEOUT,
            handshakes_max: HANDSHAKES_MAX,
            inbound_connections_max: INBOUND_CONNECTIONS_MAX,
            heartbeat_interval: HEARTBEAT_INTERVAL,
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
            assembly_bytes_max: ASSEMBLY_BYTES_MAX,
        }
    }
}

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
    /// Deltas of local writes joined into one already waiting for its key
    /// in a peer's outbox.
    pub deltas_coalesced: AtomicU64,
    /// Anti-entropy rounds started.
    pub anti_entropy_rounds: AtomicU64,
    /// Keys changed by anti-entropy.
    pub keys_repaired: AtomicU64,
    /// Connections (re)established to peers.
    pub connects: AtomicU64,
    /// Connections dropped because their other end fell silent (no pong, no
    /// frame, or a write that did not finish within the heartbeat timeout).
    pub connections_stalled: AtomicU64,
    /// Handshakes completed, either direction.
    pub handshakes: AtomicU64,
    /// Handshakes refused or abandoned, by [`RefusalKind`] (either direction).
    handshakes_refused: [AtomicU64; RefusalKind::ALL.len()],
    /// Authenticated connections refused because every slot was taken.
    pub inbound_refused: AtomicU64,
    /// Remote states refused for crossing a limit (see `admission`).
    pub states_refused: AtomicU64,
    /// Gauge: bytes held in frame bodies still being read.
    pub inbound_buffered_bytes: AtomicU64,
    /// Gauge: bytes held in messages being joined from their parts.
    pub assembly_bytes: AtomicU64,
    /// Messages in parts read and discarded: joining them would have crossed
    /// the assembly budget.
    pub messages_discarded: AtomicU64,
    /// Messages not sent: their body exceeds [`PEER_MESSAGE_BYTES_MAX`].
    pub messages_too_large: AtomicU64,
    /// Gauge: accepted connections still in their handshake.
    pub handshakes_pending: AtomicU64,
    /// Gauge: authenticated inbound connections.
    pub inbound_connections: AtomicU64,
    /// When a refused handshake was last logged (see [`log_due`]).
    refusal_logged_ms: AtomicU64,
    /// When a refused state was last logged.
    state_refusal_logged_ms: AtomicU64,
}

/// Whether a rate-limited log line is due: at most one per
/// [`REFUSAL_LOG_PERIOD`] per `slot` (the time of the last one, in ms since
/// the first rate-limited log of the process, 0 for never).
fn log_due(slot: &AtomicU64) -> bool {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let now_ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let last = slot.load(Ordering::Relaxed);
    let due = last == 0 || now_ms.saturating_sub(last) >= REFUSAL_LOG_PERIOD.as_millis() as u64;
    due && slot.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
}

impl PeerMetrics {
    /// Handshakes refused so far, by kind.
    pub fn handshakes_refused(&self) -> Vec<(RefusalKind, u64)> {
        RefusalKind::ALL
            .iter()
            .zip(&self.handshakes_refused)
            .map(|(kind, n)| (*kind, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Handshakes refused so far of one kind.
    pub fn handshakes_refused_of(&self, kind: RefusalKind) -> u64 {
        self.handshakes_refused[kind_index(kind)].load(Ordering::Relaxed)
    }

    /// Counts a refused handshake, and logs it unless one was logged within
    /// the last [`REFUSAL_LOG_PERIOD`] (wrong secrets are logged at warn level:
    /// a node with another secret runs alone and must say so).
    fn refuse_handshake(&self, remote: SocketAddr, side: &'static str, error: &HandshakeError) {
        let kind = error.kind();
        let total = self.handshakes_refused[kind_index(kind)].fetch_add(1, Ordering::Relaxed) + 1;
        let loud = matches!(kind, RefusalKind::WrongSecret | RefusalKind::SecretMismatch);
        if !loud {
            tracing::debug!(%remote, side, %error, "peer handshake refused");
            return;
        }
        if log_due(&self.refusal_logged_ms) {
            tracing::warn!(
                %remote, side, %error, refused_so_far = total, kind = kind.name(),
                "peer handshake refused: check that every node has the same --cluster-secret"
            );
        }
    }

    /// The counters as Prometheus metrics: (name, help, value).
    pub fn exposition(&self) -> Vec<(&'static str, &'static str, f64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let refused = |kind: RefusalKind| self.handshakes_refused_of(kind) as f64;
        vec![
            (
                "calmkv_peer_handshakes_total",
                "Peer handshakes completed, either direction.",
                get(&self.handshakes),
            ),
            (
                "calmkv_peer_handshakes_refused_wrong_secret_total",
                "Peer handshakes refused: the other node holds another cluster secret.",
                refused(RefusalKind::WrongSecret),
            ),
            (
                "calmkv_peer_handshakes_refused_secret_mismatch_total",
                "Peer handshakes refused: one side has a cluster secret, the other none.",
                refused(RefusalKind::SecretMismatch),
            ),
            (
                "calmkv_peer_handshakes_refused_malformed_total",
                "Peer handshakes refused: not a calmkv peer, another version, or a bad identity.",
                refused(RefusalKind::Malformed),
            ),
            (
                "calmkv_peer_handshakes_refused_timeout_total",
                "Peer handshakes not finished within the handshake timeout.",
                refused(RefusalKind::Timeout),
            ),
            (
                "calmkv_peer_handshakes_refused_incomplete_total",
                "Peer connections closed during their handshake.",
                refused(RefusalKind::Incomplete),
            ),
            (
                "calmkv_peer_handshakes_refused_evicted_total",
                "Peer connections evicted unfinished to make room for newer ones.",
                refused(RefusalKind::Evicted),
            ),
            (
                "calmkv_peer_inbound_refused_total",
                "Authenticated peer connections refused: every slot was taken.",
                get(&self.inbound_refused),
            ),
            (
                "calmkv_replication_states_refused_total",
                "Remote states refused for crossing a limit.",
                get(&self.states_refused),
            ),
            (
                "calmkv_peer_inbound_buffered_bytes",
                "Bytes held in peer frames still being read.",
                get(&self.inbound_buffered_bytes),
            ),
            (
                "calmkv_peer_assembly_bytes",
                "Bytes held in peer messages being joined from their parts.",
                get(&self.assembly_bytes),
            ),
            (
                "calmkv_peer_messages_discarded_total",
                "Peer messages in parts discarded: the assembly budget was spent.",
                get(&self.messages_discarded),
            ),
            (
                "calmkv_peer_messages_too_large_total",
                "Messages not sent to peers: larger than the message bound.",
                get(&self.messages_too_large),
            ),
            (
                "calmkv_peer_handshakes_pending",
                "Accepted peer connections still in their handshake.",
                get(&self.handshakes_pending),
            ),
            (
                "calmkv_peer_inbound_connections",
                "Authenticated inbound peer connections.",
                get(&self.inbound_connections),
            ),
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
                "calmkv_replication_deltas_coalesced_total",
                "Deltas of local writes joined into one already waiting for their key.",
                get(&self.deltas_coalesced),
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
            (
                "calmkv_peer_connections_stalled_total",
                "Peer connections dropped because the other end fell silent.",
                get(&self.connections_stalled),
            ),
        ]
    }
}

fn kind_index(kind: RefusalKind) -> usize {
    RefusalKind::ALL.iter().position(|k| *k == kind).expect("every kind is listed")
}

/// Bytes a connection holds in a frame body, kept in the gauge while alive.
struct Buffered<'a> {
    gauge: &'a AtomicU64,
    held: u64,
}

impl Buffered<'_> {
    fn hold(&mut self, bytes: usize) {
        let bytes = bytes as u64;
        if bytes > self.held {
            self.gauge.fetch_add(bytes - self.held, Ordering::Relaxed);
        } else {
            self.gauge.fetch_sub(self.held - bytes, Ordering::Relaxed);
        }
        self.held = bytes;
    }
}

impl Drop for Buffered<'_> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// Accepted connections: strangers in their handshake, oldest first, and
/// authenticated peers by id. Each entry can be told to close.
#[derive(Default)]
struct Slots {
    handshaking: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    peers: Mutex<HashMap<NodeId, (u64, Arc<Notify>)>>,
}

/// Removes a connection from the slots when its task ends (or is aborted).
struct SlotGuard<'a> {
    slots: &'a Slots,
    metrics: &'a PeerMetrics,
    conn: u64,
    peer: Option<NodeId>,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut handshaking = self.slots.handshaking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = handshaking.iter().position(|(c, _)| *c == self.conn) {
            handshaking.remove(i);
            self.metrics.handshakes_pending.fetch_sub(1, Ordering::Relaxed);
        }
        drop(handshaking);
        if let Some(peer) = self.peer {
            let mut peers = self.slots.peers.lock().unwrap_or_else(|p| p.into_inner());
            if peers.get(&peer).is_some_and(|(c, _)| *c == self.conn) {
                peers.remove(&peer);
                self.metrics.inbound_connections.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

struct Link {
    outbox: Arc<Outbox>,
    /// Tells the dialing task to drop its connection and dial again now.
    redial: Arc<Notify>,
    task: JoinHandle<()>,
}

/// Waiters for answers, by correlation id; several peers may answer one id.
type Pending = Mutex<HashMap<u64, mpsc::UnboundedSender<(NodeId, PeerMessage)>>>;

/// The peer channel of one node.
pub struct PeerChannel {
    node: Arc<Node>,
    secret: Option<ClusterSecret>,
    outbox_bytes_max: usize,
    settings: PeerSettings,
    links: Mutex<BTreeMap<NodeId, (Peer, Link)>>,
    pending: Pending,
    next_id: AtomicU64,
    metrics: Arc<PeerMetrics>,
    /// When the last follow-up round started, by peer.
    follow_ups: Mutex<HashMap<NodeId, Instant>>,
}

impl PeerChannel {
    /// A channel for `node`; call [`PeerChannel::serve`] to accept connections and
    /// [`PeerChannel::set_peers`] to dial.
    pub fn new(
        node: Arc<Node>,
        secret: Option<ClusterSecret>,
        outbox_bytes_max: usize,
    ) -> Arc<PeerChannel> {
        PeerChannel::with_settings(node, secret, outbox_bytes_max, PeerSettings::default())
    }

    /// A channel with the given connection bounds.
    pub fn with_settings(
        node: Arc<Node>,
        secret: Option<ClusterSecret>,
        outbox_bytes_max: usize,
        settings: PeerSettings,
    ) -> Arc<PeerChannel> {
        Arc::new(PeerChannel {
            node,
            secret,
            outbox_bytes_max,
            settings,
            links: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            metrics: Arc::new(PeerMetrics::default()),
            follow_ups: Mutex::new(HashMap::new()),
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
            let redial = Arc::new(Notify::new());
            let task =
                tokio::spawn(self.clone().dial(peer.clone(), outbox.clone(), redial.clone()));
            links.insert(peer.id, (peer, Link { outbox, redial, task }));
        }
    }

    /// Queues a message for one peer; `false` when it is unknown or its outbox
    /// is full (the message is dropped and counted).
    pub fn send(&self, to: NodeId, message: &PeerMessage) -> bool {
        match self.frames_of(message) {
            Some(frames) => self.send_frames(to, frames),
            None => false,
        }
    }

    /// The frames that carry `message`: its body, or its parts when the body
    /// is larger than [`PART_BYTES`]; `None` (logged, counted) when it cannot
    /// be sent at all.
    fn frames_of(&self, message: &PeerMessage) -> Option<Vec<Vec<u8>>> {
        match frames_of(message) {
            Ok(frames) => Some(frames),
            Err(error) => {
                if matches!(error, FrameError::TooLarge { .. }) {
                    self.metrics.messages_too_large.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(%error, "message not sent");
                None
            }
        }
    }

    fn send_frames(&self, to: NodeId, frames: Vec<Vec<u8>>) -> bool {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, link)) = links.get(&to) else { return false };
        let count = frames.len() as u64;
        match link.outbox.push_all(frames) {
            Ok(()) => {
                self.metrics.frames_queued.fetch_add(count, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.metrics.frames_dropped.fetch_add(count, Ordering::Relaxed);
                false
            }
        }
    }

    /// Pushes a local write's delta to every peer. Never waits: a peer whose
    /// outbox is full misses it until anti-entropy. Returns the peers it was
    /// queued for.
    /// Without `ack` the delta joins the peer's waiting deltas, coalesced
    /// with any other delta of the key not yet sent.
    pub fn replicate(&self, key: &str, delta: &Envelope, ack: Option<u64>) -> Vec<NodeId> {
        let peers: Vec<NodeId> = self.peers().iter().map(|p| p.id).collect();
        if ack.is_some() {
            let message =
                PeerMessage::Deltas { deltas: vec![(key.to_string(), delta.clone())], ack };
            return self.send_to_many(&peers, &message);
        }
        let Ok(bytes) = calmkv_crdts::encode(delta).map(|b| b.len()) else { return vec![] };
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let mut queued = Vec::new();
        for peer in peers {
            let Some((_, link)) = links.get(&peer) else { continue };
            match link.outbox.push_delta(key, delta, bytes) {
                Ok(Queued::New) => {
                    self.metrics.frames_queued.fetch_add(1, Ordering::Relaxed);
                    queued.push(peer);
                }
                Ok(Queued::Coalesced) => {
                    self.metrics.deltas_coalesced.fetch_add(1, Ordering::Relaxed);
                    queued.push(peer);
                }
                Err(_) => {
                    self.metrics.frames_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        queued
    }

    /// Queues one message for several peers, encoded once; returns the peers
    /// it was queued for (not unknown, outbox not full).
    pub fn send_to_many(&self, to: &[NodeId], message: &PeerMessage) -> Vec<NodeId> {
        let Some(frames) = self.frames_of(message) else { return vec![] };
        to.iter().copied().filter(|id| self.send_frames(*id, frames.clone())).collect()
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

    /// A peer is back (membership saw it come up): drops the connection to
    /// it, which may be one that lived through an outage and sits in TCP
    /// retransmission backoff, and dials it at once. Every new connection
    /// opens with an anti-entropy round, so the peer is repaired right away.
    /// `false` when the peer is unknown.
    pub fn redial(&self, peer: NodeId) -> bool {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, link)) = links.get(&peer) else { return false };
        link.redial.notify_one();
        true
    }

    /// After a round with `peer` repaired keys here, starts the next one at
    /// once rather than at the next periodic round, so a node that is far
    /// behind is repaired at the pace of the rounds, not of the period. At
    /// most one such round per peer per [`FOLLOW_UP_ROUND_PERIOD`]: a round
    /// due sooner waits for it here, on the connection's reading task (so at
    /// most that long), which bounds the rounds in flight however both sides
    /// chain them. The chain ends with the first round that repairs nothing.
    async fn follow_up_round(&self, peer: NodeId) {
        let wait = {
            let last = self.follow_ups.lock().unwrap_or_else(|p| p.into_inner());
            last.get(&peer)
                .map_or(Duration::ZERO, |at| FOLLOW_UP_ROUND_PERIOD.saturating_sub(at.elapsed()))
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        {
            let mut last = self.follow_ups.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded by the peers: forget peers no longer dialed.
            let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            last.retain(|id, _| links.contains_key(id));
            if !links.contains_key(&peer) {
                return;
            }
            last.insert(peer, Instant::now());
        }
        self.start_anti_entropy(peer);
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
        let slots = Arc::new(Slots::default());
        let mut connections = tokio::task::JoinSet::new();
        let mut next_conn = 0u64;
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
            next_conn += 1;
            let conn = next_conn;
            let close = Arc::new(Notify::new());
            {
                let mut handshaking = slots.handshaking.lock().unwrap_or_else(|p| p.into_inner());
                if handshaking.len() >= self.settings.handshakes_max.max(1) {
                    if let Some((_, oldest)) = handshaking.pop_front() {
                        self.metrics.handshakes_pending.fetch_sub(1, Ordering::Relaxed);
                        oldest.notify_one();
                    }
                }
                handshaking.push_back((conn, close.clone()));
                self.metrics.handshakes_pending.fetch_add(1, Ordering::Relaxed);
            }
            let (channel, slots) = (self.clone(), slots.clone());
            connections.spawn(async move {
                channel.serve_connection(stream, remote, &slots, conn, close).await;
            });
        }
    }

    /// One accepted connection: its handshake, its slot, then its frames.
    async fn serve_connection(
        &self,
        mut stream: TcpStream,
        remote: SocketAddr,
        slots: &Slots,
        conn: u64,
        close: Arc<Notify>,
    ) {
        let mut guard = SlotGuard { slots, metrics: &self.metrics, conn, peer: None };
        let timeout = self.settings.handshake_timeout;
        let own = self.node.id();
        let established = tokio::select! {
            done = handshake::accept(&mut stream, self.secret.as_ref(), own, timeout) => done,
            _ = close.notified() => {
                self.metrics.handshakes_refused[kind_index(RefusalKind::Evicted)]
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let established = match established {
            Ok(established) => established,
            Err(error) => {
                self.metrics.refuse_handshake(remote, "accepted", &error);
                return;
            }
        };
        self.metrics.handshakes.fetch_add(1, Ordering::Relaxed);
        let peer = established.peer;
        {
            let mut handshaking = slots.handshaking.lock().unwrap_or_else(|p| p.into_inner());
            match handshaking.iter().position(|(c, _)| *c == conn) {
                Some(i) => {
                    handshaking.remove(i);
                    self.metrics.handshakes_pending.fetch_sub(1, Ordering::Relaxed);
                }
                // Evicted just as it finished: it lost its slot.
                None => return,
            }
        }
        {
            let mut peers = slots.peers.lock().unwrap_or_else(|p| p.into_inner());
            if !peers.contains_key(&peer) && peers.len() >= self.settings.inbound_connections_max {
                self.metrics.inbound_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%remote, %peer, "every peer connection slot is taken; refusing one");
                return;
            }
            // A peer that reconnects replaces its old connection.
            match peers.insert(peer, (conn, close.clone())) {
                Some((_, old)) => old.notify_one(),
                None => {
                    self.metrics.inbound_connections.fetch_add(1, Ordering::Relaxed);
                }
            }
            guard.peer = Some(peer);
        }
        let (mut reader, mut writer) = stream.split();
        let session = established.session.as_ref();
        let read = self.read_frames(&mut reader, &mut writer, peer, session);
        let result = tokio::select! {
            result = read => result,
            _ = close.notified() => Ok(()),
        };
        match result {
            Ok(()) => {}
            Err(FrameError::Silent) => {
                self.metrics.connections_stalled.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%remote, %peer, "closing a silent peer connection");
            }
            Err(error) => {
                self.metrics.frames_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%remote, %peer, %error, "closing peer connection after a bad frame");
            }
        }
        drop(guard);
    }

    /// Reads and dispatches frames from `peer` until the connection closes, a
    /// frame is refused, or nothing arrives for the heartbeat timeout (the
    /// dialer pings more often than that). Every [`PeerMessage::Ping`] is
    /// answered with one [`PONG`] byte on `pongs`.
    async fn read_frames<S: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        pongs: &mut W,
        peer: NodeId,
        session: Option<&SessionKey>,
    ) -> Result<(), FrameError> {
        let tag_bytes = if session.is_some() { TAG_BYTES } else { 0 };
        let idle = self.settings.heartbeat_timeout;
        let mut seq = 0u64;
        let mut assembly = Assembly::new(&self.metrics, self.settings.assembly_bytes_max);
        let mut pongs = Pongs {
            writer: pongs,
            last: Instant::now(),
            interval: self.settings.heartbeat_interval,
            timeout: idle,
        };
        loop {
            let mut prefix = [0u8; 4];
            match tokio::time::timeout(idle, stream.read_exact(&mut prefix)).await {
                Err(_) => return Err(FrameError::Silent),
                Ok(Err(_)) => return Ok(()), // closed
                Ok(Ok(_)) => {}
            }
            let len = frame_len(prefix)?;
            if len < 1 + tag_bytes {
                return Err(FrameError::Truncated);
            }
            let message = {
                let mut buffered =
                    Buffered { gauge: &self.metrics.inbound_buffered_bytes, held: 0 };
                let mut body = read_body(stream, len, &mut buffered, idle).await?;
                if let Some(session) = session {
                    if !session.open(seq, &mut body) {
                        return Err(FrameError::BadTag);
                    }
                }
                decode_body::<PeerMessage>(&body)?
            };
            seq += 1;
            self.metrics.frames_received.fetch_add(1, Ordering::Relaxed);
            self.metrics.bytes_received.fetch_add(len as u64 + 4, Ordering::Relaxed);
            let message = match message {
                PeerMessage::Ping => {
                    if !pongs.send().await? {
                        return Ok(()); // closed
                    }
                    continue;
                }
                PeerMessage::Part { message, index, total, bytes } => {
                    match assembly.add(PartIn { message, index, total, bytes })? {
                        None => continue,
                        Some(body) => match decode_body::<PeerMessage>(&body)? {
                            PeerMessage::Part { .. } | PeerMessage::Ping => {
                                let reason = "a message in parts that is a part or a ping".into();
                                return Err(FrameError::Malformed { reason });
                            }
                            whole => whole,
                        },
                    }
                }
                whole => {
                    assembly.abandon();
                    whole
                }
            };
            // While the message is handled (a merge may wait for a disk),
            // the dialer still hears from this end once per interval.
            let dispatch = self.dispatch(peer, message);
            tokio::pin!(dispatch);
            loop {
                let due = pongs.interval.saturating_sub(pongs.last.elapsed());
                tokio::select! {
                    () = &mut dispatch => break,
                    () = tokio::time::sleep(due) => {
                        if !pongs.send().await? {
                            return Ok(());
                        }
                    }
                }
            }
            if pongs.last.elapsed() >= pongs.interval && !pongs.send().await? {
                return Ok(());
            }
        }
    }

    /// Drops the states of `message` that cross a limit, counting and logging
    /// them; `None` when nothing is left to handle. Deltas lose their `ack`
    /// when one of them is refused: they were not all stored.
    fn admit(&self, from: NodeId, message: PeerMessage) -> Option<PeerMessage> {
        let limits = self.node.limits();
        let replicas = self.links.lock().unwrap_or_else(|p| p.into_inner()).len() + 1;
        let admitted = |key: &str, state: &Envelope| match admission::check(state, limits, replicas)
        {
            Ok(()) => true,
            Err(reason) => {
                let total = self.metrics.states_refused.fetch_add(1, Ordering::Relaxed) + 1;
                if log_due(&self.metrics.state_refusal_logged_ms) {
                    tracing::warn!(
                        peer = %from, key, %reason, refused_so_far = total,
                        "refusing a remote state that crosses a limit"
                    );
                }
                false
            }
        };
        match message {
            PeerMessage::Deltas { deltas, ack } => {
                let offered = deltas.len();
                let deltas: Vec<_> = deltas.into_iter().filter(|(k, s)| admitted(k, s)).collect();
                let ack = ack.filter(|_| deltas.len() == offered);
                Some(PeerMessage::Deltas { deltas, ack })
            }
            PeerMessage::AntiEntropy(AntiEntropy::States { states, want }) => {
                let states = states.into_iter().filter(|(k, s)| admitted(k, s)).collect();
                Some(PeerMessage::AntiEntropy(AntiEntropy::States { states, want }))
            }
            PeerMessage::ReadReply { id, state } => {
                admitted("(read reply)", &state).then_some(PeerMessage::ReadReply { id, state })
            }
            other => Some(other),
        }
    }

    async fn dispatch(&self, from: NodeId, message: PeerMessage) {
        let Some(message) = self.admit(from, message) else { return };
        match message {
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
                let (reply, repaired) = match answer {
                    Ok(answer) => answer,
                    Err(join) => std::panic::resume_unwind(join.into_panic()),
                };
                if let Some(reply) = reply {
                    self.send(from, &reply);
                }
                if repaired > 0 {
                    self.follow_up_round(from).await;
                }
            }
        }
    }

    async fn dial(self: Arc<Self>, peer: Peer, outbox: Arc<Outbox>, redial: Arc<Notify>) {
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer.addr)).await {
                Ok(Ok(mut stream)) => {
                    let _ = stream.set_nodelay(true);
                    let own = self.node.id();
                    let timeout = self.settings.handshake_timeout;
                    let secret = self.secret.as_ref();
                    match handshake::dial(&mut stream, secret, own, Some(peer.id), timeout).await {
                        Ok(established) => {
                            backoff = RECONNECT_BACKOFF_MIN;
                            self.metrics.connects.fetch_add(1, Ordering::Relaxed);
                            self.metrics.handshakes.fetch_add(1, Ordering::Relaxed);
                            let session = established.session.as_ref();
                            let written = self.write_frames(stream, &outbox, session, &redial);
                            match written.await {
                                Ok(()) => tracing::debug!(peer = %peer.id, "redialing peer"),
                                Err(error) => {
                                    if error.kind() == std::io::ErrorKind::TimedOut {
                                        self.metrics
                                            .connections_stalled
                                            .fetch_add(1, Ordering::Relaxed);
                                    }
                                    tracing::debug!(peer = %peer.id, %error, "peer connection broke");
                                }
                            }
                        }
                        Err(error) => self.metrics.refuse_handshake(peer.addr, "dialed", &error),
                    }
                }
                Ok(Err(error)) => tracing::debug!(peer = %peer.id, %error, "cannot reach peer"),
                Err(_) => tracing::debug!(peer = %peer.id, "connecting timed out"),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = redial.notified() => backoff = RECONNECT_BACKOFF_MIN,
            }
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    /// Drains the outbox onto an established connection, sealing each frame
    /// under the session key and its sequence number, until the connection
    /// breaks or falls silent (an error) or `redial` is notified (`Ok`).
    ///
    /// The connection opens with an anti-entropy round, ahead of whatever
    /// waits in the outbox: a new connection follows an outage, a restart or a
    /// stalled predecessor whose frames were lost, and the round repairs them
    /// now rather than at the next periodic round. Then a
    /// [`PeerMessage::Ping`] goes out every heartbeat interval; the acceptor
    /// answers each with one [`PONG`] byte, the only bytes it ever writes, and
    /// a connection that hears nothing for the heartbeat timeout, or cannot
    /// write a frame within it, is taken for dead (`TimedOut`). End of stream
    /// or any other byte means the acceptor closed the connection (say, after
    /// refusing a frame), and the dialer reconnects at once instead of writing
    /// into a dead socket.
    async fn write_frames(
        &self,
        stream: TcpStream,
        outbox: &Outbox,
        session: Option<&SessionKey>,
        redial: &Notify,
    ) -> std::io::Result<()> {
        let (mut reader, writer) = stream.into_split();
        let mut writer = Writer { inner: BufWriter::new(writer), seq: 0, session };
        let timeout = self.settings.heartbeat_timeout;
        let stalled = || std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer fell silent");
        let mut heard = Instant::now();
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pongs = [0u8; 64];
        self.metrics.anti_entropy_rounds.fetch_add(1, Ordering::Relaxed);
        let round = encode_body(&PeerMessage::AntiEntropy(anti_entropy::start(&self.node)))
            .map_err(std::io::Error::other)?;
        let mut batch = vec![round];
        loop {
            for body in batch.drain(..) {
                let sent = tokio::time::timeout(timeout, writer.write(body))
                    .await
                    .map_err(|_| stalled())??;
                self.metrics.bytes_sent.fetch_add(sent as u64, Ordering::Relaxed);
            }
            tokio::time::timeout(timeout, writer.inner.flush()).await.map_err(|_| stalled())??;
            tokio::select! {
                () = outbox.ready() => batch = self.take_batch(outbox),
                read = reader.read(&mut pongs) => match read {
                    Ok(n) if n > 0 && pongs[..n].iter().all(|b| *b == PONG) => heard = Instant::now(),
                    _ => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the peer closed the connection",
                        ));
                    }
                },
                _ = heartbeat.tick() => {
                    if heard.elapsed() > timeout {
                        return Err(stalled());
                    }
                    batch.push(encode_body(&PeerMessage::Ping).map_err(std::io::Error::other)?);
                }
                () = redial.notified() => return Ok(()),
            }
        }
    }
}

impl PeerChannel {
    /// The next frames to write from an outbox: queued frames first, then
    /// waiting deltas in `Deltas` frames of at most `DELTA_GROUP_BYTES_MAX`,
    /// about [`WRITE_BATCH_BYTES`] in all.
    fn take_batch(&self, outbox: &Outbox) -> Vec<Vec<u8>> {
        let mut batch = outbox.take(WRITE_BATCH_BYTES);
        let taken: usize = batch.iter().map(Vec::len).sum();
        if taken >= WRITE_BATCH_BYTES {
            return batch;
        }
        for deltas in outbox.take_deltas(WRITE_BATCH_BYTES - taken) {
            if let Some(frames) = self.frames_of(&PeerMessage::Deltas { deltas, ack: None }) {
                batch.extend(frames);
            }
        }
        batch
    }
}

/// The acceptor's pongs: one for every ping, and one at least every heartbeat
/// interval while it is busy with the connection's frames (a long merge, a
/// backlog of frames), so a dialer whose frames merely take long to handle
/// does not take the connection for dead. A dead or cut-off acceptor sends
/// none of them.
struct Pongs<'w, W> {
    writer: &'w mut W,
    last: Instant,
    interval: Duration,
    timeout: Duration,
}

impl<W: AsyncWrite + Unpin> Pongs<'_, W> {
    /// Writes one pong; `false` when the connection is closed.
    async fn send(&mut self) -> Result<bool, FrameError> {
        match tokio::time::timeout(self.timeout, self.writer.write_all(&[PONG])).await {
            Ok(Ok(())) => {
                self.last = Instant::now();
                Ok(true)
            }
            Ok(Err(_)) => Ok(false),
            Err(_) => Err(FrameError::Silent),
        }
    }
}

/// The writing half of a dialed connection: frames sealed in sequence.
struct Writer<'a> {
    inner: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    seq: u64,
    session: Option<&'a SessionKey>,
}

impl Writer<'_> {
    /// Writes one frame; returns the bytes it took on the wire.
    async fn write(&mut self, mut body: Vec<u8>) -> std::io::Result<usize> {
        if let Some(session) = self.session {
            session.seal(self.seq, &mut body);
        }
        self.inner.write_all(&(body.len() as u32).to_be_bytes()).await?;
        self.inner.write_all(&body).await?;
        self.seq += 1;
        Ok(body.len() + 4)
    }
}

/// Reads a frame body of `len` bytes (already checked against the bound) as
/// it arrives, so a peer that announces a large frame and sends little makes
/// the node hold only about what it sent (the buffer grows by doubling, so at
/// most twice that, and at least one chunk).
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    len: usize,
    buffered: &mut Buffered<'_>,
    idle: Duration,
) -> Result<Vec<u8>, FrameError> {
    let mut body = Vec::new();
    while body.len() < len {
        let want = (len - body.len()).min(READ_CHUNK_BYTES);
        body.reserve(want);
        buffered.hold(body.capacity());
        let start = body.len();
        body.resize(start + want, 0);
        match tokio::time::timeout(idle, stream.read(&mut body[start..])).await {
            Err(_) => return Err(FrameError::Silent),
            Ok(Ok(0) | Err(_)) => return Err(FrameError::Truncated),
            Ok(Ok(n)) => body.truncate(start + n),
        }
    }
    Ok(body)
}

impl Drop for PeerChannel {
    fn drop(&mut self) {
        for (_, (_, link)) in self.links.get_mut().unwrap_or_else(|p| p.into_inner()).iter() {
            link.task.abort();
        }
    }
}

/// Handles a request from a peer on the blocking pool; returns the answer.
/// Returns the answer, and the keys anti-entropy repaired.
fn handle_request(
    node: &Node,
    metrics: &PeerMetrics,
    message: PeerMessage,
) -> (Option<PeerMessage>, usize) {
    let mut repaired = 0;
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
            repaired = handled.keys_repaired;
            Ok(reply.map(PeerMessage::AntiEntropy))
        }
        PeerMessage::Read { id, key } => {
            let state = node.envelope(&Key::new(key, node.limits())?)?;
            Ok(Some(PeerMessage::ReadReply { id, state }))
        }
        PeerMessage::Acked { .. }
        | PeerMessage::ReadReply { .. }
        | PeerMessage::Ping
        | PeerMessage::Part { .. } => Ok(None),
    })();
    let reply = result.unwrap_or_else(|error| {
        tracing::warn!(%error, "peer request failed");
        None
    });
    (reply, repaired)
}
