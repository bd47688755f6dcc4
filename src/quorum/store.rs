//! The quorum's log, vote and state machine, over calmkv's [`Store`] trait.
//!
//! The log, the vote, the committed and purged markers and the latest
//! snapshot live in their own store (`<data dir>/quorum` with the sled engine
//! in `Durability::Sync`, so an entry or a vote is fsynced before openraft is
//! told it is stored). The state machine — per coordinated key, the joined
//! state of everything the quorum admitted — is kept in memory and rebuilt on
//! start from the latest snapshot plus the committed log after it.
//!
//! Store calls block (a sync write waits for the disk); the quorum's traffic
//! is the unsafe-direction operations only, so they run inline on the Raft
//! task rather than hopping to the blocking pool.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes);
// the helpers here return it as they do.
#![allow(clippy::result_large_err)]

use super::idempotency::{fingerprint_of, IdempotencyKey, IdempotencyWindow, Remembered, Seen};
use super::types::{Command, Outcome, Proposal, TypeConfig};
use crate::envelope::Envelope;
use crate::invariants::{as_creation, Invariants, OpKind, Route};
use crate::store::{Batch, Store, StoreError};
use crate::{Limits, NodeError};
use calmkv_crdts::{Crdt, NodeId};
use openraft::storage::{LogState, RaftLogReader, RaftSnapshotBuilder, RaftStorage, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

/// The actor the quorum's state machine mints dots as: every voter applies a
/// committed entry as this same actor, so an admitted decrement has one dot
/// and counts once, however many voters apply it.
pub const QUORUM_ACTOR: NodeId = NodeId(u64::MAX);

/// Most log entries read in one store page.
const LOG_PAGE: usize = 1024;

const LOG_PREFIX: &[u8] = b"l/";
const VOTE: &[u8] = b"m/vote";
const COMMITTED: &[u8] = b"m/committed";
const PURGED: &[u8] = b"m/purged";
const SNAPSHOT: &[u8] = b"m/snapshot";

type Error = StorageError<u64>;

/// Called on every voter after an entry is admitted: the key and its new
/// joined state, for the local node to merge.
pub type OnCommit = Arc<dyn Fn(&str, &Envelope) + Send + Sync>;

/// The state machine: what the quorum admitted, per key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StateMachine {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    keys: BTreeMap<String, Envelope>,
    /// Recent idempotency keys and their first outcomes (absent from a
    /// snapshot written before keys existed: empty).
    #[serde(default)]
    idempotency: IdempotencyWindow,
}

impl StateMachine {
    /// The joined state of `key` as the quorum admitted it.
    pub fn key(&self, key: &str) -> Option<&Envelope> {
        self.keys.get(key)
    }

    /// The window of recent idempotency keys.
    pub fn idempotency(&self) -> &IdempotencyWindow {
        &self.idempotency
    }

    /// Applies one command: a retry of a keyed operation within the window is
    /// answered with its first outcome and changes nothing; anything else is
    /// [`StateMachine::decide`]d, and a keyed outcome remembered.
    pub fn apply_command(&mut self, command: &Command, limits: &Limits) -> Outcome {
        let Some(raw) = &command.idempotency_key else {
            return self.decide(&command.proposal, limits);
        };
        let id = match IdempotencyKey::new(raw.as_str()) {
            Ok(id) => id,
            Err(error) => return Outcome::refused(&error),
        };
        let proposal = &command.proposal;
        let fingerprint = fingerprint_of(proposal);
        match self.idempotency.check(&id, &proposal.key, fingerprint) {
            Seen::Repeat(Remembered::Committed) => Outcome::Committed {
                key: proposal.key.clone(),
                state: self.keys.get(&proposal.key).cloned().unwrap_or_default(),
            },
            Seen::Repeat(Remembered::Refused { code, message }) => {
                Outcome::Refused { code, message }
            }
            Seen::Reused(reason) => Outcome::refused(&NodeError::IdempotencyKeyReused {
                key: proposal.key.clone(),
                reason,
            }),
            Seen::New => {
                let outcome = self.decide(proposal, limits);
                if let Some(remembered) = Remembered::of(&outcome) {
                    self.idempotency.remember(&id, &proposal.key, fingerprint, remembered);
                }
                outcome
            }
        }
    }

