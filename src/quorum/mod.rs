//! The quorum: a Raft group (openraft) of a few voter nodes that serializes
//! the operations declared invariants route to it (see docs/invariants.md).
//!
//! Voters are listed by their quorum address, the same list on every node
//! (`--voters a,b,c`); a voter's Raft id is its position in the list plus one.
//! The first voter initializes the group when its log is empty. A node that is
//! not a voter forwards proposals to a voter, which forwards them to the
//! leader.
//!
//! Safety: every operation of the unsafe direction for a key goes through the
//! log, and the state machine ([`store::StateMachine::decide`]) admits it only
//! if the rule holds on `(everything the quorum admitted) ⊔ (what the proposer
//! has seen) + the operation`. Safe-direction operations stay local and can
//! only move the value away from the bound, so that view is conservative: for
//! `min = 0` it counts every committed decrement and a subset of the real
//! increments. An admitted operation's outcome is the key's whole joined state,
//! which replicas merge: a replica that has a coordinated decrement therefore
//! also has every increment it was counted against, and the rule holds on every
//! replica at every moment.

pub mod election;
pub mod idempotency;
pub mod network;
pub mod store;
pub mod types;

use crate::envelope::Envelope;
use crate::invariants::{as_creation, Route};
use crate::replication::cluster::Coordinator;
use crate::replication::frame::ClusterSecret;
use crate::store::Store;
use crate::{Applied, Node, NodeError, Op};
pub use idempotency::IdempotencyKey;
use network::{
    Client, Factory, Handler, ListenerLimits, NetworkMetrics, ProposeFailure, Request, Response,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::storage::Adaptor;
use openraft::{BasicNode, Raft};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::{OnCommit, QuorumStore};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
pub use types::{Command, Outcome, Proposal, TypeConfig, WireAction};

/// Most hops a proposal is forwarded (non-voter → voter → leader).
const FORWARD_HOPS_MAX: u8 = 2;

/// The longest a voter works on a forwarded proposal, whatever the sender
/// asks: a sender's deadline cannot pin a voter's task for longer.
const PROPOSE_TIMEOUT_MAX: Duration = Duration::from_secs(60);

/// How much sooner than the caller's deadline the quorum gives up, so that
/// its answer (rather than the caller's own timer) reaches the caller.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// Raft timings.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// Leader heartbeat period.
    pub heartbeat: Duration,
    /// Election timeout range, lower end (the upper is twice it).
    pub election_min: Duration,
}

impl Default for Timings {
    /// LAN defaults: heartbeats every 100 ms, elections after 500–1,000 ms.
    fn default() -> Timings {
        Timings { heartbeat: Duration::from_millis(100), election_min: Duration::from_millis(500) }
    }
}

/// How a node takes part in the quorum.
#[derive(Clone, Debug)]
pub struct QuorumConfig {
    /// Every voter's quorum address, identical on every node.
    pub voters: Vec<String>,
    /// This node's quorum address when it is a voter (one of `voters`).
    pub listen: Option<String>,
    /// This voter's Raft id; `None` means its position in `voters` plus one.
    /// A voter that replaces a dead one is given a new id (see
    /// [`QuorumGroup::replace_voter`]): ids are never reused.
    pub id: Option<u64>,
    /// The cluster secret that authenticates quorum frames.
    pub secret: Option<ClusterSecret>,
    /// Raft timings.
    pub timings: Timings,
}

/// Why the quorum could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum QuorumError {
    /// The configuration is unusable.
    #[error("invalid quorum configuration: {0}")]
    InvalidConfig(String),
    /// The quorum address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Raft could not start (storage).
    #[error("the quorum could not start: {0}")]
    Start(String),
    /// This node is not the leader (for membership changes).
    #[error("this node is not the quorum's leader (the leader is {leader:?})")]
    NotLeader {
        /// The leader's address, if known.
        leader: Option<String>,
    },
}

/// The quorum as a node sees it, for `/v1/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct QuorumStatus {
    /// Voter ids and addresses.
    pub voters: BTreeMap<u64, String>,
    /// This node's voter id, if it is one.
    pub id: Option<u64>,
    /// The leader's id, if known here.
    pub leader: Option<u64>,
    /// The current term.
    pub term: Option<u64>,
    /// Index of the last log entry known committed (applied) here.
    pub commit_index: Option<u64>,
    /// The hash of the declarations this node enforces.
    pub invariants_hash: String,
}

