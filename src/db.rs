//! The embedded face: [`Db`] and its typed handles.
//!
//! Every handle method builds an [`Op`] and calls [`Node::apply`], or reads with
//! [`Node::envelope`]: the same path the HTTP API takes, so an application that
//! embeds calmkv and one that talks HTTP see the same behaviour.

use crate::envelope::{Envelope, KeyType};
use crate::error::NodeError;
use crate::node::{Applied, Node, ScanPage};
use crate::op::{Action, CounterOp, CrdtOp, FlagOp, Key, MapOp, Op, SetOp};
use crate::quorum::idempotency::{fingerprint, IdempotencyWindow, Remembered, Seen};
use crate::quorum::{IdempotencyKey, Outcome, WireAction};
use crate::read::{ReadResult, TypedValue};
use crate::Config;
use bytes::Bytes;
use calmkv_crdts::{CausalContext, NodeId};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// An embedded calmkv node with a local data directory.
pub struct Db {
    node: Node,
    /// Recent idempotency keys of [`Db::apply_idempotent`], for the life of
    /// this `Db` (bounded by [`IDEMPOTENCY_WINDOW_ENTRIES`]).
    ///
    /// [`IDEMPOTENCY_WINDOW_ENTRIES`]: crate::quorum::idempotency::IDEMPOTENCY_WINDOW_ENTRIES
    idempotency: Mutex<IdempotencyWindow>,
}

impl Db {
    /// Opens (or creates) a node in `dir` with the default configuration.
    pub fn open(dir: impl AsRef<Path>) -> Result<Db, NodeError> {
        Db::open_with(Config::new(dir.as_ref()))
    }

    /// Opens a node as `config` says.
    pub fn open_with(config: Config) -> Result<Db, NodeError> {
        Ok(Db { node: config.open_node()?, idempotency: Mutex::new(IdempotencyWindow::default()) })
    }

    /// A `Db` over a node built by hand: over a fault-injecting store in
    /// tests, or a simulated one.
    pub fn from_node(node: Node) -> Db {
        Db { node, idempotency: Mutex::new(IdempotencyWindow::default()) }
    }

    /// The node under the handles.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// This node's identity.
    pub fn id(&self) -> NodeId {
        self.node.id()
    }

    /// Applies an operation built by hand.
    pub fn apply(&self, op: Op) -> Result<Applied, NodeError> {
        self.node.apply_alone(&op)
    }

    /// [`Db::apply`] under an idempotency key, the embedded twin of the HTTP
    /// `Idempotency-Key` header: a repeat of the same operation with the same
    /// key is answered with the first outcome (a commit: the key's current
    /// state; a refusal: the same error) and not applied again. A key first
    /// used for another operation is refused with
    /// [`NodeError::IdempotencyKeyReused`]. Unlike the quorum's window, which
    /// is replicated and survives restarts, this one lives as long as the `Db`:
    /// an embedded call is never indeterminate while the process lives (it
    /// returns the outcome), and after a crash the application reads the key.
    /// Only commits and decisions (`invariant_violation`, `precondition_failed`)
    /// are remembered; after any other error a retry runs again.
    pub fn apply_idempotent(&self, op: Op, key: &IdempotencyKey) -> Result<Applied, NodeError> {
        let fingerprint = fingerprint(op.key.as_str(), &WireAction::from(&op.action));
        // Held across the apply: two racing calls with one key run one after
        // the other, and the second sees the first's outcome.
        let mut window = self.idempotency.lock().unwrap_or_else(|p| p.into_inner());
        match window.check(key, op.key.as_str(), fingerprint) {
            Seen::New => {}
            Seen::Repeat(Remembered::Committed) => {
                let state = self.node.envelope(&op.key)?;
                let coordinated = matches!(
                    self.node.invariants().route(&op)?,
                    crate::invariants::Route::Quorum { .. }
                );
                return Ok(Applied { state: state.clone(), delta: state, coordinated });
            }
            Seen::Repeat(Remembered::Refused { code, message }) => {
                return Err(Outcome::error(&code, &message, op.key.as_str()))
            }
            Seen::Reused(reason) => {
                return Err(NodeError::IdempotencyKeyReused { key: op.key.to_string(), reason })
            }
        }
        let result = self.node.apply_alone(&op);
        // The decisions are remembered; other refusals (a malformed or
        // mistyped operation, a storage failure) change nothing and run again.
        let remembered = match &result {
            Ok(_) => Some(Remembered::Committed),
            Err(NodeError::InvariantViolation { violation, .. }) => {
                Some(Remembered::refused("invariant_violation", violation))
            }
            Err(error @ NodeError::PreconditionFailed { .. }) => {
                Some(Remembered::refused(error.code(), &error.to_string()))
            }
            Err(_) => None,
        };
        if let Some(remembered) = remembered {
            window.remember(key, op.key.as_str(), fingerprint, remembered);
        }
        result
    }