    /// Decides one proposal: joins the proposer's observation with what the
    /// quorum admitted before, runs the operation as [`QUORUM_ACTOR`], and
    /// admits it only if the declared rule holds on the result. Deterministic:
    /// a function of the log alone. Total: whatever the entry holds, the
    /// answer is an outcome, never a panic — an entry that cannot apply is
    /// refused (and changes nothing), so no voter fails on it, now or when it
    /// replays its log after a restart.
    pub fn decide(&mut self, proposal: &Proposal, limits: &Limits) -> Outcome {
        let joined = self.keys.get(&proposal.key);
        // The last guard: a decision that panics (a bug on some input no test
        // found) is a refusal, not a dead quorum. `joined` is only read.
        let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decision(joined, proposal, limits)
        }));
        match decided {
            Ok(Ok(after)) => {
                self.keys.insert(proposal.key.clone(), after.clone());
                Outcome::Committed { key: proposal.key.clone(), state: after }
            }
            Ok(Err(error)) => Outcome::refused(&error),
            Err(_) => Outcome::refused(&NodeError::BadRequest {
                reason: "the quorum cannot apply this operation to the key's state".into(),
            }),
        }
    }
}

/// Highest dot of [`QUORUM_ACTOR`] a state or a context may claim before the
/// quorum refuses to act on it. The quorum mints a few dots per admitted entry
/// (one per added member at most), so its real count stays far below 2^62;
/// a claim above comes from a forged context, and minting past it could
/// exhaust the actor's dots.
pub const QUORUM_ACTOR_DOTS_MAX: u64 = 1 << 62;

