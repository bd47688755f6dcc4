//! A peer's outbox: frames waiting to be sent, bounded in bytes.
//!
//! Local writes never wait for a peer. When a peer is slow or unreachable its
//! outbox fills; past [`OUTBOX_BYTES_MAX`] new frames are dropped and counted,
//! and anti-entropy repairs what they carried once the peer is back. A message
//! in several frames is queued or dropped whole.
//!
//! Deltas of `w=1` writes wait apart, one per key: a delta queued for a key
//! that already has one is joined into it (the join of two deltas of a key is
//! itself a delta below the origin's state), so a hot key written many times
//! while the connection is busy or down costs one delta, not one per write.
//! The sender takes them in groups bounded in bytes ([`Outbox::take_deltas`]).

use crate::envelope::Envelope;
use calmkv_crdts::Crdt;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

/// Default bound of one peer's outbox (docs/design.md §9).
pub const OUTBOX_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Encoded bytes of the deltas of one group from [`Outbox::take_deltas`]
/// (one delta larger than that makes a group alone).
pub const DELTA_GROUP_BYTES_MAX: usize = 256 * 1024;

/// Frames for one peer.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    bytes_max: usize,
    ready: Notify,
    dropped: AtomicU64,
    dropped_bytes: AtomicU64,
    coalesced: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Vec<u8>>,
    /// Deltas by key, each with its encoded size.
    deltas: BTreeMap<String, (Envelope, usize)>,
    /// Bytes of the frames and the deltas.
    bytes: usize,
}

/// What [`Outbox::push_delta`] did with a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// The key had no delta waiting; this one now waits.
    New,
    /// Joined into the delta already waiting for the key.
    Coalesced,
}

/// The frame was not queued: the outbox is full.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("outbox full ({queued} of {max} bytes queued); frame of {frame} bytes dropped")]
pub struct Dropped {
    /// Bytes queued when the frame arrived.
    pub queued: usize,
    /// The bound.
    pub max: usize,
    /// The dropped frame's size.
    pub frame: usize,
}

