//! A peer's outbox: frames waiting to be sent, bounded in bytes.
//!
//! Local writes never wait for a peer. When a peer is slow or unreachable its
//! outbox fills; past [`OUTBOX_BYTES_MAX`] new frames are dropped and counted,
//! and anti-entropy repairs what they carried once the peer is back. A message
//! in several frames is queued or dropped whole.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

/// Default bound of one peer's outbox (docs/design.md §9).
pub const OUTBOX_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Frames for one peer.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    bytes_max: usize,
    ready: Notify,
    dropped: AtomicU64,
    dropped_bytes: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
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
        }
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
            if queue.bytes + bytes > self.bytes_max && !queue.frames.is_empty() {
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
