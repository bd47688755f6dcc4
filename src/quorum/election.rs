//! Elections with a pre-vote: a voter asks the others whether they would vote
//! for it before it starts a real election, so a voter that was cut off does
//! not raise its term while it cannot win, and cannot depose a healthy leader
//! when it returns (Ongaro's thesis, §9.6).
//!
//! openraft 0.9 has a leader lease (a voter that heard from a leader within
//! `election_timeout_max` refuses votes) but no pre-vote: a cut-off follower
//! starts an election every timeout, its term climbs, and when it reconnects
//! the leader sees the higher term in its answers and steps down. So openraft's
//! own elections are turned off (`enable_elect = false`) and this module runs
//! them: when a voter has heard from no leader for a randomized timeout past
//! the lease, it sends [`PreVote`] to the other voters; each grants it only if
//! it has not heard from a leader for the lease either, is not the leader, and
//! the candidate's log is at least as up to date; with a majority, the voter
//! triggers a real openraft election. Nothing about Raft's safety changes: the
//! real election is openraft's, with its own checks.

use super::network::{Client, Request, Response};
use super::store::QuorumStore;
use super::types::TypeConfig;
use super::Timings;
use crate::replication::frame::ClusterSecret;
use openraft::{BasicNode, LogId, Raft, RaftMetrics};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A candidate's question: would you vote for me at `term`?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVote {
    /// The candidate's Raft id.
    pub candidate: u64,
    /// The term it would stand in (its current term plus one); its own term
    /// does not change by asking.
    pub term: u64,
    /// Its last log entry.
    pub last_log_id: Option<LogId<u64>>,
}

/// When this voter last heard from a leader (or was one).
#[derive(Debug)]
pub struct Contact {
    last: Mutex<Instant>,
}

impl Contact {
    /// Contact now: a voter starts as if it had just heard from a leader, so
    /// it waits a whole timeout before its first pre-vote.
    pub fn new() -> Contact {
        Contact { last: Mutex::new(Instant::now()) }
    }

    /// A leader was heard from (or this voter leads).
    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Time since a leader was last heard from.
    pub fn since(&self) -> Duration {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }
}

impl Default for Contact {
    fn default() -> Contact {
        Contact::new()
    }
}

/// The lease: how long a voter that heard from a leader refuses to help
/// elect another (openraft's `election_timeout_max`, twice the lower end).
pub fn lease(timings: &Timings) -> Duration {
    2 * timings.election_min
}

/// Whether this voter grants `request`: it leads no group, has heard from no
/// leader for the lease, the candidate's term is past its own, and the
/// candidate's log is at least as up to date as its own.
pub fn grant(
    request: &PreVote,
    own_term: u64,
    own_last_log_id: Option<LogId<u64>>,
    leading: bool,
    since_contact: Duration,
    lease: Duration,
) -> bool {
    !leading
        && since_contact >= lease
        && request.term > own_term
        && request.last_log_id >= own_last_log_id
}

/// The id of the last log entry, as far as this voter's log tells.
pub fn last_log_id(
    metrics: &RaftMetrics<u64, BasicNode>,
    store: &QuorumStore,
) -> Option<LogId<u64>> {
    let index = metrics.last_log_index?;
    store
        .log_id_at(index)
        .or(metrics.snapshot.filter(|s| s.index == index))
        .or(metrics.purged.filter(|s| s.index == index))
}

fn timeout(timings: &Timings) -> Duration {
    let spread = timings.election_min.as_millis().max(1) as u64;
    lease(timings) + Duration::from_millis(rand::rng().random_range(0..spread))
}

/// Runs this voter's elections until the task is aborted: a pre-vote round
/// after each randomized timeout without a leader, and an openraft election
/// when a majority grants it.
pub async fn campaign(
    raft: Raft<TypeConfig>,
    store: QuorumStore,
    contact: std::sync::Arc<Contact>,
    id: u64,
    timings: Timings,
    secret: Option<ClusterSecret>,
) {
    let tick = (timings.election_min / 8).max(Duration::from_millis(5));
    let mut wait = timeout(&timings);
    let mut last_round: Option<Instant> = None;
    loop {
        tokio::time::sleep(tick).await;
        let metrics = raft.metrics().borrow().clone();
        if metrics.state.is_leader() {
            contact.touch();
            continue;
        }
        let membership = metrics.membership_config.membership().clone();
        if !membership.voter_ids().any(|v| v == id) {
            continue;
        }
        let quiet = contact.since().min(last_round.map_or(Duration::MAX, |t| t.elapsed()));
        if quiet < wait {
            continue;
        }
        last_round = Some(Instant::now());
        wait = timeout(&timings);
        let Some(term) = metrics.current_term.checked_add(1) else { continue };
        let request = PreVote { candidate: id, term, last_log_id: last_log_id(&metrics, &store) };
        let others: Vec<String> = membership
            .voter_ids()
            .filter(|v| *v != id)
            .filter_map(|v| membership.get_node(&v).map(|n| n.addr.clone()))
            .collect();
        let voters = others.len() + 1;
        let mut granted = 1;
        let mut answers = tokio::task::JoinSet::new();
        for addr in others {
            let (request, secret) = (Request::PreVote(request.clone()), secret.clone());
            let within = timings.election_min;
            answers.spawn(async move { Client::new(addr, secret).call(&request, within).await });
        }
        while granted * 2 <= voters {
            match answers.join_next().await {
                Some(Ok(Ok(Response::PreVote { granted: true }))) => granted += 1,
                Some(_) => {}
                None => break,
            }
        }
        answers.abort_all();
        if granted * 2 > voters {
            tracing::info!(term, granted, voters, "pre-vote granted; starting an election");
            if raft.trigger().elect().await.is_err() {
                return; // Raft stopped
            }
        } else {
            tracing::debug!(term, granted, voters, "pre-vote not granted; the term stays");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId<u64>> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    fn ask(term: u64, last: Option<LogId<u64>>) -> PreVote {
        PreVote { candidate: 2, term, last_log_id: last }
    }

    const LEASE: Duration = Duration::from_millis(400);

    #[test]
    fn a_voter_that_heard_from_a_leader_within_the_lease_refuses() {
        let quiet = Duration::from_millis(100);
        assert!(!grant(&ask(3, log(2, 10)), 2, log(2, 10), false, quiet, LEASE));
        assert!(grant(&ask(3, log(2, 10)), 2, log(2, 10), false, LEASE, LEASE));
    }

    #[test]
    fn a_leader_never_grants() {
        assert!(!grant(&ask(3, log(2, 10)), 2, log(2, 10), true, LEASE * 10, LEASE));
    }

    #[test]
    fn a_candidate_behind_in_term_or_log_is_refused() {
        assert!(!grant(&ask(2, log(2, 10)), 2, log(2, 10), false, LEASE, LEASE), "same term");
        assert!(!grant(&ask(3, log(2, 9)), 2, log(2, 10), false, LEASE, LEASE), "shorter log");
        assert!(!grant(&ask(3, log(1, 12)), 2, log(2, 10), false, LEASE, LEASE), "older term");
        assert!(grant(&ask(3, log(2, 11)), 2, log(2, 10), false, LEASE, LEASE), "longer log");
        assert!(grant(&ask(1, None), 0, None, false, LEASE, LEASE), "a fresh group");
    }
}
