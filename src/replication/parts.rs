//! Messages larger than a frame: split into [`PeerMessage::Part`]s by the
//! sender ([`frames_of`]) and joined by the receiver ([`Assembly`]), under a
//! bound per message and a budget over every connection.
//!
//! A key state may be far larger than a frame (64 register siblings of 1 MiB
//! is what the limits allow), and a state that cannot cross the wire can
//! never be repaired or read at `consistency=all`. Parts keep every frame
//! small, so the frame bound keeps protecting the reader, while the message
//! bound (and the assembly budget) says how much one message may make a
//! node hold.

use super::frame::{encode_body, encode_bounded, FrameError, TAG_BYTES};
use super::message::PeerMessage;
use super::peer::PeerMetrics;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of a message body carried by one [`PeerMessage::Part`]; a body
/// larger than this travels in parts.
pub const PART_BYTES: usize = 1024 * 1024;
/// The largest message body the channel carries, in parts: more than the
/// largest register the limits allow (64 siblings of 1 MiB) with its context.
/// A larger state (a set or map grown past it) is not sent and is counted in
/// `messages_too_large`.
pub const PEER_MESSAGE_BYTES_MAX: usize = 160 * 1024 * 1024;
/// Default bytes of messages being joined from their parts over every
/// connection at once; a message that would cross it is read and discarded
/// (counted in `messages_discarded`), and anti-entropy sends it again later.
pub const ASSEMBLY_BYTES_MAX: usize = 256 * 1024 * 1024;
const _: () = assert!(PART_BYTES + 64 + TAG_BYTES <= super::frame::PEER_FRAME_BYTES_MAX);
const _: () = assert!(PEER_MESSAGE_BYTES_MAX <= ASSEMBLY_BYTES_MAX);

/// The frame bodies that carry `message`: its own body when it is at most
/// [`PART_BYTES`], else [`PeerMessage::Part`]s of it, numbered from 0 under a
/// message number of their own. Refused past [`PEER_MESSAGE_BYTES_MAX`].
pub fn frames_of(message: &PeerMessage) -> Result<Vec<Vec<u8>>, FrameError> {
    static NEXT_MESSAGE: AtomicU64 = AtomicU64::new(1);
    let body = encode_bounded(message, PEER_MESSAGE_BYTES_MAX)?;
    if body.len() <= PART_BYTES {
        return Ok(vec![body]);
    }
    let number = NEXT_MESSAGE.fetch_add(1, Ordering::Relaxed);
    let total = body.len() as u64;
    body.chunks(PART_BYTES)
        .enumerate()
        .map(|(index, chunk)| {
            let bytes = chunk.to_vec();
            encode_body(&PeerMessage::Part { message: number, index: index as u32, total, bytes })
        })
        .collect()
}

/// One received [`PeerMessage::Part`].
pub(crate) struct PartIn {
    pub(crate) message: u64,
    pub(crate) index: u32,
    pub(crate) total: u64,
    pub(crate) bytes: Vec<u8>,
}

/// A message being joined from its parts on one connection, its bytes
/// counted against the channel's assembly budget while held.
///
/// Parts are joined only in order, from part 0, under one message number. A
/// part that does not continue the message being joined abandons it (its
/// bytes are given back, `messages_discarded` counts it); a part other than
/// 0 with nothing being joined is skipped: it is the tail of a message whose
/// head went out on a connection that broke, and the sender's outbox still
/// held the rest. So parts of two messages are never spliced into one.
pub(crate) struct Assembly<'a> {
    /// Bytes held now, over every connection, and the budget.
    held_total: &'a AtomicU64,
    budget: u64,
    metrics: &'a PeerMetrics,
    /// The message being joined: its number, size and next part; `None`
    /// when none is.
    joining: Option<(u64, usize, u32)>,
    received: usize,
    /// The bytes so far; `None` once the budget was crossed (the rest of the
    /// parts are read and dropped).
    body: Option<Vec<u8>>,
}

