//! Sets (add-wins): no acknowledged add lost, nothing never added appears,
//! and an add once read on a replica stays there.

use super::history::{History, Verdict};
use crate::violation;
use std::collections::BTreeSet;

/// An operation on one set key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetOp {
    /// Adds a member.
    Add(String),
    /// Removes a member (the adds the replica has seen).
    Remove(String),
    /// Reads the members.
    Read,
}

/// What an operation returned: the members for a read, nothing otherwise.
pub type SetRet = Option<BTreeSet<String>>;

/// Checks one key's history, with `settled` the state every replica holds
/// after healing. `stable_across_crash`: the replicas acknowledged only what
/// was durable (`sync`), so a crash may not take back what a read showed.
pub fn check(
    history: &History<SetOp, SetRet>,
    settled: &BTreeSet<String>,
    stable_across_crash: bool,
) -> Verdict {
    let events = &history.events;
    // Nothing never added appears, in any read or in the settled state.
    for read in events.iter().filter(|e| e.op == SetOp::Read) {
        let Some(Some(members)) = read.ok() else { continue };
        for member in members {
            let added = events.iter().any(|e| {
                e.op == SetOp::Add(member.clone()) && e.attempted() && e.invoked < read.completed
            });
            if !added {
                violation!(
                    "read #{} at t={} saw {member:?}, which no add before it wrote",
                    read.invoked,
                    read.completed
                );
            }
        }
    }
    for member in settled {
        if !events.iter().any(|e| e.op == SetOp::Add(member.clone()) && e.attempted()) {
            violation!("the settled set holds {member:?}, which was never added");
        }
    }
    // No acknowledged add lost: an add survives unless a remove that could have
    // seen it (invoked after it was acknowledged) came later.
    for add in events.iter().filter(|e| matches!(e.op, SetOp::Add(_)) && e.ok().is_some()) {
        let SetOp::Add(member) = &add.op else { unreachable!() };
        if settled.contains(member) {
            continue;
        }
        let removed_after = events.iter().any(|e| {
            e.op == SetOp::Remove(member.clone()) && e.attempted() && add.completed < e.invoked
        });
        if !removed_after {
            violation!("the add of {member:?} acknowledged at t={} is lost: the settled set is {settled:?} and no later remove ran", add.completed);
        }
    }
    // Stable once read: a later read on the same replica still holds a member
    // unless a remove of it may have run in between.
    for (i, first) in events.iter().enumerate().filter(|(_, e)| e.op == SetOp::Read) {
        let Some(Some(seen)) = first.ok() else { continue };
        for later in
            events[i + 1..].iter().filter(|e| e.op == SetOp::Read && e.process == first.process)
        {
            let Some(Some(now)) = later.ok() else { continue };
            if !stable_across_crash
                && history.crashed_between(first.process, first.completed, later.invoked)
            {
                continue;
            }
            for member in seen.difference(now) {
                let removed = events.iter().any(|e| {
                    e.op == SetOp::Remove(member.clone())
                        && e.attempted()
                        && e.invoked < later.completed
                });
                if !removed {
                    violation!("replica {} showed {member:?} at t={} and not at t={}, with no remove between", first.process, first.completed, later.completed);
                }
            }
        }
    }
    Ok(())
}
