//! Linearizability of coordinated operations: is there an order of the
//! operations, consistent with real time (an operation acknowledged before
//! another was invoked comes first), in which a sequential model returns what
//! every acknowledged operation returned? Indeterminate operations may take
//! effect at any point after their invocation, or never.
//!
//! The search is Wing and Gong's: repeatedly pick an operation none of whose
//! remaining predecessors is unlinearized, step the model, backtrack on a
//! mismatch; states already explored (which operations are done, the model's
//! state) are remembered, as Lowe's refinement does, which keeps the search
//! small for the histories the simulations make; and an operation that fits
//! without changing the state (a read, a losing claim) is taken at once
//! rather than branched on, which keeps many concurrent losers from making
//! the search exponential. Check each key on its own
//! (linearizability is compositional).

use super::history::{History, Outcome, Verdict};
use crate::violation;
use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model: Clone + Eq + Hash {
    /// An operation.
    type Op;
    /// What an operation returns.
    type Ret;
    /// Applies `op`; `Some(next state)` when `ret` is what the model returns
    /// (`ret` is `None` for an indeterminate operation, which accepts any
    /// return), `None` when it is not.
    fn step(&self, op: &Self::Op, ret: Option<&Self::Ret>) -> Option<Self>;
}

/// The most operations one search takes (one key's history).
pub const OPERATIONS_MAX: usize = 128;

/// Checks `history` against `model` started in `initial`. Failed operations
/// changed nothing and are left out.
pub fn check<M: Model>(initial: M, history: &History<M::Op, M::Ret>) -> Verdict
where
    M::Op: std::fmt::Debug,
{
    let events: Vec<_> = history.events.iter().filter(|e| e.attempted()).collect();
    if events.len() > OPERATIONS_MAX {
        violation!(
            "{} operations on one key; the search takes at most {OPERATIONS_MAX}",
            events.len()
        );
    }
    let n = events.len();
    let full: u128 = if n == 128 { u128::MAX } else { (1u128 << n) - 1 };
    let mut seen: HashSet<(u128, M)> = HashSet::new();
    // Depth-first over (done set, state), with an explicit stack.
    let mut stack = vec![(0u128, initial)];
    while let Some((done, state)) = stack.pop() {
        // Finished when every acknowledged operation is linearized; the
        // indeterminate ones left may never have taken effect.
        let remaining_acked = (0..n).any(|i| done & (1 << i) == 0 && events[i].ok().is_some());
        if !remaining_acked || done == full {
            return Ok(());
        }
        if !seen.insert((done, state.clone())) {
            continue;
        }
        // The earliest completion among the remaining: an operation invoked
        // after it cannot go next.
        let horizon = (0..n)
            .filter(|&i| done & (1 << i) == 0)
            .map(|i| events[i].completed)
            .min()
            .unwrap_or(u64::MAX);
        let mut successors = Vec::new();
        for i in (0..n).filter(|&i| done & (1 << i) == 0) {
            let e = events[i];
            if e.invoked > horizon {
                continue;
            }
            let ret = match &e.outcome {
                Outcome::Ok(r) => Some(r),
                _ => None,
            };
            if let Some(next) = state.step(&e.op, ret) {
                if next == state {
                    // It changes nothing and fits now: taking it now loses no
                    // linearization (every later place had the same state and
                    // nothing has to precede it), so do not branch on it.
                    successors = vec![(done | (1 << i), next)];
                    break;
                }
                successors.push((done | (1 << i), next));
            }
        }
        stack.extend(successors);
    }
    let first: Vec<_> = events.iter().take(6).map(|e| (&e.op, e.invoked, e.completed)).collect();
    violation!("no linearization of these {n} operations exists (first: {first:?})")
}

/// A name claimed once: put-if-absent and read, the sequential model of the
/// `unique` declaration.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Claim {
    /// The owner, once claimed.
    pub owner: Option<String>,
}

/// An operation on a [`Claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOp {
    /// Claims for `who`; returns whether the claim won.
    Claim(String),
    /// Reads the owner.
    Read,
}

/// What a [`ClaimOp`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimRet {
    /// Whether the claim won.
    Won(bool),
    /// The owner read.
    Owner(Option<String>),
}

impl Model for Claim {
    type Op = ClaimOp;
    type Ret = ClaimRet;

    fn step(&self, op: &ClaimOp, ret: Option<&ClaimRet>) -> Option<Claim> {
        match op {
            ClaimOp::Claim(who) => {
                let wins = self.owner.is_none();
                if ret.is_some_and(|r| *r != ClaimRet::Won(wins)) {
                    return None;
                }
                Some(if wins { Claim { owner: Some(who.clone()) } } else { self.clone() })
            }
            ClaimOp::Read => {
                if ret.is_some_and(|r| *r != ClaimRet::Owner(self.owner.clone())) {
                    return None;
                }
                Some(self.clone())
            }
        }
    }
}
