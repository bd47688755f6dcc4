//! Convergence: after healing and a quiet period every replica holds the same
//! state, key by key.

use super::history::Verdict;
use crate::violation;
use std::collections::BTreeMap;

/// Checks that every replica's `(key → state)` map equals the first's.
pub fn check<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    replicas: &[BTreeMap<K, V>],
) -> Verdict {
    let Some((first, rest)) = replicas.split_first() else { return Ok(()) };
    for (i, other) in rest.iter().enumerate() {
        for (key, state) in first {
            match other.get(key) {
                Some(s) if s == state => {}
                Some(s) => violation!(
                    "replicas 0 and {} differ at {key:?}: {state:?} against {s:?}",
                    i + 1
                ),
                None => violation!("replica {} lacks {key:?}, which replica 0 holds", i + 1),
            }
        }
        if let Some(key) = other.keys().find(|k| !first.contains_key(k)) {
            violation!("replica {} holds {key:?}, which replica 0 lacks", i + 1);
        }
    }
    Ok(())
}