/// The state a proposal leaves, or why it is refused.
fn decision(
    joined: Option<&Envelope>,
    proposal: &Proposal,
    limits: &Limits,
) -> Result<Envelope, NodeError> {
    let op = proposal.op(limits)?;
    // The proposer's state came over the network: the same rules as any
    // remote state, with members and siblings unbounded (the voter does not
    // know how many replicas wrote them concurrently). Deterministic, so every
    // voter refuses alike.
    crate::replication::admission::check(&proposal.observed, limits, usize::MAX).map_err(
        |refused| NodeError::LimitExceeded {
            key: proposal.key.clone(),
            what: format!("the proposer's state of the key is refused: {refused}"),
        },
    )?;
    let before = joined.cloned().unwrap_or_default().merged(&proposal.observed);
    let claimed = match &op.action {
        crate::Action::Put { context: Some(seen), .. }
        | crate::Action::Delete { context: Some(seen) } => seen.highest(QUORUM_ACTOR),
        _ => 0,
    };
    let highest = before.value.context().highest(QUORUM_ACTOR).max(claimed);
    if highest > QUORUM_ACTOR_DOTS_MAX {
        return Err(NodeError::LimitExceeded {
            key: proposal.key.clone(),
            what: format!(
                "the key's causal context claims dot {highest} of the quorum's own actor, which the quorum never minted (at most {QUORUM_ACTOR_DOTS_MAX}); the quorum refuses to act on it"
            ),
        });
    }
    let mut after = before.clone();
    let kinds = OpKind::of(&op, proposal.declaration.rule.key_type()).unwrap_or_default();
    let route = Route::Quorum { declaration: &proposal.declaration, kinds: kinds.clone() };
    let op = as_creation(&op, &route);
    crate::node::execute(&mut after, &op, QUORUM_ACTOR, proposal.now, limits)?;
    Invariants::admit(&proposal.declaration, &kinds, &proposal.key, &before, &after)?;
    Ok(after)
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

struct Inner {
    store: Arc<dyn Store>,
    sm: Mutex<StateMachine>,
    limits: Limits,
    on_commit: Option<OnCommit>,
}

/// The quorum's storage; cheap to clone (openraft holds a reader and a
/// snapshot builder beside it).
#[derive(Clone)]
pub struct QuorumStore {
    inner: Arc<Inner>,
}

fn io_read(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    StorageIOError::read(&e).into()
}

fn io_write(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    StorageIOError::write(&e).into()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(value).map_err(io_write)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(io_read)
}

fn log_key(index: u64) -> Vec<u8> {
    [LOG_PREFIX, &index.to_be_bytes()].concat()
}

impl QuorumStore {
    /// Opens the quorum's storage over `store`, restoring the state machine
    /// from the latest snapshot; `on_commit` hears every admitted entry.
    pub fn open(
        store: Arc<dyn Store>,
        limits: Limits,
        on_commit: Option<OnCommit>,
    ) -> Result<QuorumStore, StoreError> {
        let sm = match store.get(SNAPSHOT)? {
            Some(bytes) => {
                let stored: StoredSnapshot = rmp_serde::from_slice(&bytes)
                    .map_err(|e| StoreError::Engine { source: Box::new(e) })?;
                rmp_serde::from_slice(&stored.data)
                    .map_err(|e| StoreError::Engine { source: Box::new(e) })?
            }
            None => StateMachine::default(),
        };
        Ok(QuorumStore { inner: Arc::new(Inner { store, sm: Mutex::new(sm), limits, on_commit }) })
    }

    /// A copy of the state machine.
    pub fn state_machine(&self) -> StateMachine {
        self.sm().clone()
    }

    fn sm(&self) -> std::sync::MutexGuard<'_, StateMachine> {
        self.inner.sm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, Error> {
        match self.inner.store.get(key).map_err(io_read)? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), Error> {
        self.inner.store.apply(Batch::new().put(key.to_vec(), encode(value)?)).map_err(io_write)
    }

    /// Log entries with index in `[start, end)`.
    fn entries(&self, start: u64, end: u64) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let mut out = Vec::new();
        let mut after = start.checked_sub(1).map(log_key);
        while (out.len() as u64) < end.saturating_sub(start) {
            let page = self
                .inner
                .store
                .scan_prefix(LOG_PREFIX, after.as_deref(), LOG_PAGE)
                .map_err(io_read)?;
            let full = page.len() == LOG_PAGE;
            for (key, value) in &page {
                let index = u64::from_be_bytes(
                    key[LOG_PREFIX.len()..]
                        .try_into()
                        .map_err(|_| io_read(std::io::Error::other("malformed log key")))?,
                );
                if index >= end {
                    return Ok(out);
                }
                out.push(decode(value)?);
            }
            match page.last() {
                Some((last, _)) if full => after = Some(last.clone()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// The id of the log entry at `index`, if the log still holds it.
    pub fn log_id_at(&self, index: u64) -> Option<LogId<u64>> {
        let bytes = self.inner.store.get(&log_key(index)).ok()??;
        decode::<Entry<TypeConfig>>(&bytes).ok().map(|entry| entry.log_id)
    }

    /// Deletes the log entries with index in `[from, to]`.
    fn delete_range(&self, from: u64, to: u64) -> Result<(), Error> {
        let keys: Vec<Vec<u8>> = self
            .entries(from, to.saturating_add(1))?
            .iter()
            .map(|e| log_key(e.log_id.index))
            .collect();
        let batch = keys.into_iter().fold(Batch::new(), |batch, key| batch.delete(key));
        self.inner.store.apply(batch).map_err(io_write)
    }
}

impl RaftLogReader<TypeConfig> for QuorumStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        self.entries(start, end)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for QuorumStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let sm = self.state_machine();
        let data = encode(&sm)?;
        let snapshot_id = match &sm.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.leader_id.node_id, id.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: sm.last_applied,
            last_membership: sm.membership,
            snapshot_id,
        };
        self.put(SNAPSHOT, &StoredSnapshot { meta: meta.clone(), data: data.clone() })?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStorage<TypeConfig> for QuorumStore {
    type LogReader = QuorumStore;
    type SnapshotBuilder = QuorumStore;

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), Error> {
        self.put(VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, Error> {
        self.get(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), Error> {
        self.put(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, Error> {
        Ok(self.get::<Option<LogId<u64>>>(COMMITTED)?.flatten())
    }

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        let purged: Option<LogId<u64>> = self.get(PURGED)?;
        let last = self
            .inner
            .store
            .scan_prefix(LOG_PREFIX, None, usize::MAX)
            .map_err(io_read)?
            .last()
            .map(|(_, v)| decode::<Entry<TypeConfig>>(v))
            .transpose()?
            .map(|e| e.log_id);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last.or(purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn append_to_log<I>(&mut self, entries: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
    {
        let mut batch = Batch::new();
        for entry in entries {
            batch = batch.put(log_key(entry.log_id.index), encode(&entry)?);
        }
        self.inner.store.apply(batch).map_err(io_write)
    }

    async fn delete_conflict_logs_since(&mut self, log_id: LogId<u64>) -> Result<(), Error> {
        self.delete_range(log_id.index, u64::MAX - 1)
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<u64>) -> Result<(), Error> {
        self.put(PURGED, &log_id)?;
        self.delete_range(0, log_id.index)
    }

    async fn last_applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), Error> {
        let sm = self.sm();
        Ok((sm.last_applied, sm.membership.clone()))
    }

    async fn apply_to_state_machine(
        &mut self,
        entries: &[Entry<TypeConfig>],
    ) -> Result<Vec<Outcome>, Error> {
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut committed = Vec::new();
        {
            let mut sm = self.sm();
            for entry in entries {
                sm.last_applied = Some(entry.log_id);
                let outcome = match &entry.payload {
                    EntryPayload::Blank => Outcome::Nothing,
                    EntryPayload::Membership(membership) => {
                        sm.membership =
                            StoredMembership::new(Some(entry.log_id), membership.clone());
                        Outcome::Nothing
                    }
                    EntryPayload::Normal(command) => sm.apply_command(command, &self.inner.limits),
                };
                if let Outcome::Committed { key, state } = &outcome {
                    committed.push((key.clone(), state.clone()));
                }
                outcomes.push(outcome);
            }
        }
        if let Some(on_commit) = &self.inner.on_commit {
            for (key, state) in &committed {
                on_commit(key, state);
            }
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let data = snapshot.into_inner();
        let mut sm: StateMachine = decode(&data)?;
        sm.last_applied = meta.last_log_id;
        sm.membership = meta.last_membership.clone();
        self.put(SNAPSHOT, &StoredSnapshot { meta: meta.clone(), data })?;
        let installed: Vec<(String, Envelope)> =
            sm.keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        *self.sm() = sm;
        if let Some(on_commit) = &self.inner.on_commit {
            for (key, state) in &installed {
                on_commit(key, state);
            }
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        Ok(self.get::<StoredSnapshot>(SNAPSHOT)?.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

/// Maps a store error for callers outside openraft.
pub fn store_error(error: Error) -> NodeError {
    NodeError::CoordinationUnavailable { key: String::new(), reason: error.to_string() }
}

#[cfg(test)]
mod tests {
    use super::super::idempotency::{IdempotencyKey, IDEMPOTENCY_WINDOW_ENTRIES};
    use super::super::types::{Command, Outcome, Proposal, WireAction};
    use super::*;
    use crate::op::{CounterOp, CrdtOp};

    const BANK: &str = "[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n";

    fn invariants() -> Invariants {
        Invariants::parse(BANK).unwrap()
    }

    /// A proposal of `op` on `key` by a node that observed `observed`.
    fn proposal(key: &str, op: CounterOp, observed: Envelope) -> Proposal {
        let invariants = invariants();
        let action = crate::op::Action::Crdt(CrdtOp::Counter(op));
        let op = crate::Op { key: crate::Key::new(key, &Limits::default()).unwrap(), action };
        let declaration = match invariants.route(&op).unwrap() {
            Route::Quorum { declaration, .. } => declaration.clone(),
            Route::Local => panic!("{op:?} is local"),
        };
        Proposal {
            key: key.to_string(),
            action: WireAction::from(&op.action),
            observed,
            declaration,
            invariants_hash: invariants.hash(),
            now: Default::default(),
        }
    }

    /// A state holding `n` increments by some node.
    fn funded(key: &str, n: u64) -> Envelope {
        let node = crate::Config::in_memory().open_node().unwrap();
        let action = crate::op::Action::Crdt(CrdtOp::Counter(CounterOp::Incr(n)));
        let op = crate::Op { key: crate::Key::new(key, &Limits::default()).unwrap(), action };
        node.apply(&op).unwrap().state
    }

    fn keyed(proposal: Proposal, key: &str) -> Command {
        Command { proposal, idempotency_key: Some(key.to_string()) }
    }

    fn value(sm: &StateMachine, key: &str) -> i128 {
        sm.key(key).map(|s| s.value.counter().value()).unwrap_or(0)
    }

    #[test]
    fn a_repeated_idempotency_key_is_answered_with_the_first_outcome_and_applied_once() {
        let limits = Limits::default();
        let mut sm = StateMachine::default();
        let observed = funded("account/a", 10);
        let first = keyed(proposal("account/a", CounterOp::Decr(3), observed.clone()), "k1");
        assert!(matches!(sm.apply_command(&first, &limits), Outcome::Committed { .. }));
        assert_eq!(value(&sm, "account/a"), 7);
        // A retry, even from a node with another observation: the same answer.
        let retry = keyed(proposal("account/a", CounterOp::Decr(3), Envelope::default()), "k1");
        let Outcome::Committed { state, .. } = sm.apply_command(&retry, &limits) else {
            panic!("a retry of a commit is a commit")
        };
        assert_eq!(state.value.counter().value(), 7);
        assert_eq!(value(&sm, "account/a"), 7, "applied once");

        // A refusal is remembered as a refusal, even once the funds would allow it.
        let refused = keyed(proposal("account/a", CounterOp::Decr(8), observed.clone()), "k2");
        let first_answer = sm.apply_command(&refused, &limits);
        assert!(
            matches!(&first_answer, Outcome::Refused { code, .. } if code == "invariant_violation")
        );
        let richer = observed.merged(&funded("account/a", 100));
        let again = keyed(proposal("account/a", CounterOp::Decr(8), richer), "k2");
        assert_eq!(sm.apply_command(&again, &limits), first_answer);
        assert_eq!(value(&sm, "account/a"), 7);

        // The same key for another operation is refused, and changes nothing.
        let other = keyed(proposal("account/a", CounterOp::Decr(1), observed), "k1");
        let answer = sm.apply_command(&other, &limits);
        assert!(
            matches!(&answer, Outcome::Refused { code, .. } if code == "idempotency_key_reused"),
            "{answer:?}"
        );
        assert_eq!(value(&sm, "account/a"), 7);
        // A malformed key in an entry is a typed refusal too.
        let bad = keyed(proposal("account/a", CounterOp::Decr(1), Envelope::default()), "a b");
        assert!(
            matches!(sm.apply_command(&bad, &limits), Outcome::Refused { code, .. } if code == "bad_request")
        );
    }

    #[test]
    fn the_window_survives_a_snapshot() {
        let limits = Limits::default();
        let mut sm = StateMachine::default();
        let command = keyed(proposal("account/s", CounterOp::Decr(2), funded("account/s", 5)), "s");
        sm.apply_command(&command, &limits);
        let bytes = rmp_serde::to_vec_named(&sm).unwrap();
        let mut restored: StateMachine = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(restored.idempotency(), sm.idempotency());
        restored.apply_command(&command, &limits);
        assert_eq!(value(&restored, "account/s"), 3, "the restored window still knows the key");
    }

    #[test]
    fn the_window_is_bounded_and_forgets_the_oldest_key_first() {
        let limits = Limits::default();
        let mut sm = StateMachine::default();
        let observed = funded("account/w", u64::from(u32::MAX));
        let decr = |id: usize| {
            keyed(proposal("account/w", CounterOp::Decr(1), observed.clone()), &format!("w{id}"))
        };
        for id in 0..=IDEMPOTENCY_WINDOW_ENTRIES {
            assert!(matches!(sm.apply_command(&decr(id), &limits), Outcome::Committed { .. }));
        }
        assert_eq!(sm.idempotency().len(), IDEMPOTENCY_WINDOW_ENTRIES);
        let applied = value(&sm, "account/w");
        // The newest key is remembered: a retry changes nothing.
        sm.apply_command(&decr(IDEMPOTENCY_WINDOW_ENTRIES), &limits);
        assert_eq!(value(&sm, "account/w"), applied);
        // The oldest was forgotten: its retry applies again.
        sm.apply_command(&decr(0), &limits);
        assert_eq!(value(&sm, "account/w"), applied - 1);
        assert_eq!(sm.idempotency().len(), IDEMPOTENCY_WINDOW_ENTRIES);
        assert!(IdempotencyKey::new("w0").is_ok());
    }

    #[test]
    fn an_entry_written_as_a_bare_proposal_decodes_as_a_command_without_a_key() {
        let bare = proposal("account/b", CounterOp::Decr(1), funded("account/b", 1));
        let bytes = rmp_serde::to_vec_named(&bare).unwrap();
        let command: Command = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(command, Command { proposal: bare.clone(), idempotency_key: None });
        let keyed = keyed(bare, "k");
        let round: Command =
            rmp_serde::from_slice(&rmp_serde::to_vec_named(&keyed).unwrap()).unwrap();
        assert_eq!(round, keyed);
    }
}

#[cfg(test)]
mod totality {
    use super::super::types::{Proposal, WireAction};
    use super::*;
    use crate::op::{Action, CounterOp, CrdtOp};
    use calmkv_crdts::{CausalContext, Dot};

    const BANK: &str = "[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n\n[[invariant]]\nkeys = \"capped/*\"\ntype = \"counter\"\nmax = 10\n";

    fn proposal(key: &str, action: Action, observed: Envelope) -> Proposal {
        let invariants = Invariants::parse(BANK).unwrap();
        let op = crate::Op { key: crate::Key::new(key, &Limits::default()).unwrap(), action };
        let declaration = match invariants.route(&op).unwrap() {
            Route::Quorum { declaration, .. } => declaration.clone(),
            Route::Local => invariants.declarations().first().unwrap().clone(),
        };
        Proposal {
            key: key.to_string(),
            action: WireAction::from(&op.action),
            observed,
            declaration,
            invariants_hash: invariants.hash(),
            now: Default::default(),
        }
    }

    fn counter(op: CounterOp) -> Action {
        Action::Crdt(CrdtOp::Counter(op))
    }

    /// A state of `n` increments, then a delete with `context` as a forged
    /// peer state would carry it (a node restricts a client's context to what
    /// it has seen, so only a forged state holds such a claim).
    fn deleted_with(key: &str, n: u64, context: CausalContext) -> Envelope {
        let node = crate::Config::in_memory().open_node().unwrap();
        let key = crate::Key::new(key, &Limits::default()).unwrap();
        let action = counter(CounterOp::Incr(n));
        let mut state = node.apply(&crate::Op { key, action }).unwrap().state;
        state.value.delete(&context);
        state
    }

    fn forged() -> CausalContext {
        CausalContext::from_dots([Dot { node: QUORUM_ACTOR, counter: u64::MAX }])
    }

    #[test]
    fn a_context_naming_the_quorum_actor_at_its_last_dot_is_refused_without_a_panic() {
        let limits = Limits::default();
        let mut sm = StateMachine::default();
        let poisoned = deleted_with("account/alice", 5, forged());
        assert_eq!(poisoned.value.context().highest(QUORUM_ACTOR), u64::MAX);
        for action in [counter(CounterOp::Decr(1)), counter(CounterOp::Incr(1))] {
            let outcome = sm.decide(&proposal("account/alice", action, poisoned.clone()), &limits);
            assert!(
                matches!(&outcome, Outcome::Refused { code, .. } if code == "limit_exceeded"),
                "{outcome:?}"
            );
        }
        // The forged context in the operation itself is refused the same way.
        let delete = Action::Delete { context: Some(forged()) };
        let outcome = sm.decide(&proposal("account/alice", delete, Envelope::default()), &limits);
        assert!(matches!(&outcome, Outcome::Refused { code, .. } if code == "limit_exceeded"));
        assert!(sm.key("account/alice").is_none(), "a refusal changes nothing");

        // Another key is decided as ever.
        let funded = deleted_with("account/bob", 0, CausalContext::new());
        let node = crate::Config::in_memory().open_node().unwrap();
        let key = crate::Key::new("account/bob", &limits).unwrap();
        let funded = funded.merged(
            &node.apply(&crate::Op { key, action: counter(CounterOp::Incr(3)) }).unwrap().state,
        );
        let outcome =
            sm.decide(&proposal("account/bob", counter(CounterOp::Decr(2)), funded), &limits);
        assert!(matches!(outcome, Outcome::Committed { .. }), "{outcome:?}");
    }

    #[test]
    fn counters_at_their_bounds_are_refused_without_a_panic() {
        let limits = Limits::default();
        let mut sm = StateMachine::default();
        // The quorum's own share driven to u64::MAX, then once more.
        let max = u64::MAX;
        let first = sm.decide(
            &proposal("account/big", counter(CounterOp::Decr(max)), Envelope::default()),
            &limits,
        );
        assert!(
            matches!(&first, Outcome::Refused { code, .. } if code == "invariant_violation"),
            "{first:?}"
        );
        let node = crate::Config::in_memory().open_node().unwrap();
        let key = crate::Key::new("account/big", &limits).unwrap();
        let rich =
            node.apply(&crate::Op { key, action: counter(CounterOp::Incr(max)) }).unwrap().state;
        let once = sm
            .decide(&proposal("account/big", counter(CounterOp::Decr(max)), rich.clone()), &limits);
        assert!(matches!(once, Outcome::Committed { .. }), "{once:?}");
        let twice =
            sm.decide(&proposal("account/big", counter(CounterOp::Decr(max)), rich), &limits);
        assert!(matches!(twice, Outcome::Refused { .. }), "{twice:?}");
        // An increment under a max: the quorum's share overflows, refused.
        for _ in 0..2 {
            let outcome = sm.decide(
                &proposal("capped/c", counter(CounterOp::Incr(max)), Envelope::default()),
                &limits,
            );
            assert!(matches!(outcome, Outcome::Refused { .. }), "{outcome:?}");
        }
        let small = sm.decide(
            &proposal("capped/c", counter(CounterOp::Incr(10)), Envelope::default()),
            &limits,
        );
        assert!(matches!(small, Outcome::Committed { .. }), "{small:?}");
    }
}
