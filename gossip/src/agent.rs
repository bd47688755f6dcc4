//! The gossip loop: one task owns `Foca` and is fed by an input enum from
//! bounded channels (authenticated packets, commands) and by its own timer
//! queue. After every call into foca it drains the runtime: packets go to
//! the transport (never waiting), timers into the queue (never dropped),
//! then the view is recomputed and its changes published.
//!
//! A second task reads the transport, drops oversize and unauthenticated
//! packets (counted), and offers the rest to the loop's inbox; when the
//! inbox is full the packet is dropped and counted — SWIM tolerates loss,
//! a stalled failure detector it does not.

use crate::auth::PacketAuth;
use crate::codec::WireCodec;
use crate::events::{diff, view_of, MemberInfo, Subscribers, View};
use crate::identity::{NodeIdentity, NodeMeta};
use crate::membership::{GossipError, ANNOUNCE_TARGETS_MAX};
use crate::metrics::{add, bump, GossipMetrics};
use crate::state_file::{self, PersistedMember, PersistedState, StateFileError, STATE_MEMBERS_MAX};
use crate::timers::TimerQueue;
use crate::transport::Transport;
use crate::GOSSIP_PACKET_BYTES_MAX;
use foca::{AccumulatingRuntime, Foca, Member, NoCustomBroadcast, OwnedNotification};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Pause after a transient receive error, so a socket stuck in an error
/// state cannot spin the receive task.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Least time between two warnings about packets that fail authentication.
const AUTH_WARNING_PERIOD: Duration = Duration::from_secs(10);

/// Requests from the handle.
#[derive(Debug)]
pub(crate) enum Command {
    Announce { addrs: Vec<SocketAddr>, reply: oneshot::Sender<()> },
    UpdateMeta { meta: NodeMeta, reply: oneshot::Sender<Result<NodeIdentity, GossipError>> },
    Leave { reply: oneshot::Sender<Result<(), GossipError>> },
    Shutdown { reply: oneshot::Sender<Result<(), GossipError>> },
}

/// Everything one iteration of the loop reacts to.
enum Input {
    TimerDue,
    Command(Option<Command>),
    Packet(Vec<u8>),
    WriteState,
    JoinRetry,
}

type SwimCore = Foca<NodeIdentity, WireCodec, StdRng, NoCustomBroadcast>;

/// Aborts the task when dropped (so aborting the loop stops the receiver).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) struct AgentParts<T> {
    pub(crate) identity: NodeIdentity,
    pub(crate) swim: foca::Config,
    pub(crate) rng_seed: Option<u64>,
    pub(crate) transport: Arc<T>,
    pub(crate) auth: Option<PacketAuth>,
    pub(crate) metrics: Arc<GossipMetrics>,
    pub(crate) subscribers: Subscribers,
    pub(crate) view_tx: watch::Sender<Arc<Vec<MemberInfo>>>,
    pub(crate) identity_tx: watch::Sender<NodeIdentity>,
    pub(crate) state_path: Option<PathBuf>,
    pub(crate) seeds: Vec<SocketAddr>,
    pub(crate) join_retry_interval: Duration,
    pub(crate) state_write_interval: Duration,
}

pub(crate) struct Agent<T> {
    foca: SwimCore,
    runtime: AccumulatingRuntime<NodeIdentity>,
    timers: TimerQueue,
    transport: Arc<T>,
    auth: Option<PacketAuth>,
    metrics: Arc<GossipMetrics>,
    subscribers: Subscribers,
    view: View,
    view_tx: watch::Sender<Arc<Vec<MemberInfo>>>,
    identity_tx: watch::Sender<NodeIdentity>,
    state_path: Option<PathBuf>,
    state_dirty: bool,
    seeds: Vec<SocketAddr>,
    join_retry_interval: Duration,
    state_write_interval: Duration,
    /// Set by a graceful leave: being declared down is then what we asked for.
    leaving: bool,
}

impl<T: Transport> Agent<T> {
    pub(crate) fn new(parts: AgentParts<T>) -> Agent<T> {
        let rng = match parts.rng_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        Agent {
            foca: Foca::new(parts.identity, parts.swim, rng, WireCodec),
            runtime: AccumulatingRuntime::new(),
            timers: TimerQueue::default(),
            transport: parts.transport,
            auth: parts.auth,
            metrics: parts.metrics,
            subscribers: parts.subscribers,
            view: View::new(),
            view_tx: parts.view_tx,
            identity_tx: parts.identity_tx,
            state_path: parts.state_path,
            state_dirty: false,
            seeds: parts.seeds,
            join_retry_interval: parts.join_retry_interval,
            state_write_interval: parts.state_write_interval,
            leaving: false,
        }
    }

    fn own(&self) -> NodeIdentity {
        *self.foca.identity()
    }

