//! Idempotency keys: a client's name for one coordinated operation, so that a
//! retry after an indeterminate answer is answered with the first outcome
//! instead of being applied again.
//!
//! The window of remembered keys is part of the replicated state machine: every
//! voter applies the same log, so every voter remembers the same keys, evicts
//! the same ones, and answers a retry the same way; a snapshot carries the
//! window, so it survives restarts and a voter that catches up by snapshot.

use super::types::{Outcome, Proposal, WireAction};
use crate::NodeError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Longest idempotency key, in bytes: room for a UUID or a 256-bit hex digest
/// with a prefix, and small enough that the whole window stays small.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

/// Keys the state machine remembers, the oldest forgotten first. A retry
/// after that many later keyed operations is applied again. At most about
/// `IDEMPOTENCY_WINDOW_ENTRIES × (key + data key + message)` ≈ 20 MiB with the
/// longest keys; a few hundred KiB with UUIDs on short data keys.
pub const IDEMPOTENCY_WINDOW_ENTRIES: usize = 10_000;

/// Longest refusal message remembered, in bytes (cut at a character boundary).
const REMEMBERED_MESSAGE_BYTES_MAX: usize = 512;

/// A validated idempotency key: 1..=[`IDEMPOTENCY_KEY_BYTES_MAX`] bytes of
/// printable ASCII without spaces (`!`..=`~`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Checks `key`; a typed refusal when it is empty, too long or holds
    /// anything but visible ASCII.
    pub fn new(key: impl Into<String>) -> Result<IdempotencyKey, NodeError> {
        let key = key.into();
        let bad = |reason| NodeError::BadIdempotencyKey { reason, max: IDEMPOTENCY_KEY_BYTES_MAX };
        if key.is_empty() {
            return Err(bad("the key is empty"));
        }
        if key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
            return Err(bad("the key is too long"));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("the key holds a character outside printable ASCII"));
        }
        Ok(IdempotencyKey(key))
    }

    /// A fresh random key (128 bits, hex), as the CLI sends by default.
    pub fn random() -> IdempotencyKey {
        IdempotencyKey(format!("{:032x}", rand::random::<u128>()))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the window remembers of a first outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Remembered {
    /// Committed: a retry is answered with the key's current state, which
    /// contains the first commit (an admitted state only grows).
    Committed,
    /// Refused, with the refusal's code and (cut) message.
    Refused {
        /// The error code.
        code: String,
        /// The message, at most 512 bytes.
        message: String,
    },
}

impl Remembered {
    /// What to remember of `outcome` (nothing of a blank entry's).
    pub fn of(outcome: &Outcome) -> Option<Remembered> {
        match outcome {
            Outcome::Committed { .. } => Some(Remembered::Committed),
            Outcome::Refused { code, message } => Some(Remembered::refused(code, message)),
            Outcome::Nothing => None,
        }
    }

    /// A refusal, its message cut to the remembered bound.
    pub fn refused(code: &str, message: &str) -> Remembered {
        let mut cut = message.len().min(REMEMBERED_MESSAGE_BYTES_MAX);
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        Remembered::Refused { code: code.to_string(), message: message[..cut].to_string() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Entry {
    /// Which operation the key named: its data key and a hash of its action.
    key: String,
    fingerprint: u64,
    outcome: Remembered,
}

/// The recent idempotency keys and their first outcomes, bounded by
/// [`IDEMPOTENCY_WINDOW_ENTRIES`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyWindow {
    entries: BTreeMap<String, Entry>,
    order: VecDeque<String>,
}

/// Whether an idempotency key was seen before, for which operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    /// A new key: apply the operation, then [`IdempotencyWindow::remember`].
    New,
    /// A repeat of the same operation: its first outcome.
    Repeat(Remembered),
    /// The key named another operation: refused with this error.
    Reused(String),
}

/// A stable hash of what an operation asks (its data key and action; not a
/// proposer's observation or clock, which a retry may change).
pub fn fingerprint(key: &str, action: &WireAction) -> u64 {
    let bytes = rmp_serde::to_vec_named(&(key, action)).unwrap_or_default();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// [`fingerprint`] of a proposal.
pub fn fingerprint_of(proposal: &Proposal) -> u64 {
    fingerprint(&proposal.key, &proposal.action)
}

impl IdempotencyWindow {
    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Whether `id` was seen, and whether for the operation on `key` with
    /// `fingerprint`.
    pub fn check(&self, id: &IdempotencyKey, key: &str, fingerprint: u64) -> Seen {
        let Some(entry) = self.entries.get(id.as_str()) else { return Seen::New };
        if entry.key != key || entry.fingerprint != fingerprint {
            return Seen::Reused(format!(
                "idempotency key {:?} was first used for another operation (on key {:?})",
                id.as_str(),
                entry.key
            ));
        }
        Seen::Repeat(entry.outcome.clone())
    }

    /// Remembers the first outcome of the operation on `key` under `id`,
    /// forgetting the oldest key past the window.
    pub fn remember(
        &mut self,
        id: &IdempotencyKey,
        key: &str,
        fingerprint: u64,
        outcome: Remembered,
    ) {
        let entry = Entry { key: key.to_string(), fingerprint, outcome };
        if self.entries.insert(id.as_str().to_string(), entry).is_none() {
            self.order.push_back(id.as_str().to_string());
        }
        while self.order.len() > IDEMPOTENCY_WINDOW_ENTRIES {
            if let Some(oldest) = self.order.pop_front() {
                self.entries.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_printable_ascii() {
        assert!(IdempotencyKey::new("0f8e-Retry_1").is_ok());
        assert!(IdempotencyKey::new("x".repeat(IDEMPOTENCY_KEY_BYTES_MAX)).is_ok());
        for bad in ["", "with space", "tab\t", "é", "nul\0"] {
            let error = IdempotencyKey::new(bad).unwrap_err();
            assert!(matches!(error, NodeError::BadIdempotencyKey { .. }), "{bad:?}: {error:?}");
        }
        let long = IdempotencyKey::new("x".repeat(IDEMPOTENCY_KEY_BYTES_MAX + 1)).unwrap_err();
        assert!(matches!(long, NodeError::BadIdempotencyKey { .. }));
    }

    #[test]
    fn random_keys_are_valid_and_differ() {
        let (a, b) = (IdempotencyKey::random(), IdempotencyKey::random());
        assert_ne!(a, b);
        assert_eq!(IdempotencyKey::new(a.as_str()).unwrap(), a);
    }
}
