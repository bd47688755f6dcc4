//! The node's errors. Each variant says what was refused and why; every refusal
//! leaves the store exactly as it was. The HTTP layer maps each variant once to a
//! status and a stable code ([`NodeError::code`]).

use crate::envelope::KeyType;
use crate::store::StoreError;

/// Why the node refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The key is empty, too long, or has a control character. Nothing changed.
    #[error("bad key: {reason} (keys are 1..={max} bytes of UTF-8 without control characters)")]
    BadKey {
        /// What is wrong with it.
        reason: &'static str,
        /// The longest key allowed, in bytes.
        max: usize,
    },
    /// The request is malformed. Nothing changed.
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// A value is larger than allowed. Nothing changed.
    #[error("value of {bytes} bytes is larger than the limit of {max}")]
    ValueTooLarge {
        /// The value's size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The key holds another type. Nothing changed.
    #[error("key {key:?} holds {found}, not {wanted}")]
    TypeMismatch {
        /// The key.
        key: String,
        /// The type the operation needs.
        wanted: KeyType,
        /// The type(s) the key holds.
        found: String,
    },
    /// The register would hold too many concurrent values. Nothing changed.
    #[error("key {key:?} would have {siblings} concurrent values, more than {max}; write with the context of a read to resolve them")]
    TooManySiblings {
        /// The key.
        key: String,
        /// Siblings the write would leave.
        siblings: usize,
        /// The limit.
        max: usize,
    },
    /// A set or map would exceed its member bound, or a counter share would
    /// overflow. Nothing changed.
    #[error("key {key:?}: {what}")]
    LimitExceeded {
        /// The key.
        key: String,
        /// Which bound, and by how much.
        what: String,
    },
    /// `If-None-Match: *` and the key has a value. Nothing changed.
    #[error("key {key:?} already has a value")]
    PreconditionFailed {
        /// The key.
        key: String,
    },
    /// The operation would break a declared invariant: the quorum (or, for an
    /// embedded single node, the node itself) refused it. Nothing changed.
    #[error("key {key:?}: {violation}")]
    InvariantViolation {
        /// The key.
        key: String,
        /// Which invariant, and the bound it would cross.
        violation: String,
    },
    /// The operation needs the quorum and the quorum cannot be reached (or this
    /// node's invariant declarations differ from the quorum group's). Nothing
    /// changed; operations that need no coordination still work.
    #[error("coordination unavailable for key {key:?}: {reason}")]
    CoordinationUnavailable {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The operation needs the quorum, and its proposal may have reached the
    /// quorum's leader without this node learning the outcome (the leader's
    /// reply was lost, or the deadline passed while the entry was in flight).
    /// It may or may not be applied: read the key, or retry with the same
    /// idempotency key, which the quorum answers with the first outcome.
    #[error("coordination unavailable for key {key:?}: {reason}")]
    CoordinationIndeterminate {
        /// The key.
        key: String,
        /// Why the outcome is unknown.
        reason: String,
    },
    /// An `Idempotency-Key` is empty, too long or not printable ASCII.
    /// Nothing changed.
    #[error("bad idempotency key: {reason} (1..={max} bytes of printable ASCII without spaces)")]
    BadIdempotencyKey {
        /// What is wrong with it.
        reason: &'static str,
        /// The longest key allowed, in bytes.
        max: usize,
    },
    /// The idempotency key was first used for another operation (another data
    /// key or another action); the quorum answers it only for that one.
    /// Nothing changed.
    #[error("{reason}")]
    IdempotencyKeyReused {
        /// The data key of the refused operation.
        key: String,
        /// Which idempotency key, and what it was first used for.
        reason: String,
    },
    /// The configuration cannot work (a zero bound, a value larger than a body).
    /// Nothing was opened.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The storage engine failed; the operation may not have been applied.
    #[error("storage: {source}")]
    Store {
        /// What the engine said.
        #[from]
        source: StoreError,
    },
    /// An entry of the digest index is malformed: the data on disk is damaged.
    #[error("digest index entry {entry:?} is malformed")]
    CorruptIndex {
        /// The index entry's key.
        entry: String,
    },
    /// A stored value could not be decoded: the data on disk is damaged or was
    /// written by an incompatible version. Nothing changed.
    #[error("stored value of key {key:?} is unreadable: {source}")]
    Corrupt {
        /// The key.
        key: String,
        /// What the decoder said.
        source: calmkv_crdts::DecodeError,
    },
}

/// Whether a coordinated operation that got no outcome was applied: what the
/// `applied` field of a `coordination_unavailable` error body says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppliedStatus {
    /// Nothing left this node: the operation was not applied.
    No,
    /// The operation may or may not be applied.
    Unknown,
}

impl NodeError {
    /// For an operation the quorum gave no outcome, whether it was applied.
    pub fn applied(&self) -> Option<AppliedStatus> {
        match self {
            NodeError::CoordinationUnavailable { .. } => Some(AppliedStatus::No),
            NodeError::CoordinationIndeterminate { .. } => Some(AppliedStatus::Unknown),
            _ => None,
        }
    }

    /// The stable code of this error in the HTTP API (docs/openapi.yaml).
    pub fn code(&self) -> &'static str {
        match self {
            NodeError::BadKey { .. } => "bad_key",
            NodeError::BadIdempotencyKey { .. } => "bad_request",
            NodeError::IdempotencyKeyReused { .. } => "idempotency_key_reused",
            NodeError::InvalidConfig { .. } => "internal",
            NodeError::BadRequest { .. } => "bad_request",
            NodeError::ValueTooLarge { .. } => "payload_too_large",
            NodeError::TypeMismatch { .. } => "type_mismatch",
            NodeError::TooManySiblings { .. } => "too_many_siblings",
            NodeError::LimitExceeded { .. } => "limit_exceeded",
            NodeError::PreconditionFailed { .. } => "precondition_failed",
            NodeError::InvariantViolation { .. } => "invariant_violation",
            NodeError::CoordinationUnavailable { .. }
            | NodeError::CoordinationIndeterminate { .. } => "coordination_unavailable",
            NodeError::Store { source: StoreError::InsufficientStorage { .. } } => {
                "insufficient_storage"
            }
            NodeError::Store { .. }
            | NodeError::Corrupt { .. }
            | NodeError::CorruptIndex { .. } => "internal",
        }
    }
}