impl<'a> Assembly<'a> {
    pub(crate) fn new(metrics: &'a PeerMetrics, budget: usize) -> Assembly<'a> {
        Assembly {
            held_total: &metrics.assembly_bytes,
            budget: budget as u64,
            metrics,
            joining: None,
            received: 0,
            body: Some(Vec::new()),
        }
    }

    /// Abandons the message being joined, if any: another message came
    /// before its last part.
    pub(crate) fn abandon(&mut self) {
        if self.joining.take().is_some() {
            self.metrics.messages_discarded.fetch_add(1, Ordering::Relaxed);
        }
        self.release();
        self.body = Some(Vec::new());
        self.received = 0;
    }

    /// Adds a part; the whole body once its last part arrived.
    pub(crate) fn add(&mut self, part: PartIn) -> Result<Option<Vec<u8>>, FrameError> {
        let PartIn { message, index, total, bytes } = part;
        if total == 0 || total > PEER_MESSAGE_BYTES_MAX as u64 {
            return Err(FrameError::TooLarge { bytes: total.min(usize::MAX as u64) as usize });
        }
        let total = total as usize;
        if bytes.is_empty() {
            return Err(FrameError::Malformed { reason: "an empty part".into() });
        }
        let continues = self.joining == Some((message, total, index));
        if !continues {
            self.abandon();
            if index != 0 {
                return Ok(None); // the tail of a message whose head was lost
            }
        }
        if self.received + bytes.len() > total {
            return Err(FrameError::Malformed { reason: "parts longer than their message".into() });
        }
        self.received += bytes.len();
        self.joining = Some((message, total, index + 1));
        if let Some(body) = &mut self.body {
            let grown = bytes.len() as u64;
            let held = self.held_total.fetch_add(grown, Ordering::Relaxed) + grown;
            if held > self.budget {
                self.held_total.fetch_sub(grown, Ordering::Relaxed);
                self.release();
                self.body = None;
            } else {
                body.extend_from_slice(&bytes);
            }
        }
        if self.received < total {
            return Ok(None);
        }
        self.joining = None;
        self.received = 0;
        let body = self.body.replace(Vec::new());
        if body.is_none() {
            self.metrics.messages_discarded.fetch_add(1, Ordering::Relaxed);
        }
        let whole = body.inspect(|b| {
            self.held_total.fetch_sub(b.len() as u64, Ordering::Relaxed);
        });
        Ok(whole)
    }

    /// Gives back the bytes held by an unfinished body.
    fn release(&mut self) {
        if let Some(body) = &mut self.body {
            self.held_total.fetch_sub(body.len() as u64, Ordering::Relaxed);
            *body = Vec::new();
        }
    }
}

impl Drop for Assembly<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{decode_body, PEER_FRAME_BYTES_MAX};
    use super::*;
    use crate::envelope::Envelope;

    fn parts_of(frames: &[Vec<u8>]) -> Vec<PartIn> {
        frames
            .iter()
            .map(|f| match decode_body::<PeerMessage>(f).unwrap() {
                PeerMessage::Part { message, index, total, bytes } => {
                    PartIn { message, index, total, bytes }
                }
                other => panic!("not a part: {other:?}"),
            })
            .collect()
    }

    fn part(message: u64, index: u32, total: u64, bytes: Vec<u8>) -> PartIn {
        PartIn { message, index, total, bytes }
    }

    fn large_message() -> PeerMessage {
        let mut state = Envelope::default();
        let now = calmkv_crdts::Hlc { wall_ms: 1, logical: 0 };
        let value = serde_bytes::ByteBuf::from(vec![7u8; 3 * PART_BYTES]);
        state.lww.set(calmkv_crdts::NodeId(1), now, value);
        PeerMessage::ReadReply { id: 5, state }
    }