    /// Feeds the remembered members to foca without re-broadcasting them
    /// (the cluster knows them; our knowledge may be stale). Our own
    /// previous identities are skipped.
    pub(crate) fn restore(&mut self, members: Vec<Member<NodeIdentity>>) {
        let own = self.own();
        let members = members
            .into_iter()
            .filter(|m| m.id().node_id != own.node_id && m.id().gossip_addr != own.gossip_addr);
        let result = self.foca.apply_many(members, false, &mut self.runtime);
        self.after_call(&result, "restore");
    }

    /// Announces to the seeds and to the members we know (bounded).
    pub(crate) fn join(&mut self) {
        let own = self.own();
        let mut targets: Vec<NodeIdentity> = self
            .seeds
            .iter()
            .filter(|addr| **addr != own.gossip_addr)
            .map(|addr| NodeIdentity::placeholder(*addr))
            .collect();
        for m in self.foca.iter_membership_state() {
            if !targets.iter().any(|t| t.gossip_addr == m.id().gossip_addr) {
                targets.push(*m.id());
            }
        }
        targets.truncate(ANNOUNCE_TARGETS_MAX);
        for target in targets {
            let result = self.foca.announce(target, &mut self.runtime);
            self.after_call(&result, "announce");
        }
    }

    /// Writes the state file now (when one is configured).
    pub(crate) fn write_state(&mut self) -> Result<(), StateFileError> {
        let Some(path) = &self.state_path else {
            return Ok(());
        };
        let own = self.own();
        let members = self
            .foca
            .iter_membership_state()
            .filter(|m| m.id().node_id != own.node_id)
            .take(STATE_MEMBERS_MAX)
            .map(PersistedMember::from_member)
            .collect();
        let state = PersistedState { node_id: own.node_id, bump: own.bump, members };
        state_file::store(path, &state)?;
        self.state_dirty = false;
        Ok(())
    }

    fn write_state_counted(&mut self) {
        if let Err(e) = self.write_state() {
            bump(&self.metrics.state_write_failures);
            tracing::warn!(error = %e, "could not write the gossip state file");
        }
    }

