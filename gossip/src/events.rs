//! The membership view the rest of the node sees, and the events that
//! describe its changes.
//!
//! foca keeps one entry per gossip address. The view keeps one per node id
//! (ourselves excluded): when a node id appears under several identities
//! (it restarted on another address), the largest bump wins, so a previous
//! life going down later is not reported as the node going down.
//!
//! After every call into foca the loop recomputes the view and diffs it
//! with the previous one (foca has no notification for suspicion):
//!
//! | before | after | event |
//! |---|---|---|
//! | absent or down | alive/suspect | `Up` (then `Suspect` if suspect) |
//! | alive | suspect | `Suspect` |
//! | suspect | alive | `Up` (suspicion refuted) |
//! | alive/suspect | down | `Down` |
//! | active, other identity | active | `Up` with the new identity (restart, new metadata) |
//!
//! Each subscriber has its own bounded queue ([`EVENT_QUEUE_MAX`]). A
//! subscriber that does not keep up loses the events that do not fit: they
//! are counted in [`EventStream::dropped`] and in the `events_dropped`
//! metric, and the subscriber should re-read [`crate::Membership::members`]
//! to resynchronise. The gossip loop never waits for a subscriber.

use crate::identity::NodeIdentity;
use crate::metrics::{bump, GossipMetrics};
use foca::{Member, State};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Events a subscriber may have queued before further ones are dropped.
pub const EVENT_QUEUE_MAX: usize = 1024;
/// Most concurrent subscribers (a programming error beyond this).
pub const SUBSCRIBERS_MAX: usize = 64;

/// SWIM state of a member as we see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Failed a probe cycle; declared down unless it refutes in time.
    Suspect,
    /// Declared down (failed, or left).
    Down,
}

impl MemberState {
    fn from_foca(state: State) -> MemberState {
        match state {
            State::Alive => MemberState::Alive,
            State::Suspect => MemberState::Suspect,
            State::Down => MemberState::Down,
        }
    }

    /// Alive or suspect: SWIM treats both as members.
    pub fn is_active(self) -> bool {
        self != MemberState::Down
    }
}

/// One member of the cluster as we see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemberInfo {
    /// Identity: node id, addresses, bump, metadata.
    pub identity: NodeIdentity,
    /// SWIM state.
    pub state: MemberState,
    /// SWIM incarnation (raised by the member to refute suspicion).
    pub incarnation: u16,
}

/// A change of the membership view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MembershipEvent {
    /// The member is (again, or under a new identity) part of the cluster.
    Up(MemberInfo),
    /// The member is suspected of having failed.
    Suspect(MemberInfo),
    /// The member failed or left.
    Down(MemberInfo),
}

impl MembershipEvent {
    /// The member the event is about.
    pub fn member(&self) -> &MemberInfo {
        match self {
            MembershipEvent::Up(m) | MembershipEvent::Suspect(m) | MembershipEvent::Down(m) => m,
        }
    }
}

/// The view: node id to member, ourselves excluded.
pub(crate) type View = BTreeMap<u64, MemberInfo>;

/// Builds the view from foca's full membership state.
pub(crate) fn view_of<'a>(
    own_node_id: u64,
    members: impl Iterator<Item = &'a Member<NodeIdentity>>,
) -> View {
    let mut view = View::new();
    for m in members {
        let id = m.id();
        if id.node_id == own_node_id {
            continue;
        }
        let info = MemberInfo {
            identity: *id,
            state: MemberState::from_foca(m.state()),
            incarnation: m.incarnation(),
        };
        let newer = |old: &MemberInfo| {
            (info.identity.bump, info.state.is_active())
                > (old.identity.bump, old.state.is_active())
        };
        match view.get(&id.node_id) {
            Some(old) if !newer(old) => {}
            _ => {
                view.insert(id.node_id, info);
            }
        }
    }
    view
}

/// The events that take `before` to `after`, in node id order.
pub(crate) fn diff(before: &View, after: &View) -> Vec<MembershipEvent> {
    let mut events = Vec::new();
    for (node_id, now) in after {
        let was = before.get(node_id);
        let was_active = was.is_some_and(|m| m.state.is_active());
        match now.state {
            MemberState::Down => {
                if was_active {
                    events.push(MembershipEvent::Down(*now));
                }
            }
            MemberState::Alive | MemberState::Suspect => {
                let same_identity = was.is_some_and(|m| m.identity == now.identity);
                let was_alive = was.is_some_and(|m| m.state == MemberState::Alive);
                let up = !was_active
                    || !same_identity
                    || (now.state == MemberState::Alive && !was_alive);
                if up {
                    events.push(MembershipEvent::Up(*now));
                }
                let was_suspect_same =
                    same_identity && was.is_some_and(|m| m.state == MemberState::Suspect);
                if now.state == MemberState::Suspect && (up || !was_suspect_same) {
                    events.push(MembershipEvent::Suspect(*now));
                }
            }
        }
    }
    events
}

