//! Causal contexts: exactly which dots a replica has seen.
//!
//! A version vector alone can only say "all of `1..=n`". Delta states are delivered
//! out of order, so a replica may have seen dot 7 of a node but not dot 6; the
//! *cloud* holds such outstanding dots until the gap closes and they fold into the
//! vector (Almeida, Shoker, Baquero: *Delta State Replicated Data Types*, 2018, §6).

use crate::{CrdtError, Dot, NodeId, VersionVector};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A version vector plus the outstanding dots that are not contiguous with it.
///
/// Invariant (kept by every method and by decoding): no dot of the cloud is covered
/// by the vector, and no cloud dot directly follows its node's vector entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "RawContext")]
pub struct CausalContext {
    vv: VersionVector,
    cloud: BTreeSet<Dot>,
}

#[derive(Deserialize)]
struct RawContext {
    vv: VersionVector,
    cloud: BTreeSet<Dot>,
}

impl From<RawContext> for CausalContext {
    fn from(raw: RawContext) -> Self {
        let mut ctx = CausalContext { vv: raw.vv, cloud: raw.cloud };
        ctx.compact();
        ctx
    }
}

impl CausalContext {
    /// The empty context: nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// A context that has seen exactly the given dots.
    pub fn from_dots(dots: impl IntoIterator<Item = Dot>) -> Self {
        let mut ctx = CausalContext::new();
        ctx.cloud.extend(dots);
        ctx.compact();
        ctx
    }

    /// The contiguous part of what was seen.
    pub fn vv(&self) -> &VersionVector {
        &self.vv
    }

    /// The dots seen beyond the contiguous part.
    pub fn cloud(&self) -> &BTreeSet<Dot> {
        &self.cloud
    }

    /// Whether the dot was seen.
    pub fn contains(&self, dot: &Dot) -> bool {
        self.vv.contains(dot) || self.cloud.contains(dot)
    }

    /// Records one dot as seen.
    pub fn insert(&mut self, dot: Dot) {
        if self.vv.contains(&dot) {
            return;
        }
        self.cloud.insert(dot);
        self.compact_node(dot.node);
    }

    /// The dot a new update by `node` takes: one past the highest dot of `node` seen.
    ///
    /// Refused with [`CrdtError::DotsExhausted`] when the context claims the
    /// node's last possible dot. No real node gets there; only a forged context
    /// can, and nodes never accept one (see [`CausalContext::restricted_to`]),
    /// but the answer is an error either way, never a panic.
    pub fn next_dot(&self, node: NodeId) -> Result<Dot, CrdtError> {
        let counter = self.highest(node).checked_add(1).ok_or(CrdtError::DotsExhausted { node })?;
        Ok(Dot { node, counter })
    }

    /// The part of `self` that `bound` has also seen: every dot of the result is
    /// in both. A context a client sends back is restricted to the replica's own
    /// context before it is used, so it can claim no dot the replica has not
    /// seen: it cannot name dots from the future, exhaust a node's counter, or
    /// grow the replica's context.
    ///
    /// Costs O(|self| log |bound|) for the vector part plus the cloud dots of
    /// `bound` inside the claimed ranges, whatever the counters claimed.
    pub fn restricted_to(&self, bound: &CausalContext) -> CausalContext {
        let mut out = CausalContext::new();
        for (node, claimed) in self.vv.iter() {
            let contiguous = claimed.min(bound.vv.get(node));
            out.vv.observe(node, contiguous);
            if claimed > contiguous {
                let above = Dot { node, counter: contiguous + 1 }..=Dot { node, counter: claimed };
                out.cloud.extend(bound.cloud.range(above).copied());
            }
        }
        out.cloud.extend(self.cloud.iter().filter(|dot| bound.contains(dot)).copied());
        out.compact();
        out
    }

    /// Entries this context holds: nodes of its vector plus outstanding dots.
    /// The measure a key's context is bounded by ([`Limits::context_entries_max`]).
    ///
    /// [`Limits::context_entries_max`]: crate::Limits::context_entries_max
    pub fn entries(&self) -> usize {
        self.vv.len() + self.cloud.len()
    }

    /// The highest counter of `node` seen, contiguous or not (0 when none).
    pub fn highest(&self, node: NodeId) -> u64 {
        let in_cloud = self
            .cloud
            .range(Dot { node, counter: 1 }..=Dot { node, counter: u64::MAX })
            .next_back()
            .map(|dot| dot.counter);
        in_cloud.unwrap_or(0).max(self.vv.get(node))
    }

    /// Union: afterwards `self` has seen every dot either context had seen.
    pub fn join(&mut self, other: &CausalContext) {
        self.vv.join(&other.vv);
        self.cloud.extend(other.cloud.iter().copied());
        self.compact();
    }

    /// Whether every dot `other` has seen was seen by `self`.
    pub fn dominates(&self, other: &CausalContext) -> bool {
        let vv_covered = other.vv.iter().all(|(node, counter)| {
            counter <= self.vv.get(node)
                || (self.vv.get(node) + 1..=counter)
                    .all(|c| self.cloud.contains(&Dot { node, counter: c }))
        });
        vv_covered && other.cloud.iter().all(|dot| self.contains(dot))
    }

    /// How many dots this context has seen.
    pub fn dot_count(&self) -> u128 {
        let contiguous: u128 = self.vv.iter().map(|(_, counter)| u128::from(counter)).sum();
        contiguous + self.cloud.len() as u128
    }

    /// Every dot seen, node by node. As long as [`CausalContext::dot_count`].
    pub fn iter_dots(&self) -> impl Iterator<Item = Dot> + '_ {
        let contiguous = self
            .vv
            .iter()
            .flat_map(|(node, top)| (1..=top).map(move |counter| Dot { node, counter }));
        contiguous.chain(self.cloud.iter().copied())
    }

    /// Whether nothing has been seen.
    pub fn is_empty(&self) -> bool {
        self.vv.is_empty() && self.cloud.is_empty()
    }

    /// Folds cloud dots that close a gap into the vector and drops covered ones.
    pub fn compact(&mut self) {
        let nodes: BTreeSet<NodeId> = self.cloud.iter().map(|dot| dot.node).collect();
        for node in nodes {
            self.compact_node(node);
        }
    }

    fn compact_node(&mut self, node: NodeId) {
        let mut top = self.vv.get(node);
        let range = Dot { node, counter: 1 }..=Dot { node, counter: u64::MAX };
        let mine: Vec<Dot> = self.cloud.range(range).copied().collect();
        for dot in mine {
            if dot.counter <= top {
                self.cloud.remove(&dot);
            } else if dot.counter == top + 1 {
                self.cloud.remove(&dot);
                top += 1;
            } else {
                break;
            }
        }
        self.vv.observe(node, top);
    }
}

impl From<VersionVector> for CausalContext {
    fn from(vv: VersionVector) -> Self {
        CausalContext { vv, cloud: BTreeSet::new() }
    }
}
