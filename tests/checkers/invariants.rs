//! Declared invariants, judged on every observation of every replica: a
//! balance never below its minimum, a set never above its size, a unique
//! name with one owner forever.

use super::history::{Time, Verdict};
use crate::violation;
use std::collections::{BTreeMap, BTreeSet};

/// A declaration, over the keys that start with `prefix`.
#[derive(Clone, Debug)]
pub enum Rule {
    /// A counter never below `min`.
    CounterMin { prefix: String, min: i64 },
    /// A counter never above `max`.
    CounterMax { prefix: String, max: i64 },
    /// A set of at most `max` members.
    SetMaxSize { prefix: String, max: usize },
    /// A register claimed once: at most one value, and the same one on every
    /// replica at every time once it has one.
    Unique { prefix: String },
}

/// What a replica held for a key at some time.
#[derive(Clone, Debug)]
pub enum Observed {
    /// A counter's value.
    Counter(i64),
    /// A set's members.
    Set(BTreeSet<String>),
    /// A register's values.
    Register(BTreeSet<Vec<u8>>),
}

/// One look at one key on one replica.
#[derive(Clone, Debug)]
pub struct Observation {
    /// The replica.
    pub replica: usize,
    /// When.
    pub at: Time,
    /// The key.
    pub key: String,
    /// What it held.
    pub value: Observed,
}

/// Checks every observation against every rule whose prefix covers its key.
pub fn check(rules: &[Rule], observations: &[Observation]) -> Verdict {
    let mut owners: BTreeMap<&str, &Vec<u8>> = BTreeMap::new();
    for o in observations {
        for rule in rules {
            match (rule, &o.value) {
                (Rule::CounterMin { prefix, min }, Observed::Counter(v))
                    if o.key.starts_with(prefix.as_str()) && v < min =>
                {
                    violation!(
                        "replica {} held {} = {v} at t={}, below its minimum {min}",
                        o.replica,
                        o.key,
                        o.at
                    )
                }
                (Rule::CounterMax { prefix, max }, Observed::Counter(v))
                    if o.key.starts_with(prefix.as_str()) && v > max =>
                {
                    violation!(
                        "replica {} held {} = {v} at t={}, above its maximum {max}",
                        o.replica,
                        o.key,
                        o.at
                    )
                }
                (Rule::SetMaxSize { prefix, max }, Observed::Set(m))
                    if o.key.starts_with(prefix.as_str()) && m.len() > *max =>
                {
                    violation!(
                        "replica {} held {} members in {} at t={}, more than {max}",
                        o.replica,
                        m.len(),
                        o.key,
                        o.at
                    )
                }
                (Rule::Unique { prefix }, Observed::Register(values))
                    if o.key.starts_with(prefix.as_str()) =>
                {
                    if values.len() > 1 {
                        violation!(
                            "replica {} held {} owners of {} at t={}: {values:?}",
                            o.replica,
                            values.len(),
                            o.key,
                            o.at
                        );
                    }
                    if let Some(value) = values.iter().next() {
                        match owners.get(o.key.as_str()) {
                            Some(owner) if *owner != value => violation!(
                                "{} changed owner: {owner:?} elsewhere, {value:?} on replica {} at t={}",
                                o.key, o.replica, o.at
                            ),
                            Some(_) => {}
                            None => {
                                owners.insert(o.key.as_str(), value);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}
