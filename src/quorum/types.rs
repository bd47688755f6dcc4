//! What the quorum's log carries and what applying an entry answers.

use crate::envelope::Envelope;
use crate::invariants::Declaration;
use crate::op::{Action, CrdtOp, Key, Op};
use crate::{Limits, NodeError};
use calmkv_crdts::{CausalContext, Hlc};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::io::Cursor;

openraft::declare_raft_types!(
    /// calmkv's Raft types: u64 voter ids, voters addressed by `host:port`.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// An operation as the log stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireAction {
    /// [`Action::Put`].
    Put {
        /// The bytes.
        value: ByteBuf,
        /// The context of the read it is based on.
        context: Option<CausalContext>,
        /// Create only.
        if_absent: bool,
    },
    /// [`Action::PutLww`].
    PutLww {
        /// The bytes.
        value: ByteBuf,
    },
    /// [`Action::Delete`].
    Delete {
        /// What the delete saw.
        context: Option<CausalContext>,
    },
    /// [`Action::Crdt`].
    Crdt(CrdtOp),
}

impl From<&Action> for WireAction {
    fn from(action: &Action) -> WireAction {
        match action {
            Action::Put { value, context, if_absent } => WireAction::Put {
                value: ByteBuf::from(value.to_vec()),
                context: context.clone(),
                if_absent: *if_absent,
            },
            Action::PutLww { value } => WireAction::PutLww { value: ByteBuf::from(value.to_vec()) },
            Action::Delete { context } => WireAction::Delete { context: context.clone() },
            Action::Crdt(op) => WireAction::Crdt(op.clone()),
        }
    }
}

impl From<WireAction> for Action {
    fn from(action: WireAction) -> Action {
        match action {
            WireAction::Put { value, context, if_absent } => {
                Action::Put { value: value.into_vec().into(), context, if_absent }
            }
            WireAction::PutLww { value } => Action::PutLww { value: value.into_vec().into() },
            WireAction::Delete { context } => Action::Delete { context },
            WireAction::Crdt(op) => Action::Crdt(op),
        }
    }
}

/// One proposal: an operation that a declared invariant sends to the quorum,
/// with everything the state machine needs to decide it identically on every
/// voter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The key.
    pub key: String,
    /// The operation (already turned into insert-if-absent for a creation).
    pub action: WireAction,
    /// The proposing node's current state of the key: the increments (or
    /// members) it has seen. The state machine joins it with everything the
    /// quorum committed before deciding.
    pub observed: Envelope,
    /// The declaration that routed the operation here; carried in the entry so
    /// that every voter decides with the same rule.
    pub declaration: Declaration,
    /// The proposer's hash of all its declarations.
    pub invariants_hash: u64,
    /// Orders last-writer-wins writes.
    pub now: Hlc,
}

impl Proposal {
    /// The operation.
    pub fn op(&self, limits: &Limits) -> Result<Op, NodeError> {
        Ok(Op { key: Key::new(self.key.clone(), limits)?, action: self.action.clone().into() })
    }
}

/// A log entry's payload: a proposal and, when the client named the
/// operation, its idempotency key. Encoded with the proposal's fields
/// flattened beside the key, so an entry written as a bare [`Proposal`]
/// decodes as a command without a key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// The proposal.
    #[serde(flatten)]
    pub proposal: Proposal,
    /// The client's idempotency key, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// What applying an entry answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// A blank or membership entry.
    #[default]
    Nothing,
    /// Admitted: the key's new state in the quorum's view, joined with what
    /// the proposer observed. Replicas merge this whole state, so whoever
    /// sees a coordinated decrement also sees every increment it was counted
    /// against.
    Committed {
        /// The key.
        key: String,
        /// Its state.
        state: Envelope,
    },
    /// Refused; nothing changed.
    Refused {
        /// The error code (`invariant_violation`, `precondition_failed`, ...).
        code: String,
        /// The error message.
        message: String,
    },
}

impl Outcome {
    /// The refusal of `error`.
    pub fn refused(error: &NodeError) -> Outcome {
        let message = match error {
            NodeError::InvariantViolation { violation, .. } => violation.clone(),
            other => other.to_string(),
        };
        Outcome::Refused { code: error.code().to_string(), message }
    }

    /// The error a refusal stands for, on `key`.
    pub fn error(code: &str, message: &str, key: &str) -> NodeError {
        let key = key.to_string();
        match code {
            "invariant_violation" => {
                NodeError::InvariantViolation { key, violation: message.into() }
            }
            "precondition_failed" => NodeError::PreconditionFailed { key },
            "limit_exceeded" | "too_many_siblings" => {
                NodeError::LimitExceeded { key, what: message.into() }
            }
            "idempotency_key_reused" => {
                NodeError::IdempotencyKeyReused { key, reason: message.into() }
            }
            "coordination_unavailable" => {
                NodeError::CoordinationUnavailable { key, reason: message.into() }
            }
            _ => NodeError::BadRequest { reason: message.into() },
        }
    }
}