struct Subscriber {
    tx: mpsc::Sender<MembershipEvent>,
    dropped: Arc<AtomicU64>,
}

/// The registered subscribers (shared by the handle and the loop).
#[derive(Default, Clone)]
pub(crate) struct Subscribers {
    inner: Arc<Mutex<Vec<Subscriber>>>,
}

impl Subscribers {
    pub(crate) fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE_MAX);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut subs = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| !s.tx.is_closed());
        assert!(subs.len() < SUBSCRIBERS_MAX, "at most {SUBSCRIBERS_MAX} subscribers");
        subs.push(Subscriber { tx, dropped: dropped.clone() });
        EventStream { rx, dropped }
    }

    /// Offers each event to each subscriber without waiting.
    pub(crate) fn publish(&self, events: &[MembershipEvent], metrics: &GossipMetrics) {
        if events.is_empty() {
            return;
        }
        let mut subs = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| !s.tx.is_closed());
        for sub in subs.iter() {
            for event in events {
                if sub.tx.try_send(*event).is_err() {
                    sub.dropped.fetch_add(1, Ordering::Relaxed);
                    bump(&metrics.events_dropped);
                }
            }
        }
    }
}

impl std::fmt::Debug for Subscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscribers")
    }
}

/// A subscriber's stream of membership events (see the module doc for what
/// happens when it falls behind).
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<MembershipEvent>,
    dropped: Arc<AtomicU64>,
}

impl EventStream {
    /// The next event; `None` once the membership has stopped and every
    /// queued event was read.
    pub async fn recv(&mut self) -> Option<MembershipEvent> {
        self.rx.recv().await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<MembershipEvent> {
        self.rx.try_recv().ok()
    }

    /// Events this stream lost because its queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeMeta;

    fn info(node_id: u64, bump: u64, state: MemberState) -> MemberInfo {
        MemberInfo {
            identity: NodeIdentity {
                node_id,
                gossip_addr: format!("127.0.0.1:{}", 7000 + node_id).parse().unwrap(),
                bump,
                meta: NodeMeta::unspecified(),
            },
            state,
            incarnation: 0,
        }
    }

    fn view(members: &[MemberInfo]) -> View {
        members.iter().map(|m| (m.identity.node_id, *m)).collect()
    }

    #[test]
    fn transitions_produce_the_documented_events() {
        use MemberState::*;
        let a = info(1, 1, Alive);
        let s = info(1, 1, Suspect);
        let d = info(1, 1, Down);
        let restarted = info(1, 2, Alive);
        let none = view(&[]);
        assert_eq!(diff(&none, &view(&[a])), vec![MembershipEvent::Up(a)]);
        assert_eq!(diff(&view(&[a]), &view(&[s])), vec![MembershipEvent::Suspect(s)]);
        assert_eq!(diff(&view(&[s]), &view(&[a])), vec![MembershipEvent::Up(a)]);
        assert_eq!(diff(&view(&[s]), &view(&[d])), vec![MembershipEvent::Down(d)]);
        assert_eq!(diff(&view(&[d]), &view(&[restarted])), vec![MembershipEvent::Up(restarted)]);
        assert_eq!(diff(&view(&[a]), &view(&[restarted])), vec![MembershipEvent::Up(restarted)]);
        assert_eq!(diff(&view(&[a]), &view(&[a])), vec![]);
        assert_eq!(diff(&none, &view(&[d])), vec![]);
    }

    #[test]
    fn newest_identity_of_a_node_id_wins_the_view() {
        let old = Member::new(info(1, 1, MemberState::Alive).identity, 0, State::Alive);
        let mut new_identity = info(1, 2, MemberState::Alive).identity;
        new_identity.gossip_addr = "127.0.0.1:9999".parse().unwrap();
        let new = Member::new(new_identity, 0, State::Alive);
        let old_down = Member::new(*old.id(), 0, State::Down);
        let v = view_of(99, [new.clone(), old_down].iter());
        assert_eq!(v[&1].identity.bump, 2);
        let v = view_of(99, [old, new].iter());
        assert_eq!(v[&1].identity.bump, 2);
        assert!(view_of(1, [Member::alive(new_identity)].iter()).is_empty());
    }

    #[test]
    fn a_full_subscriber_loses_events_and_they_are_counted() {
        let subs = Subscribers::default();
        let metrics = GossipMetrics::default();
        let mut slow = subs.subscribe();
        let event = MembershipEvent::Up(info(1, 1, MemberState::Alive));
        let events = vec![event; EVENT_QUEUE_MAX + 5];
        subs.publish(&events, &metrics);
        assert_eq!(slow.dropped(), 5);
        assert_eq!(metrics.counters().events_dropped, 5);
        let mut read = 0;
        while slow.try_recv().is_some() {
            read += 1;
        }
        assert_eq!(read, EVENT_QUEUE_MAX);
        // A dropped stream is forgotten, not counted.
        drop(slow);
        subs.publish(&events, &metrics);
        assert_eq!(metrics.counters().events_dropped, 5);
    }
}
