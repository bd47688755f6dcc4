//! The node: applies operations to keys in the store and reads them back.
//!
//! Every write is a read-merge-write of one key's [`Envelope`] under that key's
//! lock (locks are striped by key hash), so concurrent writes to a key never
//! lose each other's effects. The operation runs on a copy of the envelope;
//! only if every step of it succeeds is the write stored, in one store batch,
//! so a refused operation leaves the store untouched. The batch holds the
//! write's delta, appended to the key's log, or the merged state, folding the
//! log (`node/delta_log.rs`), so a write costs what it changes. Both faces
//! (HTTP and embedded) call [`Node::apply`] (or its async twin
//! [`Node::apply_async`]), [`Node::read`] and [`Node::scan`].
//!
//! The key's lock covers the read-merge-write and the store's apply, not the
//! wait for durability: the write takes a [`CommitTicket`] from the store and
//! waits on it after the lock is released, so writers of one key do not queue
//! behind each other's fsync, and concurrent writers share one (group commit).
//! A later writer of the key sees the earlier one's state before it is
//! durable, and its own ticket covers it: it is acknowledged only once both
//! are durable. A write that changes nothing waits on the store's barrier for
//! the same reason.

use crate::envelope::{Envelope, KeyType};
use crate::error::NodeError;
use crate::invariants::{as_creation, Invariants, Route};
use crate::op::{Action, CounterOp, CrdtOp, FlagOp, Key, Op};
use crate::read::ReadResult;
use crate::replication::digest::{bucket_of, Digest};
use crate::store::{CommitTicket, Store};
use crate::Limits;
use calmkv_crdts::{CausalContext, Crdt, CrdtError, HybridClock, NodeId, OrMap, Value};
use delta_log::{DATA_PREFIX, HASH_PREFIX};
use serde_bytes::ByteBuf;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

mod actor;
mod delta_log;

pub use delta_log::LOG_SHARE_OF_BASE_INV;
/// Index entries read per store call while rebuilding the digest on open.
const DIGEST_REBUILD_PAGE: usize = 4096;
/// Number of key-lock stripes: enough that unrelated keys rarely share one.
const KEY_LOCK_STRIPES: usize = 1024;
/// A scan visits at most this many stored keys per key returned, so a prefix
/// full of deleted keys costs a bounded amount per page.
const SCAN_VISITS_PER_KEY_MAX: usize = 8;

/// The outcome of an applied write.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The key's state after the write.
    pub state: Envelope,
    /// Just the write's effect: merged into any replica of the key, it applies the
    /// write there.
    pub delta: Envelope,
    /// Whether a declared invariant made the write coordinated (admitted by the
    /// quorum, or by a node that is the only replica) rather than local.
    pub coordinated: bool,
}

impl Applied {
    /// The context to pass to a later write so that it supersedes this one.
    pub fn context(&self) -> &CausalContext {
        self.state.value.context()
    }
}

/// A write up to the store's apply: [`Node::apply_deferred`] or
/// [`Node::apply_alone_deferred`].
type ApplyDeferred = fn(&Node, &Op) -> Result<(Applied, CommitTicket), NodeError>;

/// One page of a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    /// Live keys in order, each with the types it holds.
    pub keys: Vec<(String, Vec<KeyType>)>,
    /// Where the next page starts (pass as `after`); `None` when the scan is done.
    pub cursor: Option<String>,
}

/// Where a node reads wall-clock time: milliseconds since the Unix epoch.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system's wall clock.
pub fn system_clock() -> WallClock {
    Arc::new(|| {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        u64::try_from(ms).unwrap_or(u64::MAX)
    })
}

/// A single calmkv node over a store.
pub struct Node {
    id: NodeId,
    store: Arc<dyn Store>,
    limits: Limits,
    key_locks: Box<[Mutex<()>]>,
    lock_hasher: std::collections::hash_map::RandomState,
    clock: Mutex<HybridClock>,
    wall_clock: WallClock,
    digest: Digest,
    /// Bytes of every row the node keeps for its keys (bases, log rows, index
    /// entries; keys and values), moved by each write under the key's lock.
    live_bytes: AtomicU64,
    invariants: Arc<Invariants>,
    /// The CRDT actor this node mints dots as (`actor.rs`): its id while it
    /// has only ever stopped cleanly, a new actor after a crash.
    actor: NodeId,
    /// Whether the store's actor row does not say this actor is running (it
    /// stopped cleanly, or the open could not record it): the next write that
    /// mints a dot records it running first.
    marked_clean: AtomicBool,
}