impl Outbox {
    /// An empty outbox holding at most `bytes_max` bytes.
    pub fn new(bytes_max: usize) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            bytes_max,
            ready: Notify::new(),
            dropped: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
        }
    }

    /// Queues a key's delta, joined into the one already waiting for the key
    /// if any; dropped (and counted) when what it adds does not fit. `bytes`
    /// is the delta's encoded size.
    pub fn push_delta(&self, key: &str, delta: &Envelope, bytes: usize) -> Result<Queued, Dropped> {
        let queued = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let joined = queue.deltas.get(key).map(|(waiting, size)| {
                let joined = waiting.merged(delta);
                let joined_bytes = calmkv_crdts::encode(&joined).map_or(*size + bytes, |b| b.len());
                (joined, *size, joined_bytes)
            });
            let (grows, entry, queued) = match joined {
                Some((joined, old, new)) => {
                    (new.saturating_sub(old), (joined, new), Queued::Coalesced)
                }
                None => (bytes, (delta.clone(), bytes), Queued::New),
            };
            if queue.bytes + grows > self.bytes_max && queue.bytes > 0 {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                return Err(Dropped { queued: queue.bytes, max: self.bytes_max, frame: bytes });
            }
            let old = queue.deltas.insert(key.to_string(), entry).map_or(0, |(_, size)| size);
            let new = queue.deltas.get(key).map_or(0, |(_, size)| *size);
            queue.bytes = queue.bytes + new - old;
            queued
        };
        if queued == Queued::Coalesced {
            self.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        self.ready.notify_one();
        Ok(queued)
    }

    /// Takes waiting deltas, in key order, in groups of at most
    /// [`DELTA_GROUP_BYTES_MAX`] (a larger delta alone), up to `bytes` in
    /// total (at least one group when any delta waits).
    pub fn take_deltas(&self, bytes: usize) -> Vec<Vec<(String, Envelope)>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut groups: Vec<Vec<(String, Envelope)>> = Vec::new();
        let (mut total, mut group_bytes) = (0, 0);
        while let Some(entry) = queue.deltas.first_entry() {
            let size = entry.get().1;
            if !groups.is_empty() && total + size > bytes {
                break;
            }
            let (key, (delta, _)) = entry.remove_entry();
            queue.bytes -= size;
            total += size;
            match groups.last_mut() {
                Some(group) if group_bytes + size <= DELTA_GROUP_BYTES_MAX => {
                    group_bytes += size;
                    group.push((key, delta));
                }
                _ => {
                    group_bytes = size;
                    groups.push(vec![(key, delta)]);
                }
            }
        }
        groups
    }

    /// Deltas joined into one already waiting for their key.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Queues a frame, or drops it (and counts it) when it does not fit.
    pub fn push(&self, frame: Vec<u8>) -> Result<(), Dropped> {
        self.push_all(vec![frame])
    }

    /// Queues the frames of one message back to back, or drops them all (and
    /// counts them as one) when they do not fit. An empty outbox takes one
    /// message larger than its bound, so the largest message the channel
    /// carries (`PEER_MESSAGE_BYTES_MAX`, in parts) can always go once the
    /// queue has drained: the outbox then holds at most that message.
    pub fn push_all(&self, frames: Vec<Vec<u8>>) -> Result<(), Dropped> {
        let bytes: usize = frames.iter().map(Vec::len).sum();
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.bytes + bytes > self.bytes_max && queue.bytes > 0 {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                return Err(Dropped { queued: queue.bytes, max: self.bytes_max, frame: bytes });
            }
            queue.bytes += bytes;
            queue.frames.extend(frames);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Takes queued frames, oldest first, up to `bytes` in total (at least one
    /// frame when any is queued); empty when nothing is queued.
    pub fn take(&self, bytes: usize) -> Vec<Vec<u8>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken = Vec::new();
        let mut total = 0;
        while let Some(front) = queue.frames.front() {
            if !taken.is_empty() && total + front.len() > bytes {
                break;
            }
            total += front.len();
            let frame = queue.frames.pop_front().expect("front exists");
            queue.bytes -= frame.len();
            taken.push(frame);
        }
        taken
    }

    /// Waits until a frame may be queued (returns at once if one is).
    pub async fn ready(&self) {
        if self.queued_bytes() > 0 {
            return;
        }
        self.ready.notified().await;
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Frames dropped because the outbox was full, and their bytes.
    pub fn dropped(&self) -> (u64, u64) {
        (self.dropped.load(Ordering::Relaxed), self.dropped_bytes.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_outbox_drops_and_counts_instead_of_growing() {
        let outbox = Outbox::new(10);
        outbox.push(vec![0; 6]).unwrap();
        assert_eq!(outbox.push(vec![0; 5]), Err(Dropped { queued: 6, max: 10, frame: 5 }));
        outbox.push(vec![0; 4]).unwrap();
        assert_eq!(outbox.queued_bytes(), 10);
        assert_eq!(outbox.dropped(), (1, 5));
    }

    #[test]
    fn a_message_in_parts_is_queued_whole_or_dropped_whole() {
        let outbox = Outbox::new(10);
        assert_eq!(outbox.push_all(vec![vec![0; 8], vec![0; 8]]), Ok(()), "empty: taken");
        assert_eq!(outbox.queued_bytes(), 16);
        let refused = outbox.push_all(vec![vec![1; 1], vec![1; 1]]);
        assert_eq!(refused, Err(Dropped { queued: 16, max: 10, frame: 2 }));
        assert_eq!(outbox.take(100), [vec![0; 8], vec![0; 8]]);
    }

    fn lww(value: u8, wall_ms: u64) -> Envelope {
        let mut state = Envelope::default();
        let now = calmkv_crdts::Hlc { wall_ms, logical: 0 };
        state.lww.set(calmkv_crdts::NodeId(1), now, serde_bytes::ByteBuf::from(vec![value; 10]));
        state
    }

    #[test]
    fn deltas_of_one_key_are_joined_into_one() {
        let outbox = Outbox::new(1000);
        assert_eq!(outbox.push_delta("k", &lww(1, 1), 40), Ok(Queued::New));
        assert_eq!(outbox.push_delta("k", &lww(2, 2), 40), Ok(Queued::Coalesced));
        assert_eq!(outbox.push_delta("other", &lww(3, 3), 40), Ok(Queued::New));
        assert_eq!(outbox.coalesced(), 1);
        let groups = outbox.take_deltas(1000);
        assert_eq!(groups.len(), 1, "small deltas share a group");
        let keys: Vec<&str> = groups[0].iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["k", "other"]);
        assert_eq!(groups[0][0].1, lww(2, 2), "the join of both writes");
        assert_eq!(outbox.queued_bytes(), 0);
        assert!(outbox.take_deltas(1000).is_empty());
    }

    #[test]
    fn deltas_are_taken_in_byte_bounded_groups_and_dropped_past_the_bound() {
        let outbox = Outbox::new(3 * DELTA_GROUP_BYTES_MAX);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            outbox.push_delta(key, &lww(i as u8, 1), DELTA_GROUP_BYTES_MAX / 2 + 1).unwrap();
        }
        let refused = outbox.push_delta("d", &lww(9, 1), 2 * DELTA_GROUP_BYTES_MAX);
        assert!(refused.is_err(), "past the outbox bound");
        assert_eq!(outbox.dropped().0, 1);
        let groups = outbox.take_deltas(usize::MAX);
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 1, 1], "two halves and one byte do not fit one group");
        outbox.push_delta("a", &lww(1, 1), 10).unwrap();
        outbox.push_delta("b", &lww(1, 1), 10).unwrap();
        assert_eq!(outbox.take_deltas(5).len(), 1, "at least one group, then the budget");
        assert_eq!(outbox.queued_bytes(), 10);
    }

    #[test]
    fn take_returns_frames_in_order_within_a_byte_budget() {
        let outbox = Outbox::new(100);
        for n in 1..=4u8 {
            outbox.push(vec![n; 10]).unwrap();
        }
        let first = outbox.take(25);
        assert_eq!(first, [vec![1; 10], vec![2; 10]]);
        assert_eq!(outbox.take(1), [vec![3; 10]], "one frame even over the budget");
        assert_eq!(outbox.take(100), [vec![4; 10]]);
        assert!(outbox.take(100).is_empty());
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn ready_wakes_when_a_frame_is_queued() {
        let outbox = std::sync::Arc::new(Outbox::new(100));
        let waiter = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.ready().await }
        });
        outbox.push(vec![1]).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await.unwrap().unwrap();
    }
}
