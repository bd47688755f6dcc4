//! Node identities and dots: the unique name of one update.
//!
//! A [`Dot`] `(node, counter)` names the `counter`-th update that `node` made to
//! one object. Counters start at 1 and grow by one per update, so the set of dots a
//! replica has seen from a node is usually a prefix `1..=n`, which is what lets a
//! [`VersionVector`](crate::VersionVector) summarise it in one number.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A replica's identity: a random 64-bit id created on first start and persisted,
/// so a node whose data was wiped never reuses the dots of its former self.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl From<u64> for NodeId {
    fn from(id: u64) -> Self {
        NodeId(id)
    }
}

/// The name of one update: the `counter`-th update made by `node` to one object.
///
/// Dots order first by node, then by counter; that order has no causal meaning and
/// exists so dots can live in ordered sets. A counter is never 0: decoding rejects it.
///
/// Encoded as the pair `[node, counter]` rather than with named fields: dots are
/// most of the bytes of a set or map, and the pair will never gain a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawDot", into = "RawDot")]
pub struct Dot {
    /// The node that made the update.
    pub node: NodeId,
    /// The update's position among that node's updates to the object, from 1.
    pub counter: u64,
}

impl Dot {
    /// The dot `(node, counter)`.
    ///
    /// # Panics
    /// When `counter` is 0: dots count from 1, and 0 means "nothing seen".
    pub fn new(node: impl Into<NodeId>, counter: u64) -> Self {
        assert!(counter > 0, "dot counters start at 1");
        Dot { node: node.into(), counter }
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.counter)
    }
}

#[derive(Clone, Copy, Serialize, Deserialize)]
struct RawDot(NodeId, u64);

impl TryFrom<RawDot> for Dot {
    type Error = &'static str;

    fn try_from(RawDot(node, counter): RawDot) -> Result<Self, Self::Error> {
        if counter == 0 {
            return Err("a dot's counter must be at least 1");
        }
        Ok(Dot { node, counter })
    }
}

impl From<Dot> for RawDot {
    fn from(dot: Dot) -> Self {
        RawDot(dot.node, dot.counter)
    }
}