impl Node {
    /// A node with identity `id` over `store`; rebuilds the digest of the key space
    /// and the live-bytes count from the store's index (one pass over the index,
    /// not over the data; a key last written by a format-1 build costs one `get`
    /// of its base as well, until it is written again).
    pub fn open(id: NodeId, store: Arc<dyn Store>, limits: Limits) -> Result<Node, NodeError> {
        let key_locks = (0..KEY_LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        let digest = Digest::default();
        let mut live_bytes = 0u64;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let rows = store.scan_prefix(HASH_PREFIX, after.as_deref(), DIGEST_REBUILD_PAGE)?;
            for (index_key, value) in &rows {
                let entry = delta_log::parse_index_entry(index_key, value)?;
                digest.replace(entry.bucket, 0, entry.hash);
                live_bytes += match entry.row_bytes {
                    Some(bytes) => bytes,
                    None => delta_log::row_bytes_v1(&*store, index_key)?,
                };
            }
            match rows.last() {
                Some((last, _)) if rows.len() == DIGEST_REBUILD_PAGE => after = Some(last.clone()),
                _ => break,
            }
        }
        let (actor, recorded) = actor::choose(id, &*store, live_bytes > 0)?;
        Ok(Node {
            actor,
            marked_clean: AtomicBool::new(!recorded),
            id,
            store,
            limits,
            key_locks,
            lock_hasher: Default::default(),
            clock: Mutex::new(HybridClock::new()),
            wall_clock: system_clock(),
            digest,
            live_bytes: AtomicU64::new(live_bytes),
            invariants: Arc::new(Invariants::none()),
        })
    }

