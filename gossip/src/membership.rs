//! The handle the node holds: starts the gossip loop, asks it to announce,
//! update metadata or leave, and reads the membership view, events and
//! metrics.

use crate::agent::{self, Agent, Command};
use crate::auth::{PacketAuth, SEAL_BYTES};
use crate::events::{EventStream, MemberInfo, MemberState, Subscribers};
use crate::identity::{NodeIdentity, NodeMeta};
use crate::metrics::{GossipMetrics, MetricsSnapshot};
use crate::state_file::{self, StateFileError};
use crate::transport::Transport;
use crate::GOSSIP_PACKET_BYTES_MAX;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Commands the handle may have queued for the loop; callers wait for room.
pub const COMMAND_QUEUE_MAX: usize = 64;
/// Authenticated packets waiting for the loop; beyond this they are dropped
/// and counted (`dropped_inbox_full`).
pub const INBOX_PACKETS_MAX: usize = 1024;
/// Most addresses announced to per join attempt or per
/// [`Membership::announce`] call (seeds first, then remembered members).
pub const ANNOUNCE_TARGETS_MAX: usize = 16;
/// Cluster size the default SWIM timings are derived for (foca's LAN preset).
pub const CLUSTER_SIZE_HINT: u32 = 10;

/// The SWIM parameters calmkv uses by default: foca's LAN preset
/// (`Config::new_lan`, after memberlist's DefaultLANConfig) for
/// [`CLUSTER_SIZE_HINT`] members: probe every 1 s, direct probe timeout
/// 500 ms, 3 indirect probes, suspect to down after 4 s, gossip every
/// 200 ms to 3 members, announce every 30 s, announce to down members
/// every 65 s, down members remembered 24 h.
///
/// A crashed member is declared down by the member that probes it after at
/// most one probe period plus the suspicion timeout (1 s + 4 s) once it is
/// probed; each member probes the others round-robin over a shuffled list,
/// so with `n` members the first probe comes within `2(n-1)` periods. With
/// dissemination (gossip every 200 ms), a 4-member cluster agrees within
/// about 6 + 5 + 1 = 12 s.
pub fn lan_swim_config() -> foca::Config {
    let size = NonZeroU32::new(CLUSTER_SIZE_HINT).expect("non-zero hint");
    foca::Config::new_lan(size)
}

/// How to run the membership of one node.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// The node's persisted id.
    pub node_id: u64,
    /// The node's addresses and invariant hash, carried in its identity.
    pub meta: NodeMeta,
    /// The gossip address peers should use; `None` uses the transport's
    /// local address (set it when binding to `0.0.0.0`).
    pub advertise_addr: Option<SocketAddr>,
    /// Gossip addresses to announce to on start (may include ourselves).
    pub seeds: Vec<SocketAddr>,
    /// Where to persist the membership state; `None` keeps it in memory only.
    pub state_path: Option<PathBuf>,
    /// With a secret, every packet is encrypted and authenticated
    /// (XChaCha20-Poly1305 under a key derived from it).
    pub cluster_secret: Option<Vec<u8>>,
    /// Further secrets packets may be sealed with (rotation): accepted when
    /// opening, never used to seal. Needs `cluster_secret`.
    pub accepted_secrets: Vec<Vec<u8>>,
    /// SWIM parameters; `max_packet_size` is overridden with
    /// [`GOSSIP_PACKET_BYTES_MAX`] minus the tag, if any.
    pub swim: foca::Config,
    /// While no other member is active, announce to the seeds and the
    /// remembered members this often.
    pub join_retry_interval: Duration,
    /// How often a changed membership is written to the state file.
    pub state_write_interval: Duration,
    /// Seed of foca's random choices (tests); `None` seeds from the OS.
    pub rng_seed: Option<u64>,
}

impl GossipConfig {
    /// Defaults: LAN timings, no seeds, no state file, no secret.
    pub fn new(node_id: u64, meta: NodeMeta) -> GossipConfig {
        GossipConfig {
            node_id,
            meta,
            advertise_addr: None,
            seeds: Vec::new(),
            state_path: None,
            cluster_secret: None,
            accepted_secrets: Vec::new(),
            swim: lan_swim_config(),
            join_retry_interval: Duration::from_secs(1),
            state_write_interval: Duration::from_secs(1),
            rng_seed: None,
        }
    }