struct Voter {
    id: u64,
    raft: Raft<TypeConfig>,
    store: QuorumStore,
    /// The listener and campaign tasks, taken (and awaited) at shutdown.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// A node's part in the quorum: a voter (with its Raft) or a client of the
/// voters.
pub struct QuorumGroup {
    voters: Vec<String>,
    secret: Option<ClusterSecret>,
    voter: Option<Voter>,
    node: Arc<Node>,
    next_voter: AtomicUsize,
    metrics: Arc<NetworkMetrics>,
}

/// Serves quorum requests on a voter.
struct Serving {
    raft: Raft<TypeConfig>,
    group: std::sync::Weak<QuorumGroup>,
    metrics: Arc<NetworkMetrics>,
    store: QuorumStore,
    contact: Arc<election::Contact>,
    lease: Duration,
}

impl Serving {
    /// The request's Raft vote, when it has one.
    fn vote_of(request: &Request) -> Option<&openraft::Vote<u64>> {
        match request {
            Request::AppendEntries(rpc) => Some(&rpc.vote),
            Request::Vote(rpc) => Some(&rpc.vote),
            Request::InstallSnapshot(rpc) => Some(&rpc.vote),
            Request::PreVote(_) | Request::Propose { .. } => None,
        }
    }

    /// Answers a pre-vote from this voter's own view; changes nothing.
    fn pre_vote(&self, request: &election::PreVote) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        election::grant(
            request,
            metrics.current_term,
            election::last_log_id(&metrics, &self.store),
            metrics.state.is_leader(),
            self.contact.since(),
            self.lease,
        )
    }
}

impl Handler for Serving {
    async fn handle(&self, request: Request) -> Response {
        let absurd = match &request {
            Request::PreVote(pre_vote) => pre_vote.term > network::TERM_MAX,
            other => Self::vote_of(other).is_some_and(|vote| !network::term_ok(vote)),
        };
        if absurd {
            self.metrics.terms_refused.fetch_add(1, Ordering::Relaxed);
            return Response::Refused {
                reason: format!("a term past the bound of {}", network::TERM_MAX),
            };
        }
        match request {
            Request::AppendEntries(rpc) => {
                let answer = self.raft.append_entries(rpc).await;
                // Any answer but "your vote is lower" accepts the sender as
                // leader: this voter has heard from one.
                if matches!(&answer, Ok(response) if !matches!(response, openraft::raft::AppendEntriesResponse::HigherVote(_)))
                {
                    self.contact.touch();
                }
                Response::AppendEntries(answer)
            }
            Request::Vote(rpc) => Response::Vote(self.raft.vote(rpc).await),
            Request::InstallSnapshot(rpc) => {
                let term = rpc.vote.leader_id().term;
                let answer = self.raft.install_snapshot(rpc).await;
                if matches!(&answer, Ok(response) if response.vote.leader_id().term <= term) {
                    self.contact.touch();
                }
                Response::InstallSnapshot(answer)
            }
            Request::PreVote(pre_vote) => Response::PreVote { granted: self.pre_vote(&pre_vote) },
            Request::Propose { proposal, hops, timeout_ms } => {
                let timeout = match timeout_ms {
                    0 => network::RPC_TIMEOUT,
                    ms => Duration::from_millis(ms).min(PROPOSE_TIMEOUT_MAX),
                };
                match self.group.upgrade() {
                    Some(group) => Response::Propose(
                        group.commit(proposal, hops, Instant::now() + timeout).await,
                    ),
                    None => Response::Propose(Err(ProposeFailure::NotApplied("stopping".into()))),
                }
            }
        }
    }
}

