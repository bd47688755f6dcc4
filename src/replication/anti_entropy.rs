//! Anti-entropy: two nodes find the keys on which they differ by walking down
//! their digests only where hashes disagree, then exchange those keys' states.
//!
//! The exchange is four messages, each answered by a pure handler:
//!
//! 1. [`AntiEntropy::Top`]: the initiator's group hashes.
//! 2. [`AntiEntropy::Groups`]: the responder's bucket hashes of the groups that differ.
//! 3. [`AntiEntropy::Keys`]: the initiator's key hashes of the buckets that differ.
//! 4. [`AntiEntropy::States`]: the states the other side lacks or holds differently,
//!    and the keys the sender wants back; answered once more with those states.
//!
//! Handlers keep no session state, so a lost or duplicated message only ends or
//! repeats a round; merging is idempotent. Every message is bounded (groups,
//! buckets and keys per round, and the states' bytes), so a large difference is
//! repaired over several rounds. Cost: with `d` differing keys, a round exchanges O(groups + buckets of
//! the differing groups + keys of the differing buckets + d) entries, independent
//! of the total number of keys as long as differences are few.

use super::digest::{BUCKETS_PER_GROUP, GROUPS};
use crate::envelope::Envelope;
use crate::op::Key;
use crate::{Node, NodeError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Groups whose buckets one round compares.
pub const GROUPS_PER_ROUND_MAX: usize = 8;
/// Buckets whose keys one round compares.
pub const BUCKETS_PER_ROUND_MAX: usize = 32;
/// Key states one message carries.
pub const STATES_PER_MESSAGE_MAX: usize = 256;
/// Encoded bytes of the states one message carries, unless it carries a
/// single state larger than that (which then travels alone, in parts: see
/// `peer.rs`). Small states go first, so a large key waits for the small
/// differences of its round instead of holding them up.
pub const STATES_BYTES_PER_MESSAGE_MAX: usize = 1024 * 1024;

/// One message of the anti-entropy exchange.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AntiEntropy {
    /// The sender's group hashes, [`GROUPS`] of them.
    Top {
        /// Hash of every group.
        groups: Vec<u64>,
    },
    /// The sender's bucket hashes for groups that differ.
    Groups {
        /// (group, its [`BUCKETS_PER_GROUP`] bucket hashes).
        groups: Vec<(u32, Vec<u64>)>,
    },
    /// The sender's keys and entry hashes for buckets that differ.
    Keys {
        /// (bucket, its keys with their entry hashes).
        buckets: Vec<(u16, Vec<(String, u64)>)>,
    },
    /// States for the receiver to merge, and keys the sender wants.
    States {
        /// Keys with the sender's state.
        states: Vec<(String, Envelope)>,
        /// Keys whose states the sender wants back.
        want: Vec<String>,
    },
}

/// What one node did with one message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Handled {
    /// Keys whose state changed by merging what arrived.
    pub keys_repaired: usize,
}

/// Starts a round: the message the initiator sends.
pub fn start(node: &Node) -> AntiEntropy {
    AntiEntropy::Top { groups: node.digest().top() }
}