    /// Drains the runtime after a call into foca, then refreshes the view.
    fn after_call(&mut self, result: &Result<(), foca::Error>, what: &'static str) {
        if let Err(e) = result {
            tracing::debug!(error = %e, what, "foca refused");
        }
        let own = self.own();
        if *self.identity_tx.borrow() != own {
            self.identity_tx.send_replace(own);
            // A new bump reaches the disk before any packet carrying it, so
            // a crash can never make the next boot reuse it.
            self.write_state_counted();
        }
        let now = Instant::now();
        while let Some((to, packet)) = self.runtime.to_send() {
            self.send(to.gossip_addr, &packet);
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timers.push(now, after, timer);
        }
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::Rejoin(id) => {
                    tracing::info!(
                        bump = id.bump,
                        "declared down by the cluster; rejoined under a new bump"
                    );
                }
                OwnedNotification::Defunct if self.leaving => {
                    tracing::debug!("left the cluster");
                }
                OwnedNotification::Defunct => {
                    tracing::warn!("declared down and cannot renew the identity");
                }
                _ => {}
            }
            self.state_dirty = true;
        }
        self.refresh_view();
    }

    fn refresh_view(&mut self) {
        let view = view_of(self.own().node_id, self.foca.iter_membership_state());
        let events = diff(&self.view, &view);
        if view != self.view {
            self.state_dirty = true;
            self.view_tx.send_replace(Arc::new(view.values().copied().collect()));
            self.view = view;
        }
        self.subscribers.publish(&events, &self.metrics);
    }

    fn send(&self, to: SocketAddr, payload: &[u8]) {
        let mut packet = payload.to_vec();
        if let Some(auth) = &self.auth {
            auth.seal(&mut packet);
        }
        debug_assert!(
            packet.len() <= GOSSIP_PACKET_BYTES_MAX,
            "foca's limit leaves room for the tag"
        );
        match self.transport.send_to(to, &packet) {
            Ok(()) => {
                bump(&self.metrics.packets_sent);
                add(&self.metrics.bytes_sent, packet.len());
            }
            Err(e) => {
                bump(&self.metrics.send_failures);
                tracing::trace!(error = %e, %to, "gossip packet not sent");
            }
        }
    }

    fn handle_packet(&mut self, payload: &[u8]) {
        let result = self.foca.handle_data(payload, &mut self.runtime);
        match &result {
            Ok(()) => {}
            Err(foca::Error::Decode(_) | foca::Error::MalformedPacket) => {
                bump(&self.metrics.decode_errors)
            }
            Err(foca::Error::DataTooBig) => bump(&self.metrics.dropped_size),
            Err(_) => bump(&self.metrics.protocol_errors),
        }
        self.after_call(&result, "handle_data");
    }

    fn fire_due_timers(&mut self) {
        while let Some(timer) = self.timers.pop_due(Instant::now()) {
            let result = self.foca.handle_timer(timer, &mut self.runtime);
            self.after_call(&result, "handle_timer");
        }
    }

    /// Handles a command; `true` when the loop must stop.
    fn handle_command(&mut self, command: Command) -> bool {
        match command {
            Command::Announce { addrs, reply } => {
                for addr in addrs.into_iter().take(ANNOUNCE_TARGETS_MAX) {
                    let result =
                        self.foca.announce(NodeIdentity::placeholder(addr), &mut self.runtime);
                    self.after_call(&result, "announce");
                }
                let _ = reply.send(());
                false
            }
            Command::UpdateMeta { meta, reply } => {
                let answer = match self.own().bumped() {
                    Some(next) => {
                        let next = NodeIdentity { meta, ..next };
                        let result = self.foca.change_identity(next, &mut self.runtime);
                        self.after_call(&result, "change_identity");
                        result.map(|()| next).map_err(|source| GossipError::Protocol { source })
                    }
                    None => Err(GossipError::InvalidConfig { reason: "bump exhausted" }),
                };
                let _ = reply.send(answer);
                false
            }
            Command::Leave { reply } => {
                self.leaving = true;
                let result = self.foca.leave_cluster(&mut self.runtime);
                // Draining hands the farewell packets to the transport now.
                self.after_call(&result, "leave_cluster");
                let answer = result
                    .map_err(|source| GossipError::Protocol { source })
                    .and_then(|()| self.write_state().map_err(GossipError::from));
                let _ = reply.send(answer);
                true
            }
            Command::Shutdown { reply } => {
                let _ = reply.send(self.write_state().map_err(GossipError::from));
                true
            }
        }
    }

    fn no_active_member(&self) -> bool {
        self.foca.num_members() == 0
    }

    /// The loop. Ends on leave, shutdown, or when the handle is dropped.
    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbox: mpsc::Receiver<Vec<u8>>,
        receiver: JoinHandle<()>,
    ) {
        let _receiver = AbortOnDrop(receiver);
        let mut write_tick = tokio::time::interval(self.state_write_interval);
        write_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut join_tick = tokio::time::interval(self.join_retry_interval);
        join_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        join_tick.reset(); // `join()` just ran
        loop {
            let deadline = self.timers.next_deadline();
            let input = tokio::select! {
                biased;
                () = sleep_until(deadline) => Input::TimerDue,
                command = commands.recv() => Input::Command(command),
                _ = write_tick.tick() => Input::WriteState,
                _ = join_tick.tick() => Input::JoinRetry,
                Some(packet) = inbox.recv() => Input::Packet(packet),
            };
            match input {
                Input::TimerDue => self.fire_due_timers(),
                Input::Packet(packet) => self.handle_packet(&packet),
                Input::Command(Some(command)) => {
                    if self.handle_command(command) {
                        return;
                    }
                }
                Input::Command(None) => {
                    // The handle is gone: stop, remembering what we knew.
                    self.write_state_counted();
                    return;
                }
                Input::WriteState => {
                    if self.state_dirty {
                        self.write_state_counted();
                    }
                }
                Input::JoinRetry => {
                    if self.no_active_member() {
                        self.join();
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Reads the transport: checks size and authentication, offers the payload
/// to the loop without waiting.
pub(crate) async fn receive_loop<T: Transport>(
    transport: Arc<T>,
    auth: Option<PacketAuth>,
    inbox: mpsc::Sender<Vec<u8>>,
    metrics: Arc<GossipMetrics>,
) {
    // One byte more than the limit, to tell an oversize datagram apart.
    let mut buf = vec![0u8; GOSSIP_PACKET_BYTES_MAX + 1];
    let mut auth_warned: Option<tokio::time::Instant> = None;
    loop {
        let (len, from) = match transport.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return,
            Err(e) => {
                bump(&metrics.recv_errors);
                tracing::debug!(error = %e, "gossip receive error");
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        bump(&metrics.packets_received);
        add(&metrics.bytes_received, len);
        if len > GOSSIP_PACKET_BYTES_MAX {
            bump(&metrics.dropped_size);
            continue;
        }
        let packet = &buf[..len];
        let payload = match &auth {
            Some(auth) => match auth.open(packet) {
                Some(payload) => payload,
                None => {
                    bump(&metrics.dropped_auth);
                    // Loud, since a node with another secret otherwise runs
                    // alone in silence; at most one line per period.
                    let now = tokio::time::Instant::now();
                    if auth_warned.is_none_or(|at| now - at >= AUTH_WARNING_PERIOD) {
                        auth_warned = Some(now);
                        tracing::warn!(
                            %from,
                            refused_so_far = metrics.dropped_auth.load(std::sync::atomic::Ordering::Relaxed),
                            "gossip packet failed authentication: check that every node has \
                             the same --cluster-secret"
                        );
                    }
                    continue;
                }
            },
            None => packet.to_vec(),
        };
        match inbox.try_send(payload) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => bump(&metrics.dropped_inbox_full),
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
