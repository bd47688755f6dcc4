//! Reads that ask several replicas, and how complete their answer is.
//!
//! A read with `consistency` above `local` asks the key's replicas in parallel
//! and merges whatever arrives before its deadline. *Harvest* is the fraction of
//! replicas whose state the answer reflects (Fox and Brewer, *Harvest, Yield, and
//! Scalable Tolerant Systems*, 1999): rather than refusing (losing yield) when a
//! replica is slow or unreachable, calmkv answers with what it has and says how
//! much that is; `min_harvest` lets a client refuse answers below a bound.

use super::request::Strategy;
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
    /// Answers the consistency level alone asks for, out of `replicas`.
    pub fn required(self, replicas: usize) -> usize {
        match self {
            Consistency::Local | Consistency::One => 1.min(replicas),
            Consistency::Quorum => replicas / 2 + 1,
            Consistency::All => replicas,
        }
    }

    /// Answers (the local one included) a read needs to succeed, out of
    /// `replicas`, given the client's `min_harvest`:
    ///
    /// - `local`, `one`, `quorum`: what the level asks for, raised to reach
    ///   `min_harvest` when one is given (it can only tighten them);
    /// - `all`: every replica, unless `min_harvest` is given, which then
    ///   replaces it: `all&min_harvest=0.5` asks every replica and is
    ///   satisfied with whatever arrived by the deadline if it is at least
    ///   half (the harvest/yield trade-off, loosened by the client).
    pub fn needed(self, min_harvest: Option<f64>, replicas: usize) -> usize {
        let by_harvest = min_harvest.map(|h| answers_for_fraction(h, replicas));
        match (self, by_harvest) {
            (Consistency::All, Some(by_harvest)) => by_harvest,
            (level, by_harvest) => level.required(replicas).max(by_harvest.unwrap_or(0)),
        }
    }

    /// When a read stops waiting for its peers (the local replica having
    /// answered first): `all` waits for every one or the deadline; the other
    /// levels stop as soon as [`Consistency::needed`] is met, so `one`
    /// (satisfied by the local replica) asks nobody.
    pub fn strategy(self, min_harvest: Option<f64>, replicas: usize) -> Strategy {
        match self {
            Consistency::Local => Strategy::FirstOf(0),
            Consistency::All => Strategy::Every,
            level => Strategy::FirstOf(level.needed(min_harvest, replicas).saturating_sub(1)),
        }
    }
}

/// The fewest answers out of `replicas` whose fraction reaches `fraction`.
fn answers_for_fraction(fraction: f64, replicas: usize) -> usize {
    (0..=replicas)
        .find(|&answered| Harvest { answered, replicas }.fraction() + HARVEST_EPSILON >= fraction)
        .unwrap_or(replicas)
}

/// Slack when comparing a harvest with `min_harvest` (`2/3 >= 0.6666666`).
const HARVEST_EPSILON: f64 = 1e-9;

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

    /// Whether the answer satisfies the read's consistency and `min_harvest`
    /// (see [`Consistency::needed`]).
    pub fn satisfies(self, consistency: Consistency, min_harvest: Option<f64>) -> bool {
        self.answered >= consistency.needed(min_harvest, self.replicas)
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
        assert!(Harvest { answered: 2, replicas: 3 }.satisfies(Consistency::Quorum, None));
        assert!(!Harvest { answered: 1, replicas: 3 }.satisfies(Consistency::Quorum, None));
    }

    #[test]
    fn min_harvest_refuses_answers_below_it() {
        let harvest = Harvest { answered: 2, replicas: 3 };
        assert!(harvest.satisfies(Consistency::One, Some(0.6)));
        assert!(!harvest.satisfies(Consistency::One, Some(0.7)));
        assert!(Harvest { answered: 3, replicas: 3 }.satisfies(Consistency::All, Some(1.0)));
    }

    #[test]
    fn min_harvest_only_tightens_one_and_quorum() {
        assert_eq!(Consistency::One.needed(Some(0.0), 3), 1);
        assert_eq!(Consistency::Quorum.needed(Some(0.1), 3), 2);
        assert_eq!(Consistency::Quorum.needed(Some(0.9), 3), 3);
        assert_eq!(Consistency::One.needed(Some(0.5), 3), 2);
        assert_eq!(Consistency::Local.needed(Some(0.5), 3), 2, "local cannot reach it");
    }

    #[test]
    fn min_harvest_replaces_all() {
        assert_eq!(Consistency::All.needed(None, 3), 3);
        assert_eq!(Consistency::All.needed(Some(0.5), 3), 2);
        assert_eq!(Consistency::All.needed(Some(0.0), 3), 0);
        assert!(Harvest { answered: 2, replicas: 3 }.satisfies(Consistency::All, Some(0.5)));
        assert!(!Harvest { answered: 1, replicas: 3 }.satisfies(Consistency::All, Some(0.5)));
        assert!(!Harvest { answered: 2, replicas: 3 }.satisfies(Consistency::All, None));
    }

    #[test]
    fn a_read_waits_for_no_more_peers_than_its_level_needs() {
        assert_eq!(Consistency::Local.strategy(None, 3), Strategy::FirstOf(0));
        assert_eq!(Consistency::One.strategy(None, 3), Strategy::FirstOf(0));
        assert_eq!(Consistency::One.strategy(Some(0.6), 3), Strategy::FirstOf(1));
        assert_eq!(Consistency::Quorum.strategy(None, 3), Strategy::FirstOf(1));
        assert_eq!(Consistency::Quorum.strategy(None, 5), Strategy::FirstOf(2));
        assert_eq!(Consistency::All.strategy(Some(0.5), 3), Strategy::Every);
    }
}