/// Handles one message; returns the reply to send, if any.
pub fn handle(
    node: &Node,
    message: &AntiEntropy,
) -> Result<(Option<AntiEntropy>, Handled), NodeError> {
    let mut handled = Handled::default();
    let reply = match message {
        AntiEntropy::Top { groups } => {
            if groups.len() != GROUPS {
                let reason =
                    format!("anti-entropy top level with {} groups, not {GROUPS}", groups.len());
                return Err(NodeError::BadRequest { reason });
            }
            let mine = node.digest().top();
            let differing =
                (0..GROUPS).filter(|&g| mine[g] != groups[g]).take(GROUPS_PER_ROUND_MAX);
            let groups: Vec<(u32, Vec<u64>)> =
                differing.map(|g| (g as u32, node.digest().group(g))).collect();
            (!groups.is_empty()).then_some(AntiEntropy::Groups { groups })
        }
        AntiEntropy::Groups { groups } => {
            check_len("groups", groups.len(), GROUPS_PER_ROUND_MAX)?;
            let mut buckets = Vec::new();
            for (group, theirs) in groups {
                let group = *group as usize;
                check_len("group number", group + 1, GROUPS)?;
                check_len("buckets", theirs.len(), BUCKETS_PER_GROUP)?;
                let mine = node.digest().group(group);
                for (i, (a, b)) in mine.iter().zip(theirs).enumerate() {
                    if a != b && buckets.len() < BUCKETS_PER_ROUND_MAX {
                        let bucket = (group * BUCKETS_PER_GROUP + i) as u16;
                        buckets.push((bucket, node.bucket_entries(bucket)?));
                    }
                }
            }
            (!buckets.is_empty()).then_some(AntiEntropy::Keys { buckets })
        }
        AntiEntropy::Keys { buckets } => {
            check_len("buckets", buckets.len(), BUCKETS_PER_ROUND_MAX)?;
            let mut differing = Vec::new();
            let mut want = Vec::new();
            for (bucket, theirs) in buckets {
                let theirs: BTreeMap<&str, u64> =
                    theirs.iter().map(|(k, h)| (k.as_str(), *h)).collect();
                let mine = node.bucket_entries(*bucket)?;
                for (key, hash) in &mine {
                    if theirs.get(key.as_str()) != Some(hash)
                        && differing.len() < STATES_PER_MESSAGE_MAX
                    {
                        differing.push(stored_key(node, key)?);
                    }
                }
                let mine: BTreeMap<&str, u64> =
                    mine.iter().map(|(k, h)| (k.as_str(), *h)).collect();
                for (key, hash) in theirs {
                    if mine.get(key) != Some(&hash) && want.len() < STATES_PER_MESSAGE_MAX {
                        want.push(key.to_string());
                    }
                }
            }
            let states = states_within_bytes(node, differing)?;
            (!states.is_empty() || !want.is_empty()).then_some(AntiEntropy::States { states, want })
        }
        AntiEntropy::States { states, want } => {
            check_len("states", states.len(), STATES_PER_MESSAGE_MAX)?;
            check_len("wanted keys", want.len(), STATES_PER_MESSAGE_MAX)?;
            for (key, state) in states {
                if node.merge(&stored_key(node, key)?, state)? {
                    handled.keys_repaired += 1;
                }
            }
            let wanted = want.iter().map(|key| stored_key(node, key)).collect::<Result<_, _>>()?;
            let reply = states_within_bytes(node, wanted)?;
            (!reply.is_empty()).then_some(AntiEntropy::States { states: reply, want: vec![] })
        }
    };
    Ok((reply, handled))
}

/// The states of `keys` (those with any content) that fit
/// [`STATES_BYTES_PER_MESSAGE_MAX`], in order, skipping the ones that do not
/// fit; when none fits, the first of them alone, however large. States are
/// loaded one at a time, so at most one large state is held.
fn states_within_bytes(node: &Node, keys: Vec<Key>) -> Result<Vec<(String, Envelope)>, NodeError> {
    let mut states = Vec::new();
    let mut bytes = 0usize;
    let mut first_too_large: Option<Key> = None;
    for key in keys {
        let state = node.envelope(&key)?;
        if state.value.context().is_empty() && state.lww.is_unset() {
            continue;
        }
        let size = encoded_len(&state);
        if bytes + size <= STATES_BYTES_PER_MESSAGE_MAX {
            bytes += size;
            states.push((key.to_string(), state));
        } else if first_too_large.is_none() {
            first_too_large = Some(key);
        }
    }
    if let (true, Some(key)) = (states.is_empty(), first_too_large) {
        let state = node.envelope(&key)?;
        states.push((key.to_string(), state));
    }
    Ok(states)
}

/// Bytes of a state's encoding (`usize::MAX` when it cannot be encoded, so
/// it never counts as small).
fn encoded_len(state: &Envelope) -> usize {
    calmkv_crdts::encode(state).map_or(usize::MAX, |bytes| bytes.len())
}

fn stored_key(node: &Node, key: &str) -> Result<Key, NodeError> {
    Key::new(key, node.limits())
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), NodeError> {
    if len > max {
        return Err(NodeError::BadRequest {
            reason: format!("anti-entropy message with {len} {what}, more than {max}"),
        });
    }
    Ok(())
}
