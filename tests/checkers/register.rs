//! Registers.
//!
//! Multi-value: every acknowledged write is in the settled state unless a
//! write that had seen it overwrote it; a write that an acknowledged write
//! overwrote is gone; nothing never written appears. Values must be unique
//! per write (the simulations write random ones).
//!
//! Last-writer-wins: the settled value is the write that is greatest in the
//! documented order (its stamp, whatever the writers' clocks said), among the
//! writes that may have taken effect.

use super::history::{History, Verdict};
use crate::violation;
use std::collections::BTreeSet;

/// An operation on one multi-value register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MvOp {
    /// Writes `value` with a context that had seen `covers`.
    Write { value: Vec<u8>, covers: BTreeSet<Vec<u8>> },
    /// Reads the values.
    Read,
}

/// What an operation returned: the values for a read.
pub type MvRet = Option<BTreeSet<Vec<u8>>>;

fn written(history: &History<MvOp, MvRet>, value: &[u8], before: u64) -> bool {
    history.events.iter().any(|e| {
        matches!(&e.op, MvOp::Write { value: v, .. } if v == value)
            && e.attempted()
            && e.invoked < before
    })
}

/// Checks one multi-value register, with `settled` its values after healing.
pub fn check_mv(history: &History<MvOp, MvRet>, settled: &BTreeSet<Vec<u8>>) -> Verdict {
    let events = &history.events;
    let mut values = BTreeSet::new();
    for e in events {
        if let MvOp::Write { value, .. } = &e.op {
            if !values.insert(value.clone()) {
                violation!("the history writes {value:?} twice; the checker needs unique values");
            }
        }
    }
    for read in events.iter().filter(|e| e.op == MvOp::Read) {
        let Some(Some(seen)) = read.ok() else { continue };
        for value in seen {
            if !written(history, value, read.completed) {
                violation!(
                    "read at t={} saw {value:?}, which no write before it wrote",
                    read.completed
                );
            }
        }
    }
    for value in settled {
        if !written(history, value, u64::MAX) {
            violation!("the settled register holds {value:?}, which was never written");
        }
    }
    let covered_by = |value: &Vec<u8>, acked_only: bool| {
        events.iter().any(|e| {
            matches!(&e.op, MvOp::Write { covers, .. } if covers.contains(value))
                && if acked_only { e.ok().is_some() } else { e.attempted() }
        })
    };
    for write in events.iter().filter(|e| e.ok().is_some()) {
        let MvOp::Write { value, .. } = &write.op else { continue };
        if !settled.contains(value) && !covered_by(value, false) {
            violation!("the write of {value:?} acknowledged at t={} is lost: nothing overwrote it, the settled values are {settled:?}", write.completed);
        }
    }
    for value in settled {
        if covered_by(value, true) {
            violation!("{value:?} was overwritten by an acknowledged write and is still there");
        }
    }
    Ok(())
}

/// An operation on one last-writer-wins register; `S` is the stamp order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LwwOp {
    /// Writes a value.
    Write(Vec<u8>),
    /// Reads the value.
    Read,
}

/// What an operation returned: the stamp the write got, or the value read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LwwRet<S> {
    /// The stamp an acknowledged write carries.
    Stamped(S),
    /// What a read saw.
    Value(Option<Vec<u8>>),
}

/// Checks one last-writer-wins register, with `settled` its value after
/// healing: it must be the write of the greatest stamp among the acknowledged
/// writes, unless an indeterminate write (stamp unknown) took its place.
pub fn check_lww<S: Ord + Clone + std::fmt::Debug>(
    history: &History<LwwOp, LwwRet<S>>,
    settled: Option<&[u8]>,
) -> Verdict {
    let events = &history.events;
    let acked: Vec<(&S, &Vec<u8>)> = events
        .iter()
        .filter_map(|e| match (&e.op, e.ok()) {
            (LwwOp::Write(v), Some(LwwRet::Stamped(s))) => Some((s, v)),
            _ => None,
        })
        .collect();
    let greatest = acked.iter().max_by(|a, b| a.0.cmp(b.0));
    let indeterminate: Vec<&Vec<u8>> = events
        .iter()
        .filter_map(|e| match (&e.op, &e.outcome) {
            (LwwOp::Write(v), super::Outcome::Indeterminate) => Some(v),
            _ => None,
        })
        .collect();
    match (greatest, settled) {
        (None, None) => Ok(()),
        (None, Some(v)) if indeterminate.iter().any(|w| w.as_slice() == v) => Ok(()),
        (None, Some(v)) => {
            violation!("the settled register holds {v:?} though no write was acknowledged")
        }
        (Some((stamp, value)), None) => {
            violation!(
                "the acknowledged write {value:?} (stamp {stamp:?}) is lost: the register is empty"
            )
        }
        (Some((stamp, value)), Some(v)) => {
            if value.as_slice() == v || indeterminate.iter().any(|w| w.as_slice() == v) {
                return Ok(());
            }
            match acked.iter().find(|(_, w)| w.as_slice() == v) {
                Some((other, _)) => violation!(
                    "the settled register holds {v:?} (stamp {other:?}), not the greatest acknowledged {value:?} (stamp {stamp:?})"
                ),
                None => violation!("the settled register holds {v:?}, which was never written"),
            }
        }
    }
}