    fn validate(&self) -> Result<(), GossipError> {
        let invalid = |reason| Err(GossipError::InvalidConfig { reason });
        let s = &self.swim;
        if s.probe_period.is_zero() || s.probe_rtt.is_zero() || s.suspect_to_down_after.is_zero() {
            return invalid("SWIM periods must be non-zero");
        }
        if s.probe_rtt >= s.probe_period {
            return invalid("probe_rtt must be smaller than probe_period");
        }
        if self.join_retry_interval.is_zero() || self.state_write_interval.is_zero() {
            return invalid("intervals must be non-zero");
        }
        let mut secrets = self.cluster_secret.iter().chain(&self.accepted_secrets);
        if secrets.any(|s| s.len() < 16) {
            return invalid("cluster secret must be at least 16 bytes");
        }
        if self.cluster_secret.is_none() && !self.accepted_secrets.is_empty() {
            return invalid("accepted secrets need a cluster secret to seal with");
        }
        Ok(())
    }
}

/// Errors of the membership layer.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The state file could not be read or written. Nothing started.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The state file belongs to another node id. Nothing started.
    #[error("membership state file {path} belongs to node {file_node_id}, not {node_id}")]
    StateOfAnotherNode {
        /// The file.
        path: PathBuf,
        /// The node id in the file.
        file_node_id: u64,
        /// Our node id.
        node_id: u64,
    },
    /// The configuration is unusable. Nothing started.
    #[error("invalid gossip configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// The gossip loop has stopped (left, shut down or crashed).
    #[error("gossip loop stopped")]
    Stopped,
    /// foca refused the operation; the membership state did not change.
    #[error("SWIM protocol error: {source}")]
    Protocol {
        /// foca's error.
        source: foca::Error,
    },
}

/// A running membership. Dropping it stops the loop without leaving (the
/// cluster will detect the node as failed); prefer [`Membership::leave`].
#[derive(Debug)]
pub struct Membership {
    commands: mpsc::Sender<Command>,
    view: watch::Receiver<Arc<Vec<MemberInfo>>>,
    identity: watch::Receiver<NodeIdentity>,
    subscribers: Subscribers,
    metrics: Arc<GossipMetrics>,
    task: Option<JoinHandle<()>>,
}

fn snapshot(metrics: &GossipMetrics, view: &[MemberInfo]) -> MetricsSnapshot {
    let mut snapshot = metrics.counters();
    for m in view {
        match m.state {
            MemberState::Alive => snapshot.members_alive += 1,
            MemberState::Suspect => snapshot.members_suspect += 1,
            MemberState::Down => snapshot.members_down += 1,
        }
    }
    snapshot
}

/// A cloneable view of a running [`Membership`] (see [`Membership::watch`]).
#[derive(Debug, Clone)]
pub struct MembersWatch {
    view: watch::Receiver<Arc<Vec<MemberInfo>>>,
    identity: watch::Receiver<NodeIdentity>,
    metrics: Arc<GossipMetrics>,
}

