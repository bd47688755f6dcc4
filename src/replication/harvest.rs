//! Reads that ask several replicas, and how complete their answer is.
//!
//! A read with `consistency` above `local` asks the key's replicas in parallel
//! and merges whatever arrives before its deadline. *Harvest* is the fraction of
//! replicas whose state the answer reflects (Fox and Brewer, *Harvest, Yield, and
//! Scalable Tolerant Systems*, 1999): rather than refusing (losing yield) when a
//! replica is slow or unreachable, calmkv answers with what it has and says how
//! much that is; `min_harvest` lets a client refuse answers below a bound.

use serde::Deserialize;
use std::fmt;

/// How many replicas a read waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Only the local replica; no network.
    #[default]
    Local,
    /// Any one replica (the local one counts).
    One,
    /// A majority of the replicas.
    Quorum,
    /// Every replica.
    All,
}

impl Consistency {
    /// Answers a read needs before the deadline for this level, out of `replicas`.
    pub fn required(self, replicas: usize) -> usize {
        match self {
            Consistency::Local | Consistency::One => 1.min(replicas),
            Consistency::Quorum => replicas / 2 + 1,
            Consistency::All => replicas,
        }
    }
}

/// How complete an answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Harvest {
    /// Replicas whose state the answer reflects.
    pub answered: usize,
    /// Replicas of the key.
    pub replicas: usize,
}

impl Harvest {
    /// The fraction of replicas reflected, in 0..=1.
    pub fn fraction(self) -> f64 {
        if self.replicas == 0 {
            return 1.0;
        }
        self.answered as f64 / self.replicas as f64
    }

    /// Whether the answer satisfies the read's consistency and `min_harvest`.
    pub fn satisfies(self, consistency: Consistency, min_harvest: f64) -> bool {
        self.answered >= consistency.required(self.replicas)
            && self.fraction() + 1e-9 >= min_harvest
    }

    /// `X-Harvest`: the fraction with two decimals, e.g. `0.67`.
    pub fn header(self) -> String {
        format!("{:.2}", self.fraction())
    }

    /// `X-Replicas`: answered over replicas, e.g. `2/3`.
    pub fn replicas_header(self) -> String {
        format!("{}/{}", self.answered, self.replicas)
    }
}

impl fmt::Display for Harvest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.header(), self.replicas_header())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_of_three_replicas_is_a_harvest_of_0_67() {
        let harvest = Harvest { answered: 2, replicas: 3 };
        assert_eq!(harvest.header(), "0.67");
        assert_eq!(harvest.replicas_header(), "2/3");
    }

    #[test]
    fn quorum_needs_a_majority() {
        assert_eq!(Consistency::Quorum.required(3), 2);
        assert_eq!(Consistency::Quorum.required(4), 3);
        assert_eq!(Consistency::Quorum.required(1), 1);
        assert!(Harvest { answered: 2, replicas: 3 }.satisfies(Consistency::Quorum, 0.0));
        assert!(!Harvest { answered: 1, replicas: 3 }.satisfies(Consistency::Quorum, 0.0));
    }

    #[test]
    fn min_harvest_refuses_answers_below_it() {
        let harvest = Harvest { answered: 2, replicas: 3 };
        assert!(harvest.satisfies(Consistency::One, 0.6));
        assert!(!harvest.satisfies(Consistency::One, 0.7));
        assert!(Harvest { answered: 3, replicas: 3 }.satisfies(Consistency::All, 1.0));
    }
}
