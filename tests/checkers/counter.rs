//! Counters: every read lies between what was certainly counted and what may
//! have been.
//!
//! A read on replica `p` must include at least `p`'s own acknowledged
//! increments and at most every increment attempted anywhere before it
//! answered; decrements mirror that. Once healed, the settled value lies
//! between every acknowledged update and every attempted one.

use super::history::{History, Verdict};
use crate::violation;

/// An operation on one counter key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CounterOp {
    /// Adds a (possibly negative) amount.
    Add(i64),
    /// Reads the value.
    Read,
}

/// What an operation returned: the value for a read.
pub type CounterRet = Option<i64>;

/// The bounds a value must lie in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Acknowledged increments minus attempted decrements.
    pub low: i128,
    /// Attempted increments minus acknowledged decrements.
    pub high: i128,
}

/// The bounds over every update (the settled value's).
pub fn settled_bounds(history: &History<CounterOp, CounterRet>) -> Bounds {
    let mut bounds = Bounds { low: 0, high: 0 };
    for e in &history.events {
        let CounterOp::Add(n) = e.op else { continue };
        let n = i128::from(n);
        let acked = e.ok().is_some();
        if n >= 0 {
            bounds.high += if e.attempted() { n } else { 0 };
            bounds.low += if acked { n } else { 0 };
        } else {
            bounds.low += if e.attempted() { n } else { 0 };
            bounds.high += if acked { n } else { 0 };
        }
    }
    bounds
}

/// Checks one key's history, with `settled` the value after healing.
/// `stable_across_crash` as for sets: whether a replica's own acknowledged
/// updates survive its crashes.
pub fn check(
    history: &History<CounterOp, CounterRet>,
    settled: i64,
    stable_across_crash: bool,
) -> Verdict {
    let events = &history.events;
    for read in events.iter().filter(|e| e.op == CounterOp::Read) {
        let Some(Some(value)) = read.ok() else { continue };
        let value = i128::from(*value);
        let (mut low, mut high) = (0i128, 0i128);
        for e in events.iter().filter(|e| e.invoked < read.completed) {
            let CounterOp::Add(n) = e.op else { continue };
            let n = i128::from(n);
            let own = e.process == read.process
                && e.precedes(read)
                && (stable_across_crash
                    || !history.crashed_between(read.process, e.completed, read.invoked));
            if n >= 0 {
                high += if e.attempted() { n } else { 0 };
                low += if own { n } else { 0 };
            } else {
                low += if e.attempted() { n } else { 0 };
                high += if own { n } else { 0 };
            }
        }
        if value < low || value > high {
            violation!(
                "replica {} read {value} at t={}, outside [{low}, {high}]",
                read.process,
                read.completed
            );
        }
    }
    let bounds = settled_bounds(history);
    let value = i128::from(settled);
    if value < bounds.low || value > bounds.high {
        violation!("the settled value {value} is outside [{}, {}]", bounds.low, bounds.high);
    }
    Ok(())
}