    #[test]
    fn a_message_larger_than_a_part_travels_in_parts_and_is_joined_whole() {
        let message = large_message();
        let frames = frames_of(&message).unwrap();
        assert!(frames.len() >= 3, "{} frames", frames.len());
        assert!(frames.iter().all(|f| f.len() + TAG_BYTES <= PEER_FRAME_BYTES_MAX));
        let metrics = PeerMetrics::default();
        let mut assembly = Assembly::new(&metrics, ASSEMBLY_BYTES_MAX);
        let mut joined = None;
        for part in parts_of(&frames) {
            assert!(joined.is_none(), "joined before the last part");
            joined = assembly.add(part).unwrap();
        }
        let joined = joined.expect("joined at the last part");
        assert_eq!(decode_body::<PeerMessage>(&joined).unwrap(), message);
        assert_eq!(metrics.assembly_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(frames_of(&PeerMessage::Ping).unwrap().len(), 1, "a small one is one frame");
    }

    #[test]
    fn a_message_past_the_assembly_budget_is_discarded_and_counted() {
        let frames = frames_of(&large_message()).unwrap();
        let metrics = PeerMetrics::default();
        let mut assembly = Assembly::new(&metrics, 2 * PART_BYTES);
        for part in parts_of(&frames) {
            assert_eq!(assembly.add(part).unwrap(), None);
            assert!(metrics.assembly_bytes.load(Ordering::Relaxed) <= 2 * PART_BYTES as u64);
        }
        assert_eq!(metrics.messages_discarded.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.assembly_bytes.load(Ordering::Relaxed), 0, "the budget is given back");
        // The next message is joined again.
        let small = frames_of(&large_message()).unwrap();
        let mut roomy = Assembly::new(&metrics, ASSEMBLY_BYTES_MAX);
        let joined = parts_of(&small).into_iter().map(|p| roomy.add(p).unwrap()).last();
        assert!(joined.flatten().is_some());
    }

    #[test]
    fn malformed_parts_are_refused() {
        let metrics = PeerMetrics::default();
        let mut assembly = Assembly::new(&metrics, ASSEMBLY_BYTES_MAX);
        let too_large = PEER_MESSAGE_BYTES_MAX as u64 + 1;
        assert!(matches!(
            assembly.add(part(1, 0, too_large, vec![1])),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(assembly.add(part(1, 0, 10, vec![])), Err(FrameError::Malformed { .. })));
        assert!(matches!(
            assembly.add(part(1, 0, 2, vec![1; 3])),
            Err(FrameError::Malformed { .. })
        ));
        assert_eq!(assembly.add(part(2, 0, 10, vec![1; 4])).unwrap(), None);
        drop(assembly);
        assert_eq!(metrics.assembly_bytes.load(Ordering::Relaxed), 0, "released when dropped");
    }

    #[test]
    fn parts_of_two_messages_are_never_spliced_into_one() {
        let metrics = PeerMetrics::default();
        let mut assembly = Assembly::new(&metrics, ASSEMBLY_BYTES_MAX);
        // The tail of a message whose head went out on a broken connection.
        assert_eq!(assembly.add(part(1, 1, 8, vec![1; 4])).unwrap(), None);
        assert_eq!(metrics.assembly_bytes.load(Ordering::Relaxed), 0, "skipped, not held");
        // A message of the same size, interrupted by another one.
        assert_eq!(assembly.add(part(2, 0, 8, vec![2; 4])).unwrap(), None);
        assert_eq!(assembly.add(part(3, 0, 8, vec![3; 4])).unwrap(), None);
        assert_eq!(metrics.messages_discarded.load(Ordering::Relaxed), 1, "message 2 abandoned");
        assert_eq!(assembly.add(part(2, 1, 8, vec![2; 4])).unwrap(), None, "not joined to 3");
        assert_eq!(assembly.add(part(4, 0, 8, vec![4; 4])).unwrap(), None);
        assert_eq!(assembly.add(part(4, 1, 8, vec![4; 4])).unwrap(), Some(vec![4; 8]));
        assert_eq!(metrics.assembly_bytes.load(Ordering::Relaxed), 0);
    }
}