    /// Reads a key of any type: `None` when it has no value.
    pub fn get(&self, key: &str) -> Result<Option<ReadResult>, NodeError> {
        self.node.read(&self.key(key)?)
    }

    /// Deletes everything this node holds under `key`.
    pub fn delete(&self, key: &str) -> Result<(), NodeError> {
        self.write(key, Action::Delete { context: None }).map(drop)
    }

    /// Lists live keys with a prefix, a page at a time (see [`Node::scan`]).
    pub fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, NodeError> {
        self.node.scan(prefix, after, limit)
    }

    /// Waits until every write so far is durable.
    pub fn flush(&self) -> Result<(), NodeError> {
        self.node.flush()
    }

    /// Stops cleanly: makes every write durable and records that this node's
    /// CRDT actor stopped cleanly, so the next open mints as the same actor.
    /// A `Db` dropped without `close` is treated as a crash on the next open
    /// (a new actor: safe, one more context entry per key it then writes).
    pub fn close(self) -> Result<(), NodeError> {
        self.node.mark_clean()
    }

    /// The multi-value register at `key`.
    pub fn register(&self, key: &str) -> Register<'_> {
        Register(Handle { db: self, key: key.to_string() })
    }

    /// The last-writer-wins register at `key`.
    pub fn lww(&self, key: &str) -> Lww<'_> {
        Lww(Handle { db: self, key: key.to_string() })
    }

    /// The counter at `key`.
    pub fn counter(&self, key: &str) -> Counter<'_> {
        Counter(Handle { db: self, key: key.to_string() })
    }

    /// The set at `key`.
    pub fn set(&self, key: &str) -> Set<'_> {
        Set(Handle { db: self, key: key.to_string() })
    }

    /// The map at `key`.
    pub fn map(&self, key: &str) -> Map<'_> {
        Map(Handle { db: self, key: key.to_string() })
    }

    /// The flag at `key`.
    pub fn flag(&self, key: &str) -> Flag<'_> {
        Flag(Handle { db: self, key: key.to_string() })
    }

    fn key(&self, key: &str) -> Result<Key, NodeError> {
        Key::new(key, self.node.limits())
    }

    fn write(&self, key: &str, action: Action) -> Result<Applied, NodeError> {
        self.node.apply_alone(&Op { key: self.key(key)?, action })
    }
}

struct Handle<'a> {
    db: &'a Db,
    key: String,
}

impl Handle<'_> {
    fn write(&self, action: Action) -> Result<Applied, NodeError> {
        self.db.write(&self.key, action)
    }

    fn crdt(&self, op: CrdtOp) -> Result<Applied, NodeError> {
        self.write(Action::Crdt(op))
    }

    /// The key's envelope, refused when it holds anything but `wanted`.
    fn read(&self, wanted: KeyType) -> Result<Envelope, NodeError> {
        let envelope = self.db.node.envelope(&self.db.key(&self.key)?)?;
        crate::node::check_type(&self.key, &envelope.types(), wanted)?;
        Ok(envelope)
    }
}

/// The values of a multi-value register and the context to write back with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterValue {
    /// One value, or several concurrent siblings.
    pub values: Vec<Bytes>,
    /// Pass to [`Register::put`] to supersede these values.
    pub context: CausalContext,
}