impl MembersWatch {
    /// Every other member, one per node id, in node id order.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.view.borrow().as_ref().clone()
    }

    /// Our current identity.
    pub fn identity(&self) -> NodeIdentity {
        *self.identity.borrow()
    }

    /// Counters plus members by state.
    pub fn metrics(&self) -> MetricsSnapshot {
        snapshot(&self.metrics, &self.view.borrow())
    }

    /// Waits until the view changes after the last [`MembersWatch::members_changed`]
    /// returned (or since the watch was made), and returns the new view;
    /// `None` once the membership has stopped.
    pub async fn members_changed(&mut self) -> Option<Vec<MemberInfo>> {
        self.view.changed().await.ok()?;
        Some(self.view.borrow_and_update().as_ref().clone())
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Membership {
    /// Restores the state file (if any), picks this boot's bump, writes it
    /// back, starts the loop on `transport` and announces to the seeds and
    /// to the remembered members.
    ///
    /// The bump is `max(persisted bump + 1, Unix time in ms)`: strictly
    /// larger than any bump this node used before when the state file
    /// survived, and very likely larger when it did not.
    pub async fn start<T: Transport>(
        config: GossipConfig,
        transport: Arc<T>,
    ) -> Result<Membership, GossipError> {
        config.validate()?;
        let restored = match &config.state_path {
            Some(path) => state_file::load(path)?,
            None => None,
        };
        if let (Some(state), Some(path)) = (&restored, &config.state_path) {
            if state.node_id != config.node_id {
                return Err(GossipError::StateOfAnotherNode {
                    path: path.clone(),
                    file_node_id: state.node_id,
                    node_id: config.node_id,
                });
            }
        }
        let previous_bump = restored.as_ref().map(|s| s.bump);
        let bump = previous_bump.map_or(0, |b| b.saturating_add(1)).max(unix_millis());
        let identity = NodeIdentity {
            node_id: config.node_id,
            gossip_addr: config.advertise_addr.unwrap_or_else(|| transport.local_addr()),
            bump,
            meta: config.meta,
        };
        let restored_members: Vec<_> = restored
            .map(|s| s.members.iter().filter_map(|m| m.to_member()).collect())
            .unwrap_or_default();

        let mut swim = config.swim.clone();
        // foca's limit is the payload's: nonce and tag, when sealed, must fit too.
        let seal_bytes = if config.cluster_secret.is_some() { SEAL_BYTES } else { 0 };
        swim.max_packet_size =
            NonZeroUsize::new(GOSSIP_PACKET_BYTES_MAX - seal_bytes).expect("limit above seal size");
        let metrics = Arc::new(GossipMetrics::default());
        let subscribers = Subscribers::default();
        let (view_tx, view_rx) = watch::channel(Arc::new(Vec::new()));
        let (identity_tx, identity_rx) = watch::channel(identity);
        let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_PACKETS_MAX);
        let auth = config
            .cluster_secret
            .as_deref()
            .map(|first| PacketAuth::keyring(first, &config.accepted_secrets));

        let mut agent = Agent::new(agent::AgentParts {
            identity,
            swim,
            rng_seed: config.rng_seed,
            transport: transport.clone(),
            auth: auth.clone(),
            metrics: metrics.clone(),
            subscribers: subscribers.clone(),
            view_tx,
            identity_tx,
            state_path: config.state_path.clone(),
            seeds: config.seeds.clone(),
            join_retry_interval: config.join_retry_interval,
            state_write_interval: config.state_write_interval,
        });
        agent.restore(restored_members);
        // Persist the new bump before saying anything to the cluster.
        agent.write_state()?;
        agent.join();

        let receiver =
            tokio::spawn(agent::receive_loop(transport, auth, inbox_tx, metrics.clone()));
        let task = tokio::spawn(agent.run(command_rx, inbox_rx, receiver));
        Ok(Membership {
            commands: command_tx,
            view: view_rx,
            identity: identity_rx,
            subscribers,
            metrics,
            task: Some(task),
        })
    }

    /// Our current identity (the bump changes when we rejoin or update metadata).
    pub fn identity(&self) -> NodeIdentity {
        *self.identity.borrow()
    }

    /// Every other member we know, one per node id, in node id order.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.view.borrow().as_ref().clone()
    }

    /// The member with `node_id`, if known.
    pub fn member(&self, node_id: u64) -> Option<MemberInfo> {
        self.view.borrow().iter().find(|m| m.identity.node_id == node_id).copied()
    }

    /// A cheap, cloneable handle on the membership view and our identity,
    /// for tasks that follow membership changes: unlike an event stream it
    /// never loses an update (a reader that falls behind sees the latest view).
    /// It keeps reading the last view after the membership stops.
    pub fn watch(&self) -> MembersWatch {
        MembersWatch {
            view: self.view.clone(),
            identity: self.identity.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// A new stream of membership events (from now on).
    pub fn subscribe(&self) -> EventStream {
        self.subscribers.subscribe()
    }

    /// Counters plus members by state.
    pub fn metrics(&self) -> MetricsSnapshot {
        snapshot(&self.metrics, &self.view.borrow())
    }

    async fn ask<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<R>) -> Command,
    ) -> Result<R, GossipError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| GossipError::Stopped)?;
        rx.await.map_err(|_| GossipError::Stopped)
    }

    /// Announces to `addrs` (gossip addresses; the first
    /// [`ANNOUNCE_TARGETS_MAX`]) to join their cluster.
    pub async fn announce(&self, addrs: Vec<SocketAddr>) -> Result<(), GossipError> {
        self.ask(|reply| Command::Announce { addrs, reply }).await
    }

    /// Changes the metadata we carry: our identity is renewed (bump + 1)
    /// and the cluster told at once. Returns the new identity.
    pub async fn update_meta(&self, meta: NodeMeta) -> Result<NodeIdentity, GossipError> {
        self.ask(|reply| Command::UpdateMeta { meta, reply }).await?
    }

    /// Leaves gracefully: declares ourselves down to a few members, hands
    /// those packets to the transport, writes the state file, and stops.
    pub async fn leave(mut self) -> Result<(), GossipError> {
        let result = self.ask(|reply| Command::Leave { reply }).await?;
        self.join_task().await;
        result
    }

    /// Stops without leaving (the cluster will detect us as failed), after
    /// writing the state file.
    pub async fn shutdown(mut self) -> Result<(), GossipError> {
        let result = self.ask(|reply| Command::Shutdown { reply }).await?;
        self.join_task().await;
        result
    }

    /// Stops the loop abruptly, as a crash would: no leave, no final state
    /// write. For tests and simulations.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    async fn join_task(&mut self) {
        if let Some(task) = self.task.take() {
            // The loop ends right after replying; a panic there is a bug.
            if let Err(e) = task.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }
}
