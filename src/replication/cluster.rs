//! Cluster operations over the peer channel: writes that wait for `w` replicas,
//! reads that ask several replicas with a deadline and report their harvest, and
//! the periodic anti-entropy round.
//!
//! Placement goes through [`Cluster::replicas_for`]: today every key lives on
//! every node, but nothing else assumes so.

use super::harvest::{Consistency, Harvest};
use super::message::PeerMessage;
use super::peer::PeerChannel;
use super::request::{call_many, Strategy};
use crate::envelope::Envelope;
use crate::invariants::Route;
use crate::op::{Key, Op};
use crate::{Applied, Node, NodeError};
use calmkv_crdts::{Crdt, NodeId};
use calmkv_gossip::MembersWatch;
use rand::seq::IndexedRandom;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How many replicas a write waits for before it is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteQuorum {
    /// The local replica, durable as configured (the default).
    #[default]
    #[serde(rename = "1")]
    One,
    /// A majority of the replicas.
    Quorum,
    /// Every replica.
    All,
}

/// Why a cluster operation could not be answered as asked.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The node refused or failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Fewer replicas answered a read than its consistency and `min_harvest` ask.
    #[error("only {harvest} of the replicas answered by the deadline")]
    InsufficientHarvest {
        /// What was gathered.
        harvest: Harvest,
    },
    /// Fewer replicas acknowledged a write than `w` asks; the write is applied
    /// locally and will still reach the others.
    #[error("the write is applied here, but only {acked} of {wanted} replicas acknowledged it by the deadline")]
    InsufficientAcks {
        /// Replicas (this one included) that acknowledged.
        acked: usize,
        /// Replicas wanted.
        wanted: usize,
    },
}

/// A read's merged state and how complete it is.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterRead {
    /// The merge of every state that arrived.
    pub state: Envelope,
    /// How many replicas it reflects.
    pub harvest: Harvest,
}

/// Runs the operations that declared invariants route to the quorum.
pub trait Coordinator: Send + Sync {
    /// Proposes `op`; answers by `deadline` with the applied write (its delta
    /// is what replicas merge), a refusal (`invariant_violation`,
    /// `precondition_failed`), or `coordination_unavailable`.
    fn propose(
        &self,
        op: Op,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<Applied, NodeError>> + Send + '_>>;

    /// [`Coordinator::propose`] under the client's idempotency key: a repeat
    /// with the same key is answered with the first outcome. By default the
    /// key is not used.
    fn propose_idempotent(
        &self,
        op: Op,
        deadline: Instant,
        idempotency_key: Option<crate::quorum::IdempotencyKey>,
    ) -> Pin<Box<dyn Future<Output = Result<Applied, NodeError>> + Send + '_>> {
        let _ = idempotency_key;
        self.propose(op, deadline)
    }

    /// The coordinator's state, as `/v1/cluster` shows it under `quorum`.
    fn status(&self) -> serde_json::Value;

