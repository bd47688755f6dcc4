//! The identity a node gossips under: persisted node id, gossip address,
//! per-boot `bump`, and the metadata the rest of calmkv needs to reach it.
//!
//! foca keys members by [`foca::Identity::addr`], here the gossip address:
//! an `Announce` to a seed is accepted by whoever listens on that address,
//! so we can join through a seed whose node id we do not know. When two
//! identities share an address, the one with the larger `bump` wins, so a
//! restarted node (same address, larger bump) replaces its previous life at
//! once instead of waiting for the cluster to forget it.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// What a node tells the cluster about itself besides its gossip address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Where the node serves its HTTP API.
    pub http_addr: SocketAddr,
    /// Where the node accepts the peer (replication) channel.
    pub peer_addr: SocketAddr,
    /// Hash of the node's invariant declarations; peers that disagree are
    /// refused by the node (docs/design.md §6). This crate only carries it.
    pub invariants_hash: u64,
}

impl NodeMeta {
    /// Metadata with unspecified addresses, used for placeholders.
    pub const fn unspecified() -> NodeMeta {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        NodeMeta { http_addr: addr, peer_addr: addr, invariants_hash: 0 }
    }
}

/// A node's identity in the SWIM protocol.
///
/// Encoded compactly (a MessagePack array of about 60 bytes) since every
/// gossip packet carries two or three of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// The persisted node id (docs/design.md §3).
    pub node_id: u64,
    /// The address the node receives gossip on; foca's `Addr`.
    pub gossip_addr: SocketAddr,
    /// Per-boot (and per-rejoin) counter: larger wins an address conflict.
    pub bump: u64,
    /// Addresses and invariant hash of the node.
    pub meta: NodeMeta,
}

impl NodeIdentity {
    /// A stand-in for "whoever listens on `addr`", used to announce to seeds
    /// whose identity we do not know yet. foca accepts an `Announce` whose
    /// destination has the receiver's address, whatever the rest says.
    pub fn placeholder(addr: SocketAddr) -> NodeIdentity {
        NodeIdentity { node_id: 0, gossip_addr: addr, bump: 0, meta: NodeMeta::unspecified() }
    }

    /// The same node with `bump + 1` (None at `u64::MAX`).
    pub fn bumped(&self) -> Option<NodeIdentity> {
        Some(NodeIdentity { bump: self.bump.checked_add(1)?, ..*self })
    }

    /// Total order used to settle address conflicts: bump first, then the
    /// remaining fields so that two distinct identities never both win.
    fn conflict_key(&self) -> (u64, u64, NodeMeta) {
        (self.bump, self.node_id, self.meta)
    }
}

impl foca::Identity for NodeIdentity {
    type Addr = SocketAddr;

    /// foca calls this when it learns it was declared down: the node comes
    /// back at once under `bump + 1`, which wins the address conflict.
    fn renew(&self) -> Option<Self> {
        self.bumped()
    }

    fn addr(&self) -> SocketAddr {
        self.gossip_addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.conflict_key() > adversary.conflict_key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    fn id(node_id: u64, bump: u64) -> NodeIdentity {
        NodeIdentity {
            node_id,
            gossip_addr: "127.0.0.1:7000".parse().unwrap(),
            bump,
            meta: NodeMeta::unspecified(),
        }
    }

    #[test]
    fn renewed_identity_wins_the_conflict() {
        let a = id(1, 5);
        let b = a.renew().unwrap();
        assert_eq!(b.bump, 6);
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
    }

    #[test]
    fn conflicts_between_distinct_identities_have_exactly_one_winner() {
        let pairs = [(id(1, 5), id(2, 5)), (id(1, 5), id(1, 4)), (id(3, 0), id(2, 1))];
        for (a, b) in pairs {
            assert_ne!(a.win_addr_conflict(&b), b.win_addr_conflict(&a));
        }
    }

    #[test]
    fn bump_does_not_overflow() {
        assert!(id(1, u64::MAX).renew().is_none());
    }
}