/// A multi-value register handle.
pub struct Register<'a>(Handle<'a>);

impl Register<'_> {
    /// The values (siblings when writes were concurrent), `None` when absent.
    pub fn get(&self) -> Result<Option<RegisterValue>, NodeError> {
        let envelope = self.0.read(KeyType::Register)?;
        let register = envelope.value.register();
        if register.is_empty() {
            return Ok(None);
        }
        let values = register.values().map(|v| Bytes::copy_from_slice(v)).collect();
        Ok(Some(RegisterValue { values, context: envelope.value.context().clone() }))
    }

    /// Writes `value`, superseding what `context` saw (nothing when `None`, so the
    /// value becomes a sibling of any there). Returns the new context.
    pub fn put(
        &self,
        value: impl Into<Bytes>,
        context: Option<&CausalContext>,
    ) -> Result<CausalContext, NodeError> {
        let action =
            Action::Put { value: value.into(), context: context.cloned(), if_absent: false };
        Ok(self.0.write(action)?.context().clone())
    }

    /// Writes `value` only if the key has no value (`PreconditionFailed` if it has).
    pub fn create(&self, value: impl Into<Bytes>) -> Result<CausalContext, NodeError> {
        let action = Action::Put { value: value.into(), context: None, if_absent: true };
        Ok(self.0.write(action)?.context().clone())
    }

    /// Deletes what `context` saw, or all this node holds when `None`.
    pub fn delete(&self, context: Option<&CausalContext>) -> Result<(), NodeError> {
        self.0.write(Action::Delete { context: context.cloned() }).map(drop)
    }
}

/// A last-writer-wins register handle.
pub struct Lww<'a>(Handle<'a>);

impl Lww<'_> {
    /// The value, `None` when absent.
    pub fn get(&self) -> Result<Option<Bytes>, NodeError> {
        Ok(self.0.read(KeyType::Lww)?.lww.get().map(|v| Bytes::copy_from_slice(v)))
    }

    /// Writes `value`; the latest write by hybrid clock wins.
    pub fn set(&self, value: impl Into<Bytes>) -> Result<(), NodeError> {
        self.0.write(Action::PutLww { value: value.into() }).map(drop)
    }
}

/// A counter handle.
pub struct Counter<'a>(Handle<'a>);

impl Counter<'_> {
    /// The value (0 when absent).
    pub fn get(&self) -> Result<i128, NodeError> {
        Ok(self.0.read(KeyType::Counter)?.value.counter().value())
    }

    /// Adds `n`; returns the new value.
    pub fn incr(&self, n: u64) -> Result<i128, NodeError> {
        Ok(self.0.crdt(CrdtOp::Counter(CounterOp::Incr(n)))?.state.value.counter().value())
    }

    /// Subtracts `n`; returns the new value.
    pub fn decr(&self, n: u64) -> Result<i128, NodeError> {
        Ok(self.0.crdt(CrdtOp::Counter(CounterOp::Decr(n)))?.state.value.counter().value())
    }
}

/// A set handle.
pub struct Set<'a>(Handle<'a>);

impl Set<'_> {
    /// The members, in order (empty when absent).
    pub fn members(&self) -> Result<Vec<String>, NodeError> {
        Ok(self.0.read(KeyType::Set)?.value.set().members().cloned().collect())
    }

    /// Whether `member` is in the set.
    pub fn contains(&self, member: &str) -> Result<bool, NodeError> {
        Ok(self.0.read(KeyType::Set)?.value.set().contains(&member.to_string()))
    }

    /// Adds one member.
    pub fn add(&self, member: impl Into<String>) -> Result<(), NodeError> {
        self.apply(SetOp { add: vec![member.into()], remove: vec![] })
    }

    /// Removes one member (the adds of it this node has seen).
    pub fn remove(&self, member: impl Into<String>) -> Result<(), NodeError> {
        self.apply(SetOp { add: vec![], remove: vec![member.into()] })
    }

    /// Adds and removes members in one atomic write.
    pub fn apply(&self, op: SetOp) -> Result<(), NodeError> {
        self.0.crdt(CrdtOp::Set(op)).map(drop)
    }
}