    /// Replaces the dead voter `dead` with the voter `id` at `addr` (on the
    /// leader; otherwise an error naming the leader).
    fn replace_voter(
        &self,
        dead: u64,
        id: u64,
        addr: String,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// A node with its peer channel, the membership view when the node gossips,
/// and the coordinator when it belongs to a cluster with a quorum group.
pub struct Cluster {
    channel: Arc<PeerChannel>,
    membership: std::sync::OnceLock<MembersWatch>,
    coordinator: std::sync::OnceLock<Arc<dyn Coordinator>>,
}

impl Cluster {
    /// Cluster operations over `channel`.
    pub fn new(channel: Arc<PeerChannel>) -> Cluster {
        Cluster {
            channel,
            membership: std::sync::OnceLock::new(),
            coordinator: std::sync::OnceLock::new(),
        }
    }

    /// Attaches the coordinator (once; later calls are ignored).
    pub fn set_coordinator(&self, coordinator: Arc<dyn Coordinator>) {
        let _ = self.coordinator.set(coordinator);
    }

    /// The coordinator, when the cluster has a quorum group.
    pub fn coordinator(&self) -> Option<&Arc<dyn Coordinator>> {
        self.coordinator.get()
    }

    /// Refuses writes on a node whose invariant declarations disagree with
    /// most of the alive members' (gossip metadata): such a node could run
    /// an unsafe operation locally because it missed a rule.
    fn check_declarations(&self, key: &Key) -> Result<(), NodeError> {
        let Some(watch) = self.membership.get() else { return Ok(()) };
        let own = self.node().invariants().hash();
        let mut hashes = vec![own];
        hashes.extend(
            watch
                .members()
                .iter()
                .filter(|m| m.state.is_active())
                .map(|m| m.identity.meta.invariants_hash),
        );
        let agreeing = hashes.iter().filter(|h| **h == own).count();
        if agreeing == hashes.len() || agreeing * 2 > hashes.len() {
            return Ok(());
        }
        Err(NodeError::CoordinationUnavailable {
            key: key.to_string(),
            reason: format!(
                "this node's invariant declarations (hash {own:016x}) differ from most members'; \
                 writes are refused until they match (see /v1/cluster)"
            ),
        })
    }

    /// Whether this node is the only replica of its keys: no peers, no gossip.
    fn alone(&self) -> bool {
        self.membership.get().is_none() && self.channel.peers().is_empty()
    }

    /// Applies `op` where its route says: locally; through the coordinator when
    /// a declared invariant needs it; admitted here when this node is the only
    /// replica; refused when it needs a quorum this cluster does not have.
    async fn apply(
        &self,
        op: Op,
        timeout: Duration,
        idempotency_key: Option<crate::quorum::IdempotencyKey>,
    ) -> Result<Applied, NodeError> {
        self.check_declarations(&op.key)?;
        let node = self.node().clone();
        let needs_quorum = matches!(node.invariants().route(&op)?, Route::Quorum { .. });
        if !needs_quorum {
            return node.apply_async(op).await;
        }
        if let Some(coordinator) = self.coordinator.get() {
            return coordinator
                .propose_idempotent(op, Instant::now() + timeout, idempotency_key)
                .await;
        }
        if self.alone() {
            return node.apply_alone_async(op).await;
        }
        Err(NodeError::CoordinationUnavailable {
            key: op.key.to_string(),
            reason: "the operation needs the quorum and this cluster has no quorum group".into(),
        })
    }

    /// Attaches the membership view (once; later calls are ignored).
    pub fn set_membership(&self, watch: MembersWatch) {
        let _ = self.membership.set(watch);
    }

    /// The membership view, when the node gossips.
    pub fn membership(&self) -> Option<&MembersWatch> {
        self.membership.get()
    }

    /// The peer channel.
    pub fn channel(&self) -> &Arc<PeerChannel> {
        &self.channel
    }

    fn node(&self) -> &Arc<Node> {
        self.channel.node()
    }

    /// The nodes that hold `key`: today, this node and every peer.
    pub fn replicas_for(&self, _key: &Key) -> Vec<NodeId> {
        let mut replicas = vec![self.node().id()];
        replicas.extend(self.channel.peers().into_iter().map(|p| p.id));
        replicas
    }

    /// Applies a write locally and pushes its delta to the other replicas; with
    /// `w` above one, waits until that many replicas (this one included) have
    /// stored it, or the deadline.
    pub async fn write(
        &self,
        op: Op,
        w: WriteQuorum,
        timeout: Duration,
    ) -> Result<Applied, ClusterError> {
        self.write_idempotent(op, w, timeout, None).await
    }

    /// [`Cluster::write`] with the client's idempotency key, which a
    /// coordinated operation hands to the quorum (a local one ignores it).
    pub async fn write_idempotent(
        &self,
        op: Op,
        w: WriteQuorum,
        timeout: Duration,
        idempotency_key: Option<crate::quorum::IdempotencyKey>,
    ) -> Result<Applied, ClusterError> {
        let key = op.key.clone();
        let applied = self.apply(op, timeout, idempotency_key).await?;
        let replicas = self.replicas_for(&key).len();
        let wanted = match w {
            WriteQuorum::One => 1,
            WriteQuorum::Quorum => replicas / 2 + 1,
            WriteQuorum::All => replicas,
        };
        if wanted <= 1 {
            self.channel.replicate(key.as_str(), &applied.delta, None);
            return Ok(applied);
        }
        let peers: Vec<NodeId> = self.channel.peers().iter().map(|p| p.id).collect();
        let deltas = vec![(key.to_string(), applied.delta.clone())];
        let request = |id| PeerMessage::Deltas { deltas, ack: Some(id) };
        let deadline = Instant::now() + timeout;
        let answers =
            call_many(&self.channel, &peers, request, Strategy::FirstOf(wanted - 1), deadline)
                .await;
        let acked = 1 + answers.values().filter(|a| matches!(a, PeerMessage::Acked { .. })).count();
        if acked < wanted {
            return Err(ClusterError::InsufficientAcks { acked, wanted });
        }
        Ok(applied)
    }

    /// Reads a key from the replicas `consistency` asks for: the local state
    /// first, then the peers' through [`call_many`], answering as soon as the
    /// level and `min_harvest` are met ([`Consistency::needed`]) — `one` from
    /// the local replica alone, `quorum` at a majority — while `all` waits for
    /// every replica or `timeout`. Repairs replicas that answered with less
    /// than the merge. The error carries the harvest too.
    pub async fn read(
        &self,
        key: &Key,
        consistency: Consistency,
        timeout: Duration,
        min_harvest: Option<f64>,
    ) -> Result<ClusterRead, ClusterError> {
        let local = self.node().envelope_async(key).await?;
        let replicas = self.replicas_for(key);
        let peers: Vec<NodeId> =
            replicas.iter().copied().filter(|id| *id != self.node().id()).collect();
        let strategy = consistency.strategy(min_harvest, replicas.len());
        let request = |id| PeerMessage::Read { id, key: key.to_string() };
        let deadline = Instant::now() + timeout;
        let answers = call_many(&self.channel, &peers, request, strategy, deadline).await;
        let mut states: BTreeMap<NodeId, Envelope> = BTreeMap::from([(self.node().id(), local)]);
        for (from, answer) in answers {
            if let PeerMessage::ReadReply { state, .. } = answer {
                states.insert(from, state);
            }
        }
        let merged = states.values().fold(Envelope::default(), |acc, s| acc.merged(s));
        self.repair(key, &merged, &states).await?;
        let harvest = Harvest { answered: states.len(), replicas: replicas.len() };
        if !harvest.satisfies(consistency, min_harvest) {
            return Err(ClusterError::InsufficientHarvest { harvest });
        }
        Ok(ClusterRead { state: merged, harvest })
    }

    /// Sends the merged state to every replica that answered with less.
    async fn repair(
        &self,
        key: &Key,
        merged: &Envelope,
        states: &BTreeMap<NodeId, Envelope>,
    ) -> Result<(), ClusterError> {
        for (id, state) in states {
            if state == merged {
                continue;
            }
            if *id == self.node().id() {
                let (node, key, merged) = (self.node().clone(), key.clone(), merged.clone());
                blocking(move || node.merge(&key, &merged)).await?;
            } else {
                let deltas = vec![(key.to_string(), merged.clone())];
                self.channel.send(*id, &PeerMessage::Deltas { deltas, ack: None });
            }
        }
        Ok(())
    }

    /// Starts one anti-entropy round with a random peer; `false` when there is none.
    pub fn anti_entropy_round(&self) -> bool {
        let peers = self.channel.peers();
        match peers.choose(&mut rand::rng()) {
            Some(peer) => self.channel.start_anti_entropy(peer.id),
            None => false,
        }
    }

    /// Runs anti-entropy rounds every `period` until the task is aborted.
    pub async fn run_anti_entropy(self: Arc<Self>, period: Duration) {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.anti_entropy_round();
        }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}
