//! The timer scheduler of the gossip loop.
//!
//! foca hands out timer events through `Runtime::submit_after` and requires
//! every one of them to come back, and the probe cycle expects them in order
//! (the indirect probe of a cycle before the next cycle starts). A binary
//! heap ordered by `(deadline, sequence number)` does both: nothing is ever
//! dropped, due events come out earliest deadline first, and events with
//! the same deadline come out in submission order. Deadlines use
//! `tokio::time::Instant`, so paused test time drives them.

use crate::identity::NodeIdentity;
use foca::Timer;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;
use tokio::time::Instant;

struct Scheduled {
    deadline: Instant,
    seq: u64,
    timer: Timer<NodeIdentity>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// Reversed, so the max-heap pops the earliest (deadline, seq) first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.deadline, other.seq).cmp(&(self.deadline, self.seq))
    }
}

/// Pending foca timer events.
#[derive(Default)]
pub(crate) struct TimerQueue {
    heap: BinaryHeap<Scheduled>,
    next_seq: u64,
}

impl TimerQueue {
    /// Schedules `timer` to fire `after` from `now`.
    pub(crate) fn push(&mut self, now: Instant, after: Duration, timer: Timer<NodeIdentity>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Scheduled { deadline: now + after, seq, timer });
    }

    /// The earliest deadline, if any timer is pending.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|s| s.deadline)
    }

    /// Removes and returns the earliest timer if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer<NodeIdentity>> {
        if self.heap.peek()?.deadline <= now {
            self.heap.pop().map(|s| s.timer)
        } else {
            None
        }
    }

    #[cfg(test)]
    /// How many timers are pending.
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_timers_come_out_by_deadline_then_submission_order() {
        let mut q = TimerQueue::default();
        let t0 = Instant::now();
        q.push(t0, Duration::from_millis(1000), Timer::ProbeRandomMember(1));
        q.push(t0, Duration::from_millis(500), Timer::PeriodicGossip(2));
        q.push(t0, Duration::from_millis(500), Timer::PeriodicAnnounce(3));
        q.push(t0, Duration::from_millis(500), Timer::PeriodicGossip(4));
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_millis(500)));
        assert!(q.pop_due(t0).is_none());

        let later = t0 + Duration::from_secs(2);
        let order: Vec<_> = std::iter::from_fn(|| q.pop_due(later)).collect();
        assert_eq!(
            order,
            vec![
                Timer::PeriodicGossip(2),
                Timer::PeriodicAnnounce(3),
                Timer::PeriodicGossip(4),
                Timer::ProbeRandomMember(1),
            ]
        );
        assert_eq!(q.len(), 0);
    }
}
