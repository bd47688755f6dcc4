//! One request to several replicas: a deadline, a strategy, the answers
//! gathered. Reads above `local` and writes with `w` above one both go through
//! [`call_many`], so "ask these peers, stop when enough answered or the
//! deadline passed" is written once.
//!
//! The request goes out through each peer's outbox like any other frame
//! (encoded once, whatever the number of peers); answers come back through
//! the channel's correlation ids, at most one counted per peer.

use super::message::PeerMessage;
use super::peer::PeerChannel;
use calmkv_crdts::NodeId;
use std::collections::BTreeMap;
use tokio::time::Instant;

/// When [`call_many`] stops gathering answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// As soon as this many peers answered (or the deadline). `0` asks nobody.
    FirstOf(usize),
    /// When every asked peer answered (or the deadline).
    Every,
}

impl Strategy {
    /// Answers after which gathering stops, out of `asked` peers.
    pub fn enough(self, asked: usize) -> usize {
        match self {
            Strategy::FirstOf(n) => n.min(asked),
            Strategy::Every => asked,
        }
    }
}

/// Sends `request(id)` to every peer of `to` (unknown peers and full outboxes
/// count as silent) and gathers the answers with that id until `strategy` is
/// met or `deadline` passes. Returns the answers by peer, each peer's first
/// one only. With nothing to wait for (`FirstOf(0)`, no peers) it sends
/// nothing and returns at once.
pub async fn call_many(
    channel: &PeerChannel,
    to: &[NodeId],
    request: impl FnOnce(u64) -> PeerMessage,
    strategy: Strategy,
    deadline: Instant,
) -> BTreeMap<NodeId, PeerMessage> {
    let mut answers = BTreeMap::new();
    let enough = strategy.enough(to.len());
    if enough == 0 {
        return answers;
    }
    let id = channel.next_id();
    let mut receiver = channel.wait_for(id);
    let asked = channel.send_to_many(to, &request(id));
    let enough = enough.min(asked.len());
    while answers.len() < enough {
        match tokio::time::timeout_at(deadline, receiver.recv()).await {
            Ok(Some((from, answer))) => {
                if asked.contains(&from) {
                    answers.entry(from).or_insert(answer);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    channel.forget(id);
    answers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strategy_never_waits_for_more_peers_than_were_asked() {
        assert_eq!(Strategy::FirstOf(1).enough(2), 1);
        assert_eq!(Strategy::FirstOf(5).enough(2), 2);
        assert_eq!(Strategy::FirstOf(0).enough(2), 0);
        assert_eq!(Strategy::Every.enough(2), 2);
        assert_eq!(Strategy::Every.enough(0), 0);
    }
}