/// A map handle.
pub struct Map<'a>(Handle<'a>);

impl Map<'_> {
    /// The fields, `None` when absent. A field holds several values only after
    /// concurrent creations with different types.
    pub fn get(&self) -> Result<Option<BTreeMap<String, Vec<TypedValue>>>, NodeError> {
        let envelope = self.0.read(KeyType::Map)?;
        Ok(TypedValue::all_of(&envelope.value).into_iter().find_map(|v| match v {
            TypedValue::Map(fields) => Some(fields),
            _ => None,
        }))
    }

    /// Runs `op` on the field `field` (creating it).
    pub fn update(&self, field: impl Into<String>, op: CrdtOp) -> Result<(), NodeError> {
        self.apply(MapOp { update: [(field.into(), op)].into(), remove: vec![] })
    }

    /// Removes a field (the updates of it this node has seen).
    pub fn remove(&self, field: impl Into<String>) -> Result<(), NodeError> {
        self.apply(MapOp { update: BTreeMap::new(), remove: vec![field.into()] })
    }

    /// Updates and removes fields in one atomic write.
    pub fn apply(&self, op: MapOp) -> Result<(), NodeError> {
        self.0.crdt(CrdtOp::Map(op)).map(drop)
    }
}

/// A flag handle.
pub struct Flag<'a>(Handle<'a>);

impl Flag<'_> {
    /// Whether the flag is on (off when absent).
    pub fn get(&self) -> Result<bool, NodeError> {
        Ok(self.0.read(KeyType::Flag)?.value.flag().is_enabled())
    }

    /// Turns the flag on.
    pub fn enable(&self) -> Result<(), NodeError> {
        self.0.crdt(CrdtOp::Flag(FlagOp::Enable)).map(drop)
    }

    /// Turns the flag off (the enables this node has seen).
    pub fn disable(&self) -> Result<(), NodeError> {
        self.0.crdt(CrdtOp::Flag(FlagOp::Disable)).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::Invariants;
    use std::sync::Arc;

    const BANK: &str = "[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n";

    fn bank() -> Db {
        let invariants = Arc::new(Invariants::parse(BANK).unwrap());
        Db::open_with(Config { invariants, ..Config::in_memory() }).unwrap()
    }

    fn op(db: &Db, counter: CounterOp) -> Op {
        Op { key: db.key("account/a").unwrap(), action: Action::Crdt(CrdtOp::Counter(counter)) }
    }

    #[test]
    fn a_repeated_idempotency_key_is_answered_with_the_first_outcome_and_applied_once() {
        let db = bank();
        db.counter("account/a").incr(10).unwrap();
        let key = IdempotencyKey::new("debit-1").unwrap();
        let first = db.apply_idempotent(op(&db, CounterOp::Decr(4)), &key).unwrap();
        let again = db.apply_idempotent(op(&db, CounterOp::Decr(4)), &key).unwrap();
        assert!(first.coordinated && again.coordinated);
        assert_eq!(again.state.value.counter().value(), 6);
        assert_eq!(db.counter("account/a").get().unwrap(), 6, "applied once");

        // A refusal is remembered as such.
        let big = IdempotencyKey::new("debit-2").unwrap();
        let refused = db.apply_idempotent(op(&db, CounterOp::Decr(7)), &big);
        assert!(matches!(refused, Err(NodeError::InvariantViolation { .. })), "{refused:?}");
        db.counter("account/a").incr(10).unwrap();
        let again = db.apply_idempotent(op(&db, CounterOp::Decr(7)), &big);
        assert!(matches!(again, Err(NodeError::InvariantViolation { .. })), "{again:?}");
        assert_eq!(db.counter("account/a").get().unwrap(), 16);

        // The key of another operation is refused and changes nothing.
        let reused = db.apply_idempotent(op(&db, CounterOp::Decr(1)), &key);
        assert!(matches!(reused, Err(NodeError::IdempotencyKeyReused { .. })), "{reused:?}");
        assert_eq!(db.counter("account/a").get().unwrap(), 16);
    }
}
