//! Messages between nodes over the peer channel.

use super::anti_entropy::AntiEntropy;
use crate::envelope::Envelope;
use serde::{Deserialize, Serialize};

/// One message of the peer protocol, sent after the connection's handshake
/// (which says who sent it). Every message may be lost, duplicated or
/// reordered; every handler is idempotent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// Deltas of local writes, to merge. With `ack`, the receiver answers
    /// [`PeerMessage::Acked`] once they are stored (for writes with `w > 1`).
    Deltas {
        /// (key, delta) pairs.
        deltas: Vec<(String, Envelope)>,
        /// Correlates the acknowledgement, when one is wanted.
        ack: Option<u64>,
    },
    /// The deltas of `Deltas { ack: Some(id) }` are stored.
    Acked {
        /// The `ack` of the deltas.
        id: u64,
    },
    /// A step of anti-entropy.
    AntiEntropy(AntiEntropy),
    /// Asks for a key's state (a read with `consistency` above `local`).
    Read {
        /// Correlates the answer.
        id: u64,
        /// The key.
        key: String,
    },
    /// One part of a message whose body is too large for one frame (a key
    /// state of many megabytes, in anti-entropy, a read reply or a repair).
    /// The parts of a message travel back to back on one connection (only
    /// [`PeerMessage::Ping`] may come between them); the receiver joins them
    /// in order and handles the message once `total` bytes arrived, and
    /// drops a message whose parts were interrupted.
    Part {
        /// Which message, among the sender's messages in parts.
        message: u64,
        /// Which part of it, from 0.
        index: u32,
        /// Bytes of the whole message's body.
        total: u64,
        /// The next bytes of it.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A dialer's heartbeat: the acceptor answers with one byte on the same
    /// connection (see `peer.rs`), so each end can tell a live connection
    /// from a stalled one.
    Ping,
    /// A key's state (empty when the key was never written).
    ReadReply {
        /// The `id` of the read.
        id: u64,
        /// The state.
        state: Envelope,
    },
}
