//! Last-writer-wins register ordered by hybrid logical clocks.

use crate::{Crdt, Hlc, NodeId};
use serde::{Deserialize, Serialize};

/// The order of a last-writer-wins write: its hybrid clock time, then the writing
/// node's id to break ties between nodes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Stamp {
    /// When the write happened, by the writer's hybrid clock.
    pub time: Hlc,
    /// The writer; breaks ties between equal times.
    pub node: NodeId,
}

/// One value (or a deletion) with its stamp.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry<T> {
    stamp: Stamp,
    /// `None` for a deletion.
    value: Option<T>,
}

/// A register that keeps the write with the highest [`Stamp`].
///
/// Concurrent writes are resolved silently by their stamps, so one of them is lost
/// without telling anybody: use it where that is the wanted behaviour, and an
/// [`MvRegister`](crate::MvRegister) where it is not. A write is always stamped
/// after everything the writing replica has seen, so a write that causally follows
/// another always wins over it, whatever the wall clocks say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwwRegister<T> {
    entry: Option<Entry<T>>,
}

impl<T> Default for LwwRegister<T> {
    fn default() -> Self {
        LwwRegister { entry: None }
    }
}

impl<T: Clone + Ord + std::fmt::Debug> LwwRegister<T> {
    /// An empty register.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current value; `None` when never written or deleted.
    pub fn get(&self) -> Option<&T> {
        self.entry.as_ref().and_then(|entry| entry.value.as_ref())
    }

    /// Whether the register was never written (deleted counts as written).
    pub fn is_unset(&self) -> bool {
        self.entry.is_none()
    }

    /// The stamp of the winning write, if any.
    pub fn stamp(&self) -> Option<Stamp> {
        self.entry.as_ref().map(|entry| entry.stamp)
    }

    /// Writes `value` at `now` (or just after the current winner, if that is later);
    /// returns the delta.
    pub fn set(&mut self, node: NodeId, now: Hlc, value: T) -> LwwRegister<T> {
        self.write(node, now, Some(value))
    }

    /// Deletes the value, as a write of "nothing"; returns the delta.
    pub fn delete(&mut self, node: NodeId, now: Hlc) -> LwwRegister<T> {
        self.write(node, now, None)
    }

    fn write(&mut self, node: NodeId, now: Hlc, value: Option<T>) -> LwwRegister<T> {
        let time = match self.stamp() {
            Some(current) if current.time >= now => current.time.successor(),
            _ => now,
        };
        let delta = LwwRegister { entry: Some(Entry { stamp: Stamp { time, node }, value }) };
        self.merge(&delta);
        delta
    }
}

impl<T: Clone + Ord + std::fmt::Debug> Crdt for LwwRegister<T> {
    fn merge(&mut self, other: &Self) {
        let Some(theirs) = &other.entry else { return };
        let replace = match &self.entry {
            None => true,
            // Equal stamps come from one write; comparing values keeps the merge
            // commutative even for states no honest replica produces.
            Some(mine) => (theirs.stamp, &theirs.value) > (mine.stamp, &mine.value),
        };
        if replace {
            self.entry = Some(theirs.clone());
        }
    }
}