impl QuorumGroup {
    /// Starts this node's part: with `config.listen`, a voter with its log in
    /// `store`; otherwise a client of the voters.
    pub async fn start(
        config: QuorumConfig,
        node: Arc<Node>,
        store: Arc<dyn Store>,
    ) -> Result<Arc<QuorumGroup>, QuorumError> {
        let listener = match &config.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| QuorumError::Bind { addr: addr.clone(), source })?,
            ),
            None => None,
        };
        QuorumGroup::start_on(config, listener, node, store).await
    }

    /// [`QuorumGroup::start`] on an already bound listener (a voter's
    /// `config.listen` is then its advertised address).
    pub async fn start_on(
        config: QuorumConfig,
        listener: Option<TcpListener>,
        node: Arc<Node>,
        store: Arc<dyn Store>,
    ) -> Result<Arc<QuorumGroup>, QuorumError> {
        QuorumGroup::start_with(config, ListenerLimits::default(), listener, node, store).await
    }

    /// [`QuorumGroup::start_on`] with the listener's bounds.
    pub async fn start_with(
        config: QuorumConfig,
        limits: ListenerLimits,
        listener: Option<TcpListener>,
        node: Arc<Node>,
        store: Arc<dyn Store>,
    ) -> Result<Arc<QuorumGroup>, QuorumError> {
        if config.voters.is_empty() {
            return Err(QuorumError::InvalidConfig("no voters".into()));
        }
        let unique: BTreeSet<&String> = config.voters.iter().collect();
        if unique.len() != config.voters.len() {
            return Err(QuorumError::InvalidConfig("a voter is listed twice".into()));
        }
        let metrics = Arc::new(NetworkMetrics::default());
        let Some(listen) = &config.listen else {
            return Ok(Arc::new(QuorumGroup {
                voters: config.voters,
                secret: config.secret,
                voter: None,
                node,
                next_voter: AtomicUsize::new(0),
                metrics,
            }));
        };
        let position = config.voters.iter().position(|v| v == listen).ok_or_else(|| {
            QuorumError::InvalidConfig(format!(
                "the quorum address {listen} is not among the voters"
            ))
        })?;
        let id = config.id.unwrap_or(position as u64 + 1);
        let raft_config = openraft::Config {
            cluster_name: "calmkv".into(),
            heartbeat_interval: config.timings.heartbeat.as_millis() as u64,
            election_timeout_min: config.timings.election_min.as_millis() as u64,
            election_timeout_max: 2 * config.timings.election_min.as_millis() as u64,
            // Elections are started by the pre-vote (see `election`), never
            // by openraft's own timer.
            enable_elect: false,
            ..Default::default()
        }
        .validate()
        .map_err(|e| QuorumError::InvalidConfig(e.to_string()))?;
        let on_commit: OnCommit = {
            let node = node.clone();
            Arc::new(move |key: &str, state: &Envelope| {
                let (node, key, state) = (node.clone(), key.to_string(), state.clone());
                // The voter's own replica learns what the quorum admitted;
                // idempotent, so a re-applied entry does no harm.
                tokio::task::spawn_blocking(move || {
                    if let Ok(key) = crate::Key::new(key, node.limits()) {
                        if let Err(error) = node.merge(&key, &state) {
                            tracing::warn!(%error, "merging a committed quorum state failed");
                        }
                    }
                });
            })
        };
        let quorum_store = QuorumStore::open(store, node.limits().clone(), Some(on_commit))
            .map_err(|e| QuorumError::Start(e.to_string()))?;
        let (log_store, state_machine) = Adaptor::new(quorum_store.clone());
        let factory = Factory { secret: config.secret.clone(), metrics: metrics.clone() };
        let raft = Raft::new(id, Arc::new(raft_config), factory, log_store, state_machine)
            .await
            .map_err(|e| QuorumError::Start(e.to_string()))?;
        let listener = match listener {
            Some(listener) => listener,
            None => TcpListener::bind(listen)
                .await
                .map_err(|source| QuorumError::Bind { addr: listen.clone(), source })?,
        };
        let voters = config.voters.clone();
        let contact = Arc::new(election::Contact::new());
        let campaign = tokio::spawn(election::campaign(
            raft.clone(),
            quorum_store.clone(),
            contact.clone(),
            id,
            config.timings,
            config.secret.clone(),
        ));
        let group = Arc::new_cyclic(|weak: &std::sync::Weak<QuorumGroup>| {
            let serving = Arc::new(Serving {
                raft: raft.clone(),
                group: weak.clone(),
                metrics: metrics.clone(),
                store: quorum_store.clone(),
                contact,
                lease: election::lease(&config.timings),
            });
            let task = tokio::spawn(network::serve(
                listener,
                serving,
                config.secret.clone(),
                metrics.clone(),
                limits,
            ));
            QuorumGroup {
                voters,
                secret: config.secret.clone(),
                voter: Some(Voter {
                    id,
                    raft: raft.clone(),
                    store: quorum_store,
                    tasks: std::sync::Mutex::new(vec![task, campaign]),
                }),
                node,
                next_voter: AtomicUsize::new(0),
                metrics: metrics.clone(),
            }
        });
        if id == 1 {
            let members: BTreeMap<u64, BasicNode> = config
                .voters
                .iter()
                .enumerate()
                .map(|(i, addr)| (i as u64 + 1, BasicNode { addr: addr.clone() }))
                .collect();
            // Only a fresh log initializes; on a restart this is refused.
            if let Err(error) = raft.initialize(members).await {
                tracing::debug!(%error, "quorum already initialized");
            }
        }
        Ok(group)
    }

    /// The quorum's transport counters.
    pub fn metrics(&self) -> &Arc<NetworkMetrics> {
        &self.metrics
    }

    /// Commits a proposal here (a voter) or forwards it, answering by
    /// `deadline`: the outcome, or why none could be had, and whether the
    /// proposal may have been applied regardless.
    async fn commit(
        &self,
        command: Command,
        hops: u8,
        deadline: Instant,
    ) -> Result<Outcome, ProposeFailure> {
        let own_hash = self.node.invariants().hash();
        if command.proposal.invariants_hash != own_hash {
            return Ok(Outcome::Refused {
                code: "coordination_unavailable".into(),
                message: format!(
                    "the proposing node's invariant declarations (hash {:016x}) differ from this voter's ({own_hash:016x})",
                    command.proposal.invariants_hash
                ),
            });
        }
        let Some(voter) = &self.voter else {
            return self.forward(command, hops, deadline).await;
        };
        let mut waited_for_leader = false;
        loop {
            let write = voter.raft.client_write(command.clone());
            let forward = match tokio::time::timeout_at(deadline, write).await {
                // Appended here as leader, not confirmed in time: it may
                // still commit.
                Err(_) => {
                    return Err(ProposeFailure::Unknown(
                        "the commit was not confirmed by the deadline".into(),
                    ))
                }
                Ok(Ok(response)) => return Ok(response.data),
                // openraft answers ForwardToLeader before appending (this
                // voter is not the leader), or for an entry it appended and
                // then truncated (never committed): not applied either way.
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => forward,
                Ok(Err(error)) => return Err(ProposeFailure::Unknown(error.to_string())),
            };
            match (forward.leader_id, forward.leader_node) {
                (Some(leader), Some(node)) if leader != voter.id => {
                    if hops >= FORWARD_HOPS_MAX {
                        return Err(ProposeFailure::NotApplied("too many forwards".into()));
                    }
                    return self.send(node.addr, command, hops + 1, deadline).await;
                }
                _ if !waited_for_leader => {
                    // An election is under way: wait for its result, within
                    // the deadline, then try once more.
                    waited_for_leader = true;
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let own = voter.id;
                    let elected = voter
                        .raft
                        .wait(Some(remaining))
                        .metrics(
                            |m| m.current_leader.is_some_and(|l| l != own || m.state.is_leader()),
                            "a leader",
                        )
                        .await;
                    if elected.is_err() {
                        return Err(ProposeFailure::NotApplied("no leader is known".into()));
                    }
                }
                _ => return Err(ProposeFailure::NotApplied("no leader is known".into())),
            }
        }
    }

    /// Sends a proposal to the quorum member at `addr`, answering by
    /// `deadline`. A failure before any byte left is "not applied"; after, the
    /// member may have committed it, so the outcome is unknown.
    async fn send(
        &self,
        addr: String,
        proposal: Command,
        hops: u8,
        deadline: Instant,
    ) -> Result<Outcome, ProposeFailure> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ProposeFailure::NotApplied("the deadline passed before sending".into()));
        }
        // The member answers within most of what is left, so that its own
        // "not applied" reaches this node before the deadline does.
        let timeout_ms = u64::try_from((remaining * 9 / 10).as_millis()).unwrap_or(u64::MAX).max(1);
        let request = Request::Propose { proposal, hops, timeout_ms };
        let mut client = Client::new(addr.clone(), self.secret.clone());
        match client.call(&request, remaining).await {
            Ok(Response::Propose(answer)) => answer,
            // Refused unread: nothing was done.
            Ok(Response::Refused { reason }) => {
                Err(ProposeFailure::NotApplied(format!("{addr} refused the request: {reason}")))
            }
            Ok(_) => Err(ProposeFailure::Unknown(format!("{addr} answered another request kind"))),
            Err(error) if !error.sent => {
                Err(ProposeFailure::NotApplied(format!("{addr} unreachable: {error}")))
            }
            Err(error) => Err(ProposeFailure::Unknown(format!("no answer from {addr}: {error}"))),
        }
    }

    /// A non-voter's proposal: tried on each voter in turn until one answers.
    /// Without an idempotency key, a voter that may have received it ends the
    /// search (trying another could apply it twice); with one, the next voter
    /// is tried, since the quorum answers a repeat with the first outcome.
    async fn forward(
        &self,
        command: Command,
        hops: u8,
        deadline: Instant,
    ) -> Result<Outcome, ProposeFailure> {
        if hops >= FORWARD_HOPS_MAX {
            return Err(ProposeFailure::NotApplied("too many forwards".into()));
        }
        let start = self.next_voter.fetch_add(1, Ordering::Relaxed);
        let mut last = ProposeFailure::NotApplied("no voter answered".into());
        for i in 0..self.voters.len() {
            let addr = self.voters[(start + i) % self.voters.len()].clone();
            match self.send(addr, command.clone(), hops + 1, deadline).await {
                Ok(outcome) => return Ok(outcome),
                Err(failure @ ProposeFailure::Unknown(_)) => {
                    if command.idempotency_key.is_none() {
                        return Err(failure);
                    }
                    last = failure;
                }
                // Once an attempt may have been applied, the answer stays
                // "unknown" whatever the later attempts say.
                Err(failure) if matches!(last, ProposeFailure::NotApplied(_)) => last = failure,
                Err(_) => {}
            }
        }
        Err(last)
    }

    /// Proposes `op`, which a declared invariant routes here, by `deadline`.
    pub async fn propose(&self, op: Op, deadline: Instant) -> Result<Applied, NodeError> {
        self.propose_idempotent(op, deadline, None).await
    }

    /// [`QuorumGroup::propose`] under a client's idempotency key: a repeat of
    /// the same operation with the same key, within the window, is answered
    /// with the first outcome and applied once.
    pub async fn propose_idempotent(
        &self,
        op: Op,
        deadline: Instant,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Result<Applied, NodeError> {
        let key = op.key.to_string();
        let node = self.node.clone();
        let invariants = node.invariants().clone();
        let route = invariants.route(&op)?;
        let Route::Quorum { declaration, .. } = &route else {
            return Err(NodeError::BadRequest {
                reason: "the operation needs no coordination".into(),
            });
        };
        let op = as_creation(&op, &route);
        let observed = {
            let (node, key) = (node.clone(), op.key.clone());
            match tokio::task::spawn_blocking(move || node.envelope(&key)).await {
                Ok(result) => result?,
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            }
        };
        let proposal = Proposal {
            key: key.clone(),
            action: WireAction::from(&op.action),
            observed,
            declaration: (*declaration).clone(),
            invariants_hash: invariants.hash(),
            now: calmkv_crdts::Hlc::default(),
        };
        let unavailable =
            |reason: String| NodeError::CoordinationUnavailable { key: key.clone(), reason };
        let now = Instant::now();
        let inner = if deadline.saturating_duration_since(now) > 2 * DEADLINE_MARGIN {
            deadline - DEADLINE_MARGIN
        } else {
            deadline
        };
        let command =
            Command { proposal, idempotency_key: idempotency_key.map(|k| k.as_str().to_string()) };
        let entry_bytes = rmp_serde::to_vec_named(&command).map(|b| b.len()).unwrap_or(usize::MAX);
        if entry_bytes > network::QUORUM_ENTRY_BYTES_MAX {
            return Err(NodeError::LimitExceeded {
                key,
                what: format!(
                    "the proposal is {entry_bytes} bytes, more than a quorum log entry's limit of {}",
                    network::QUORUM_ENTRY_BYTES_MAX
                ),
            });
        }
        let answer = match tokio::time::timeout_at(deadline, self.commit(command, 0, inner)).await {
            Ok(answer) => answer,
            Err(_) => Err(ProposeFailure::Unknown("no answer by the deadline".into())),
        };
        let indeterminate =
            |reason: String| NodeError::CoordinationIndeterminate { key: key.clone(), reason };
        match answer {
            Ok(Outcome::Committed { state, .. }) => {
                let (merging, k) = (state.clone(), op.key.clone());
                let node = node.clone();
                match tokio::task::spawn_blocking(move || node.merge(&k, &merging)).await {
                    Ok(result) => result?,
                    Err(join) => std::panic::resume_unwind(join.into_panic()),
                };
                Ok(Applied { state: state.clone(), delta: state, coordinated: true })
            }
            Ok(Outcome::Refused { code, message }) => Err(Outcome::error(&code, &message, &key)),
            Ok(Outcome::Nothing) => Err(indeterminate(
                "the quorum answered no outcome; the operation may or may not be applied".into(),
            )),
            Err(ProposeFailure::NotApplied(reason)) => {
                Err(unavailable(format!("no quorum reachable; not applied ({reason})")))
            }
            Err(ProposeFailure::Unknown(reason)) => Err(indeterminate(format!(
                "the quorum did not confirm; the operation may or may not be applied ({reason})"
            ))),
        }
    }

    /// The group as this node sees it.
    pub fn status(&self) -> QuorumStatus {
        let mut status = QuorumStatus {
            voters: self
                .voters
                .iter()
                .enumerate()
                .map(|(i, a)| (i as u64 + 1, a.clone()))
                .collect(),
            id: None,
            leader: None,
            term: None,
            commit_index: None,
            invariants_hash: format!("{:016x}", self.node.invariants().hash()),
        };
        if let Some(voter) = &self.voter {
            let metrics = voter.raft.metrics().borrow().clone();
            status.id = Some(voter.id);
            status.leader = metrics.current_leader;
            status.term = Some(metrics.current_term);
            status.commit_index = metrics.last_applied.map(|l| l.index);
            status.voters = metrics
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| {
                    metrics.membership_config.membership().voter_ids().any(|v| v == **id)
                })
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect();
        }
        status
    }

    /// The state the quorum admitted for `key`, on a voter.
    pub fn admitted(&self, key: &str) -> Option<Envelope> {
        self.voter.as_ref().and_then(|v| v.store.state_machine().key(key).cloned())
    }

    /// Replaces the voter `dead` with the voter `new_id` at `addr`, started
    /// beforehand with that id (run on the leader): the new one joins as a
    /// learner, catches up, then the voter set changes in one membership
    /// change. `new_id` must be above every id the group has used.
    pub async fn replace_voter(
        &self,
        dead: u64,
        new_id: u64,
        addr: String,
    ) -> Result<(), QuorumError> {
        let Some(voter) = &self.voter else {
            return Err(QuorumError::NotLeader { leader: None });
        };
        let metrics = voter.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(voter.id) {
            let leader = metrics.current_leader.and_then(|l| {
                metrics.membership_config.membership().get_node(&l).map(|n| n.addr.clone())
            });
            return Err(QuorumError::NotLeader { leader });
        }
        let membership = metrics.membership_config.membership().clone();
        let mut voters: BTreeSet<u64> = membership.voter_ids().collect();
        if !voters.remove(&dead) {
            return Err(QuorumError::InvalidConfig(format!("{dead} is not a voter")));
        }
        let highest = membership.nodes().map(|(id, _)| *id).max().unwrap_or(0);
        if new_id <= highest {
            return Err(QuorumError::InvalidConfig(format!(
                "the new voter's id must be above {highest}: ids are never reused"
            )));
        }
        voter
            .raft
            .add_learner(new_id, BasicNode { addr }, true)
            .await
            .map_err(|e| QuorumError::Start(e.to_string()))?;
        voters.insert(new_id);
        voter
            .raft
            .change_membership(voters, false)
            .await
            .map_err(|e| QuorumError::Start(e.to_string()))?;
        Ok(())
    }

    /// Stops this node's Raft, its elections and its listener (closed when
    /// this returns).
    pub async fn shutdown(&self) {
        if let Some(voter) = &self.voter {
            let tasks = std::mem::take(&mut *voter.tasks.lock().unwrap_or_else(|p| p.into_inner()));
            for task in tasks {
                task.abort();
                // Awaited: once this returns, the quorum port is closed and
                // can be bound again.
                let _ = task.await;
            }
            let _ = voter.raft.shutdown().await;
        }
    }
}

impl Coordinator for QuorumGroup {
    fn propose(
        &self,
        op: Op,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<Applied, NodeError>> + Send + '_>> {
        Box::pin(QuorumGroup::propose(self, op, deadline))
    }

    fn propose_idempotent(
        &self,
        op: Op,
        deadline: Instant,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Pin<Box<dyn Future<Output = Result<Applied, NodeError>> + Send + '_>> {
        Box::pin(QuorumGroup::propose_idempotent(self, op, deadline, idempotency_key))
    }

    fn status(&self) -> serde_json::Value {
        serde_json::to_value(QuorumGroup::status(self)).unwrap_or_default()
    }

    fn replace_voter(
        &self,
        dead: u64,
        id: u64,
        addr: String,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            QuorumGroup::replace_voter(self, dead, id, addr).await.map_err(|e| e.to_string())
        })
    }
}