    /// Bytes of every row this node keeps for its keys — each key's base, its
    /// log rows and its digest index entry, keys and values — exact after a
    /// reopen. The on-disk size is the engine's (`StoreStats::size_bytes`).
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::Relaxed)
    }

    /// This node's identity.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The bounds this node enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The store under the node.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Applies a write. On success the new state is stored with the store's
    /// durability. On a refusal (bad input, type, limit, precondition) nothing
    /// changed; on a storage failure the write may or may not survive (a flush
    /// failed after the batch was handed over), and the store refuses every
    /// later write until restart, which also rebuilds the digest.
    pub fn apply(&self, op: &Op) -> Result<Applied, NodeError> {
        let (applied, ticket) = self.apply_deferred(op)?;
        ticket.wait()?;
        Ok(applied)
    }

    /// [`Node::apply`] up to the store's apply: the write is visible to reads,
    /// and may be acknowledged once the ticket is waited on.
    pub fn apply_deferred(&self, op: &Op) -> Result<(Applied, CommitTicket), NodeError> {
        self.apply_admitted_deferred(op, |_, _| Ok(()))
    }

    /// [`Node::apply`] for async callers. On a store that
    /// [serves inline](Store::serves_inline), the write runs on the caller's
    /// thread (microseconds) and the wait for durability is a future resolved
    /// by the store's committer thread; otherwise the whole apply runs on the
    /// blocking pool.
    pub async fn apply_async(self: &Arc<Node>, op: Op) -> Result<Applied, NodeError> {
        self.run_async(op, Node::apply_deferred).await
    }

    /// [`Node::apply_alone`] for async callers, as [`Node::apply_async`].
    pub async fn apply_alone_async(self: &Arc<Node>, op: Op) -> Result<Applied, NodeError> {
        self.run_async(op, Node::apply_alone_deferred).await
    }

    async fn run_async(
        self: &Arc<Node>,
        op: Op,
        apply: ApplyDeferred,
    ) -> Result<Applied, NodeError> {
        if self.store.serves_inline() {
            let (applied, ticket) = apply(self, &op)?;
            ticket.wait_async().await?;
            return Ok(applied);
        }
        let node = self.clone();
        let work = move || {
            let (applied, ticket) = apply(&node, &op)?;
            ticket.wait()?;
            Ok(applied)
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    /// [`Node::envelope`] for async callers: on the caller's thread when the
    /// store [serves inline](Store::serves_inline), else on the blocking pool.
    pub async fn envelope_async(self: &Arc<Node>, key: &Key) -> Result<Envelope, NodeError> {
        if self.store.serves_inline() {
            return self.envelope(key);
        }
        let (node, key) = (self.clone(), key.clone());
        match tokio::task::spawn_blocking(move || node.envelope(&key)).await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    /// Applies a write on a node that is the only replica of its keys (the
    /// embedded `Db`, a server without peers): an operation the declared
    /// invariants route to the quorum is admitted here, exactly, since no other
    /// replica can write concurrently. On a unique key a write without a
    /// context is a creation (insert-if-absent).
    pub fn apply_alone(&self, op: &Op) -> Result<Applied, NodeError> {
        let (applied, ticket) = self.apply_alone_deferred(op)?;
        ticket.wait()?;
        Ok(applied)
    }

    /// [`Node::apply_alone`] up to the store's apply, as [`Node::apply_deferred`].
    pub fn apply_alone_deferred(&self, op: &Op) -> Result<(Applied, CommitTicket), NodeError> {
        let invariants = self.invariants.clone();
        let route = invariants.route(op)?;
        match &route {
            Route::Local => self.apply_deferred(op),
            Route::Quorum { declaration, kinds } => {
                let op = as_creation(op, &route);
                let (applied, ticket) = self.apply_admitted_deferred(&op, |before, after| {
                    Invariants::admit(declaration, kinds, op.key.as_str(), before, after)
                })?;
                Ok((Applied { coordinated: true, ..applied }, ticket))
            }
        }
    }

    /// The invariants this node enforces.
    pub fn invariants(&self) -> &Arc<Invariants> {
        &self.invariants
    }

    /// The node with `invariants` to enforce.
    pub fn with_invariants(mut self, invariants: Arc<Invariants>) -> Node {
        self.invariants = invariants;
        self
    }

    /// The same node reading wall-clock time from `clock` instead of the
    /// system's: simulations give each node a clock they skew and jump. The
    /// hybrid clock over it still never goes back, so a node's stamps stay
    /// ordered whatever the wall clock does.
    pub fn with_wall_clock(mut self, clock: WallClock) -> Node {
        self.wall_clock = clock;
        self
    }

    /// Applies a write only if `admit` accepts the key's state before and after
    /// it; a refusal leaves the key untouched. The check runs under the key's lock,
    /// so no other local write slips in between. A single node that is the
    /// only replica of its keys (the embedded `Db`) checks invariants this way.
    pub fn apply_admitted(
        &self,
        op: &Op,
        admit: impl FnOnce(&Envelope, &Envelope) -> Result<(), NodeError>,
    ) -> Result<Applied, NodeError> {
        let (applied, ticket) = self.apply_admitted_deferred(op, admit)?;
        ticket.wait()?;
        Ok(applied)
    }

    /// [`Node::apply_admitted`] up to the store's apply, as
    /// [`Node::apply_deferred`]: the key's lock is released before the ticket
    /// is waited on.
    fn apply_admitted_deferred(
        &self,
        op: &Op,
        admit: impl FnOnce(&Envelope, &Envelope) -> Result<(), NodeError>,
    ) -> Result<(Applied, CommitTicket), NodeError> {
        op.validate(&self.limits)?;
        let _guard = self.lock(&op.key);
        let bucket = bucket_of(op.key.as_str());
        let stored = delta_log::load_for_write(&*self.store, op.key.as_str(), bucket)?;
        let mut state = stored.state.clone();
        let delta = self.execute(&mut state, op)?;
        admit(&stored.state, &state)?;
        let ticket = if state != stored.state {
            // The delta goes to the log only if it takes the stored state to
            // the new one exactly; otherwise the write stores the state.
            let exact = stored.state.merged(&delta) == state;
            let plan =
                delta_log::plan(op.key.as_str(), bucket, &stored, &state, exact.then_some(&delta));
            self.write(bucket, plan)?
        } else {
            self.store.barrier()
        };
        Ok((Applied { state, delta, coordinated: false }, ticket))
    }

    /// Merges a state (a delta or a full state from another replica) into a key.
    /// Merges never refuse: a join that could fail would break convergence.
    /// Returns whether the key changed; stored with the store's durability.
    pub fn merge(&self, key: &Key, remote: &Envelope) -> Result<bool, NodeError> {
        let ticket = {
            let _guard = self.lock(key);
            let bucket = bucket_of(key.as_str());
            let stored = delta_log::load_for_write(&*self.store, key.as_str(), bucket)?;
            let merged = stored.state.merged(remote);
            if merged == stored.state {
                return Ok(false);
            }
            let plan = delta_log::plan(key.as_str(), bucket, &stored, &merged, Some(remote));
            self.write(bucket, plan)?
        };
        ticket.wait()?;
        Ok(true)
    }

    /// Folds a key's delta log into its base now, in one batch; returns whether
    /// there was a log to fold. Reads see the same state before and after.
    /// Writes fold on their own once a log outgrows its share of the state
    /// ([`LOG_SHARE_OF_BASE_INV`]); this is for tools and tests.
    pub fn compact(&self, key: &Key) -> Result<bool, NodeError> {
        let ticket = {
            let _guard = self.lock(key);
            let bucket = bucket_of(key.as_str());
            let stored = delta_log::load_for_write(&*self.store, key.as_str(), bucket)?;
            if !stored.has_log() {
                return Ok(false);
            }
            let plan = delta_log::plan(key.as_str(), bucket, &stored, &stored.state, None);
            self.write(bucket, plan)?
        };
        ticket.wait()?;
        Ok(true)
    }

    /// Reads a key: `None` when it has no value (never written, or deleted).
    pub fn read(&self, key: &Key) -> Result<Option<ReadResult>, NodeError> {
        Ok(ReadResult::of(&self.load(key)?))
    }

    /// The stored envelope of a key (empty when never written).
    pub fn envelope(&self, key: &Key) -> Result<Envelope, NodeError> {
        self.load(key)
    }

    /// Lists live keys starting with `prefix`, after the key `after` (exclusive),
    /// at most `limit` (capped by [`Limits::scan_page_max`]).
    pub fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, NodeError> {
        let limit = limit.clamp(1, self.limits.scan_page_max);
        let visits_max = limit.saturating_mul(SCAN_VISITS_PER_KEY_MAX);
        let store_prefix = [DATA_PREFIX, prefix.as_bytes()].concat();
        let mut start: Option<Vec<u8>> = after.map(|a| [DATA_PREFIX, a.as_bytes()].concat());
        let mut keys = Vec::new();
        let mut visited = 0;
        loop {
            let batch_size = (limit - keys.len()).max(16);
            let rows = self.store.scan_prefix(&store_prefix, start.as_deref(), batch_size)?;
            let exhausted = rows.len() < batch_size;
            for (raw_key, _) in rows {
                visited += 1;
                let name = String::from_utf8_lossy(&raw_key[DATA_PREFIX.len()..]).into_owned();
                // The page's base may predate a fold of the key's log: read the
                // key again, log first, as a single read does.
                let envelope = delta_log::load(&*self.store, &name)?;
                start = Some(raw_key);
                if !envelope.is_empty() {
                    keys.push((name.clone(), envelope.types()));
                }
                if keys.len() == limit || visited >= visits_max {
                    return Ok(ScanPage { keys, cursor: Some(name) });
                }
            }
            if exhausted {
                return Ok(ScanPage { keys, cursor: None });
            }
        }
    }

    /// Waits until everything written so far is durable.
    pub fn flush(&self) -> Result<(), NodeError> {
        Ok(self.store.flush()?)
    }

    fn lock(&self, key: &Key) -> MutexGuard<'_, ()> {
        let mut hasher = self.lock_hasher.build_hasher();
        hasher.write(key.as_str().as_bytes());
        let stripe = (hasher.finish() as usize) % self.key_locks.len();
        // A panic while holding a key lock cannot leave a half-written key: the
        // store write is one batch. So a poisoned lock is safe to take over.
        self.key_locks[stripe].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn load(&self, key: &Key) -> Result<Envelope, NodeError> {
        delta_log::load(&*self.store, key.as_str())
    }

    /// Applies a planned write of one key (its rows and its digest entry, one
    /// batch), then moves the in-memory digest and live-bytes count. Called
    /// under the key's lock; the caller waits on the ticket after releasing it.
    fn write(&self, bucket: u16, plan: delta_log::Write) -> Result<CommitTicket, NodeError> {
        let ticket = self.store.apply_deferred(plan.batch)?;
        self.digest.replace(bucket, plan.old_hash, plan.new_hash);
        // Under the key's lock this key's share moves by exactly this much.
        self.live_bytes.fetch_add(plan.new_row_bytes, Ordering::Relaxed);
        self.live_bytes.fetch_sub(plan.old_row_bytes, Ordering::Relaxed);
        Ok(ticket)
    }

    /// The digest of this node's key space.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The keys of one digest bucket with their entry hashes, in key order.
    pub fn bucket_entries(&self, bucket: u16) -> Result<Vec<(String, u64)>, NodeError> {
        let prefix = [HASH_PREFIX, &bucket.to_be_bytes()].concat();
        let rows = self.store.scan_prefix(&prefix, None, usize::MAX)?;
        rows.iter()
            .map(|(index_key, value)| {
                let entry = delta_log::parse_index_entry(index_key, value)?;
                Ok((delta_log::index_entry_name(index_key), entry.hash))
            })
            .collect()
    }

    fn now(&self) -> calmkv_crdts::Hlc {
        let wall_ms = (self.wall_clock)();
        let mut clock = self.clock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        clock.now(wall_ms)
    }

    /// Runs the operation on `state` as this node, returning the delta.
    fn execute(&self, state: &mut Envelope, op: &Op) -> Result<Envelope, NodeError> {
        if self.marked_clean.load(Ordering::Acquire) {
            actor::record(&*self.store, self.actor, false)?;
            self.marked_clean.store(false, Ordering::Release);
        }
        execute(state, op, self.actor, self.now(), &self.limits)
    }

    /// The CRDT actor this node's writes mint dots as: the node's id until a
    /// crash, then a new one per crash, so that a dot lost with writes that
    /// were not durable (and may have reached other replicas) is never minted
    /// again for another write (`node/actor.rs`).
    pub fn actor(&self) -> NodeId {
        self.actor
    }

    /// Makes everything durable and records that this node's actor stopped
    /// cleanly, so the next open mints as the same actor. A later write by
    /// this node records it running again first. Called by the server's
    /// clean shutdown and [`Db::close`](crate::Db::close); a node dropped
    /// without it counts as crashed (a new actor next time).
    pub fn mark_clean(&self) -> Result<(), NodeError> {
        self.store.flush()?;
        if actor::owns(&*self.store, self.actor)? {
            actor::record(&*self.store, self.actor, true)?;
            self.marked_clean.store(true, Ordering::Release);
        }
        Ok(())
    }
}

/// Runs `op` on `state` as `actor` (whose dots the mutation mints), with `now`
/// ordering last-writer-wins writes, and returns the delta. Pure: the node's
/// write path and the quorum's state machine (which acts as the quorum's own
/// actor, identically on every voter) both call it.
pub fn execute(
    state: &mut Envelope,
    op: &Op,
    actor: NodeId,
    now: calmkv_crdts::Hlc,
    limits: &Limits,
) -> Result<Envelope, NodeError> {
    let key = op.key.as_str();
    let limits = limits.crdt();
    let entries_before = state.value.context().entries();
    let mut delta = Envelope::default();
    match &op.action {
        Action::Put { value, context, if_absent } => {
            check_type(key, &state.types(), KeyType::Register)?;
            if *if_absent && !state.is_empty() {
                return Err(NodeError::PreconditionFailed { key: key.to_string() });
            }
            let seen = bounded_context(context.as_ref(), &state.value);
            let value = ByteBuf::from(value.to_vec());
            delta.value = state
                .value
                .with_register(|r| r.write(actor, value, &seen, &limits))
                .map_err(|e| crdt_error(key, e))?;
        }
        Action::PutLww { value } => {
            check_type(key, &state.types(), KeyType::Lww)?;
            delta.lww = state.lww.set(actor, now, ByteBuf::from(value.to_vec()));
        }
        Action::Delete { context } => {
            delta.value = match context {
                Some(seen) => state.value.delete(&bounded_context(Some(seen), &state.value)),
                None => state.value.clear(),
            };
            if state.lww.get().is_some() {
                delta.lww = state.lww.delete(actor, now);
            }
        }
        Action::Crdt(crdt_op) => {
            let wanted = KeyType::from(crdt_op.kind());
            check_type(key, &state.types(), wanted)?;
            check_nested_types(key, &state.value, crdt_op)?;
            delta.value = apply_crdt(&mut state.value, crdt_op, actor, &limits)
                .map_err(|e| crdt_error(key, e))?;
        }
    }
    // Only growth is refused: a key stored past the bound by an older version
    // stays writable.
    let entries = state.value.context().entries();
    if entries > limits.context_entries_max && entries > entries_before {
        let error = CrdtError::ContextTooLarge { entries, max: limits.context_entries_max };
        return Err(crdt_error(key, error));
    }
    Ok(delta)
}

/// The part of a client's context that this replica has seen.
///
/// A context comes back from a client, so it may claim anything: dots of nodes
/// that never wrote, a node's last possible dot (which would leave it no next
/// one), the coordinator's own actor, or thousands of made-up entries. Only
/// dots the state has seen can be superseded meaningfully, so the rest is
/// dropped. A write sent to a replica that has not yet received what the
/// client read keeps the unseen values as siblings instead of superseding
/// them: nothing is lost, and the next write with a fresh context resolves
/// them.
fn bounded_context(claimed: Option<&CausalContext>, state: &Value) -> CausalContext {
    claimed.map(|ctx| ctx.restricted_to(state.context())).unwrap_or_default()
}

/// Refuses an operation of type `wanted` on a key holding other types.
pub(crate) fn check_type(key: &str, present: &[KeyType], wanted: KeyType) -> Result<(), NodeError> {
    if present.iter().all(|t| *t == wanted) {
        return Ok(());
    }
    let found = present.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" and ");
    Err(NodeError::TypeMismatch { key: key.to_string(), wanted, found })
}

/// Refuses a map operation that would write a field with another type than the
/// field holds, before anything is changed.
fn check_nested_types(key: &str, value: &Value, op: &CrdtOp) -> Result<(), NodeError> {
    let CrdtOp::Map(map_op) = op else { return Ok(()) };
    let map = value.map();
    for (field, nested) in &map_op.update {
        if let Some(field_value) = map.get(field) {
            let path = format!("{key}.{field}");
            let present: Vec<KeyType> =
                field_value.kinds().into_iter().map(KeyType::from).collect();
            check_type(&path, &present, KeyType::from(nested.kind()))?;
            check_nested_types(&path, &field_value, nested)?;
        }
    }
    Ok(())
}

fn crdt_error(key: &str, error: CrdtError) -> NodeError {
    let key = key.to_string();
    match error {
        CrdtError::TooManySiblings { siblings, max } => {
            NodeError::TooManySiblings { key, siblings, max }
        }
        other => NodeError::LimitExceeded { key, what: other.to_string() },
    }
}

/// Runs a CRDT operation on a value (a key's, or a map field's) and returns the
/// delta. Types were checked before; only the CRDTs' own bounds can refuse.
fn apply_crdt(
    value: &mut Value,
    op: &CrdtOp,
    node: NodeId,
    limits: &calmkv_crdts::Limits,
) -> Result<Value, CrdtError> {
    match op {
        CrdtOp::Counter(CounterOp::Incr(n)) => value.with_counter(|c| c.incr(node, *n)),
        CrdtOp::Counter(CounterOp::Decr(n)) => value.with_counter(|c| c.decr(node, *n)),
        CrdtOp::Flag(FlagOp::Enable) => value.with_flag(|f| f.enable(node)),
        CrdtOp::Flag(FlagOp::Disable) => value.with_flag(|f| Ok(f.disable())),
        CrdtOp::Register(text) => value.with_register(|r| {
            // Supersede exactly this field's values: the shared context would
            // also cover the map's other fields.
            let seen = CausalContext::from_dots(r.entries().map(|(dot, _)| *dot));
            r.write(node, ByteBuf::from(text.clone().into_bytes()), &seen, limits)
        }),
        CrdtOp::Set(set_op) => value.with_set(|s| {
            let mut delta = s.add_all(node, set_op.add.iter().cloned(), limits)?;
            if !set_op.remove.is_empty() {
                delta.merge(&s.remove_all(&set_op.remove));
            }
            Ok(delta)
        }),
        CrdtOp::Map(map_op) => value.with_map(|m| {
            let mut delta = OrMap::new();
            for (field, nested) in &map_op.update {
                delta.merge(
                    &m.update(field.clone(), limits, |v| apply_crdt(v, nested, node, limits))?,
                );
            }
            for field in &map_op.remove {
                delta.merge(&m.remove(field));
            }
            Ok(delta)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::SetOp;
    use crate::store::MemoryStore;
    use bytes::Bytes;

    fn node(id: u64) -> Node {
        Node::open(NodeId(id), Arc::new(MemoryStore::new()), Limits::default()).unwrap()
    }

    fn key(k: &str) -> Key {
        Key::new(k, &Limits::default()).unwrap()
    }

    fn add(node: &Node, k: &str, member: &str) -> Applied {
        let op = SetOp { add: vec![member.into()], remove: vec![] };
        node.apply(&Op { key: key(k), action: Action::Crdt(CrdtOp::Set(op)) }).unwrap()
    }

    #[test]
    fn deltas_from_another_node_converge_both_ways() {
        let (a, b) = (node(1), node(2));
        let from_a = add(&a, "s", "x").delta;
        let from_b = add(&b, "s", "y").delta;
        assert!(b.merge(&key("s"), &from_a).unwrap());
        assert!(a.merge(&key("s"), &from_b).unwrap());
        assert_eq!(a.envelope(&key("s")).unwrap(), b.envelope(&key("s")).unwrap());
        assert!(!a.merge(&key("s"), &from_b).unwrap(), "a duplicate delta changes nothing");
    }

    #[test]
    fn a_late_delta_does_not_resurrect_a_deleted_key() {
        let (a, b) = (node(1), node(2));
        let write = a
            .apply(&Op {
                key: key("k"),
                action: Action::Put { value: Bytes::from("v"), context: None, if_absent: false },
            })
            .unwrap();
        b.merge(&key("k"), &write.delta).unwrap();
        let context = b.read(&key("k")).unwrap().unwrap().context;
        b.apply(&Op { key: key("k"), action: Action::Delete { context: Some(context) } }).unwrap();
        // The original write arrives again, late: the tombstone context absorbs it.
        b.merge(&key("k"), &write.delta).unwrap();
        assert_eq!(b.read(&key("k")).unwrap(), None);
    }

    #[test]
    fn concurrent_creations_with_different_types_keep_both() {
        let (a, b) = (node(1), node(2));
        let counter = a
            .apply(&Op { key: key("k"), action: Action::Crdt(CrdtOp::Counter(CounterOp::Incr(3))) })
            .unwrap();
        b.merge(&key("k"), &add(&node(2), "k", "m").delta).unwrap();
        b.merge(&key("k"), &counter.delta).unwrap();
        assert_eq!(b.envelope(&key("k")).unwrap().types(), [KeyType::Counter, KeyType::Set]);
        // Either operation alone is now a type mismatch; a delete with the read's
        // context resolves the conflict and a fresh write succeeds.
        let refused = b.apply(&Op {
            key: key("k"),
            action: Action::Crdt(CrdtOp::Counter(CounterOp::Incr(1))),
        });
        assert!(matches!(refused, Err(NodeError::TypeMismatch { .. })));
        let context = b.read(&key("k")).unwrap().unwrap().context;
        b.apply(&Op { key: key("k"), action: Action::Delete { context: Some(context) } }).unwrap();
        b.apply(&Op { key: key("k"), action: Action::Crdt(CrdtOp::Counter(CounterOp::Incr(1))) })
            .unwrap();
        assert_eq!(b.read(&key("k")).unwrap().unwrap().values, [crate::TypedValue::Counter(1)]);
    }

    #[test]
    fn a_scan_skips_deleted_keys_and_bounds_its_work() {
        let n = node(1);
        for i in 0..30 {
            add(&n, &format!("p/{i:02}"), "x");
        }
        for i in 0..25 {
            n.apply(&Op {
                key: key(&format!("p/{i:02}")),
                action: Action::Delete { context: None },
            })
            .unwrap();
        }
        // Two keys per page may visit at most 16 stored keys: the first page stops
        // early with a cursor rather than walking every tombstone.
        let first = n.scan("p/", None, 2).unwrap();
        assert!(first.keys.is_empty());
        assert_eq!(first.cursor.as_deref(), Some("p/15"));
        let mut live = Vec::new();
        let mut cursor = None;
        for _ in 0..10 {
            let page = n.scan("p/", cursor.as_deref(), 2).unwrap();
            live.extend(page.keys.into_iter().map(|(k, _)| k));
            cursor = page.cursor;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(live, ["p/25", "p/26", "p/27", "p/28", "p/29"]);
    }

    #[test]
    fn a_write_its_admission_refuses_leaves_the_key_untouched() {
        let node = node(1);
        let k = key("balance");
        let incr = |n| Op {
            key: k.clone(),
            action: Action::Crdt(CrdtOp::Counter(crate::CounterOp::Incr(n))),
        };
        let decr = |n| Op {
            key: k.clone(),
            action: Action::Crdt(CrdtOp::Counter(crate::CounterOp::Decr(n))),
        };
        let at_least_zero = |_: &Envelope, state: &Envelope| {
            if state.value.counter().value() < 0 {
                return Err(NodeError::InvariantViolation {
                    key: "balance".into(),
                    violation: "below 0".into(),
                });
            }
            Ok(())
        };
        node.apply_admitted(&incr(5), at_least_zero).unwrap();
        let before = node.envelope(&k).unwrap();
        let digest = node.digest().top();
        let refused = node.apply_admitted(&decr(6), at_least_zero);
        assert!(matches!(refused, Err(NodeError::InvariantViolation { .. })));
        assert_eq!(node.envelope(&k).unwrap(), before);
        assert_eq!(node.digest().top(), digest);
        node.apply_admitted(&decr(5), at_least_zero).unwrap();
        assert_eq!(node.envelope(&k).unwrap().value.counter().value(), 0);
    }

    #[test]
    fn a_register_write_in_a_map_field_leaves_the_other_fields_alone() {
        let (a, b) = (node(1), node(2));
        let update = |field: &str, op: CrdtOp| Op {
            key: key("m"),
            action: Action::Crdt(CrdtOp::Map(crate::op::MapOp {
                update: [(field.into(), op)].into(),
                remove: vec![],
            })),
        };
        let first = a.apply(&update("n", CrdtOp::Counter(CounterOp::Incr(1)))).unwrap();
        let second = a.apply(&update("name", CrdtOp::Register("x".into()))).unwrap();
        // Delivered out of order to another replica.
        b.merge(&key("m"), &second.delta).unwrap();
        b.merge(&key("m"), &first.delta).unwrap();
        assert_eq!(a.envelope(&key("m")).unwrap(), b.envelope(&key("m")).unwrap());
        let fields = b.envelope(&key("m")).unwrap().value.map();
        assert_eq!(fields.keys().cloned().collect::<Vec<_>>(), ["n", "name"]);
    }

    /// The key lock is not held through the wait for durability, so a write
    /// that changes nothing may see another's batch before it is durable: it
    /// then waits on the store's barrier, and is acknowledged only once what
    /// it saw is durable.
    #[test]
    fn a_write_that_changes_nothing_waits_for_the_pending_batch_it_may_have_seen() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::FjallStore::open(dir.path(), crate::store::Durability::Sync).unwrap();
        let node = Node::open(NodeId(1), Arc::new(store), Limits::default()).unwrap();
        let put = Op {
            key: key("a"),
            action: Action::Put { value: Bytes::from("v"), context: None, if_absent: false },
        };
        let (_, written) = node.apply_deferred(&put).unwrap();
        assert!(!written.is_ready(), "a sync write waits for its flush");
        let nothing = Op { key: key("b"), action: Action::Delete { context: None } };
        let (_, noop) = node.apply_deferred(&nothing).unwrap();
        assert!(!noop.is_ready(), "the no-op waits for the pending batch");
        noop.wait().unwrap();
        written.wait().unwrap();
        let (_, later) = node.apply_deferred(&nothing).unwrap();
        assert!(later.is_ready(), "nothing pending: a no-op is acknowledged at once");
    }
}
