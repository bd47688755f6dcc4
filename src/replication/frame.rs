//! Frames of the peer channel and the quorum: how a message travels over TCP.
//!
//! ```text
//! u32 big-endian length | version byte | MessagePack body (named fields) | [32-byte tag]
//! ```
//!
//! The length counts everything after itself and is bounded by
//! [`PEER_FRAME_BYTES_MAX`] before anything is allocated. Two kinds of tag:
//!
//! - quorum frames ([`encode_frame`], [`decode_frame`]): with a cluster secret,
//!   HMAC-SHA256 under the secret over the version byte and body;
//! - peer-channel frames ([`encode_body`], [`SessionKey`]): HMAC-SHA256 under the
//!   connection's session key (see `handshake`) over the frame's sequence
//!   number on the connection, the version byte and the body.
//!
//! A frame whose tag does not verify is refused whole. Decoding never panics
//! on any input.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Largest frame, after the length prefix (the design's limits table).
pub const PEER_FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Format version of frame bodies.
pub const FRAME_VERSION: u8 = 1;
/// Deepest nesting of MessagePack arrays and maps a frame may hold. Decoding
/// recurses once per level, so without a bound a frame of a few kilobytes
/// nesting thousands of levels would overflow the decoding thread's stack and
/// abort the process. A map nested as deep as the limits allow
/// (`map_depth_max`, checked by `Limits::validate`) takes
/// [`FRAME_NESTING_PER_MAP_LEVEL`] levels, and the message around it less than
/// [`FRAME_NESTING_OVERHEAD`].
pub const FRAME_NESTING_MAX: usize = 160;
/// MessagePack nesting levels one level of nested map takes in a key's state.
pub const FRAME_NESTING_PER_MAP_LEVEL: usize = 4;
/// MessagePack nesting levels of a message around the states it carries.
pub const FRAME_NESTING_OVERHEAD: usize = 32;
/// Bytes of the authentication tag.
pub const TAG_BYTES: usize = 32;

/// A shared cluster secret: every frame and gossip packet is authenticated with it.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl ClusterSecret {
    /// A secret from its bytes (at least 16).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Option<ClusterSecret> {
        let bytes = bytes.into();
        (bytes.len() >= 16).then_some(ClusterSecret(bytes))
    }

    /// The secret's bytes (gossip authenticates its packets with the same secret).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// The tag of `bytes`.
    pub fn tag(&self, bytes: &[u8]) -> [u8; TAG_BYTES] {
        let mut mac = self.mac();
        mac.update(bytes);
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `bytes` (compared in constant time).
    pub fn verify(&self, bytes: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac();
        mac.update(bytes);
        mac.verify_slice(tag).is_ok()
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// The key that tags the frames of one peer connection, derived by the
/// handshake from the cluster secret and both sides' nonces.
#[derive(Clone)]
pub struct SessionKey(Hmac<Sha256>);

impl SessionKey {
    /// A session key from its bytes.
    pub fn new(key: [u8; 32]) -> SessionKey {
        SessionKey(Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length"))
    }

    fn mac(&self, seq: u64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        mac.update(&seq.to_be_bytes());
        mac.update(body);
        mac
    }

    /// The tag of the `seq`-th frame of the connection (from 0), whose bytes
    /// (version byte and body) are `body`.
    pub fn tag(&self, seq: u64, body: &[u8]) -> [u8; TAG_BYTES] {
        self.mac(seq, body).finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of the `seq`-th frame `body` (constant time).
    pub fn verify(&self, seq: u64, body: &[u8], tag: &[u8]) -> bool {
        self.mac(seq, body).verify_slice(tag).is_ok()
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// Why a frame was refused. Refused frames are dropped and counted; the
/// connection they came on is closed, since its framing can no longer be trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than [`PEER_FRAME_BYTES_MAX`].
    #[error("frame of {bytes} bytes is larger than the limit of {PEER_FRAME_BYTES_MAX}")]
    TooLarge {
        /// The announced length.
        bytes: usize,
    },
    /// The frame is shorter than its header and tag.
    #[error("frame is truncated")]
    Truncated,
    /// The frame's version is not one this build reads.
    #[error("unsupported frame version {found}")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The tag does not verify under the cluster secret.
    #[error("frame failed authentication")]
    BadTag,
    /// The body is not a valid message.
    #[error("malformed frame body: {reason}")]
    Malformed {
        /// What the decoder said.
        reason: String,
    },
}

/// Encodes a message as a whole frame, length prefix included. Peer messages
/// and the quorum's RPCs share the format.
pub fn encode_frame<M: serde::Serialize>(
    message: &M,
    secret: Option<&ClusterSecret>,
) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; 4];
    frame.push(FRAME_VERSION);
    let mut serializer = rmp_serde::Serializer::new(&mut frame).with_struct_map();
    serde::Serialize::serialize(message, &mut serializer)
        .map_err(|e| FrameError::Malformed { reason: e.to_string() })?;
    if let Some(secret) = secret {
        let tag = secret.tag(&frame[4..]);
        frame.extend_from_slice(&tag);
    }
    let len = frame.len() - 4;
    if len > PEER_FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { bytes: len });
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Encodes a peer-channel message as its version byte and MessagePack body,
/// without length prefix or tag (the connection adds both). Refused when the
/// frame, tag included, would exceed [`PEER_FRAME_BYTES_MAX`].
pub fn encode_body<M: serde::Serialize>(message: &M) -> Result<Vec<u8>, FrameError> {
    let mut body = vec![FRAME_VERSION];
    let mut serializer = rmp_serde::Serializer::new(&mut body).with_struct_map();
    serde::Serialize::serialize(message, &mut serializer)
        .map_err(|e| FrameError::Malformed { reason: e.to_string() })?;
    if body.len() + TAG_BYTES > PEER_FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { bytes: body.len() + TAG_BYTES });
    }
    Ok(body)
}

/// Decodes a version byte and MessagePack body (its tag already checked).
pub fn decode_body<M: serde::de::DeserializeOwned>(signed: &[u8]) -> Result<M, FrameError> {
    let Some((&version, mut rest)) = signed.split_first() else {
        return Err(FrameError::Truncated);
    };
    if version != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    let mut decoder = rmp_serde::Deserializer::new(&mut rest);
    decoder.set_max_depth(FRAME_NESTING_MAX);
    let message = serde::Deserialize::deserialize(&mut decoder)
        .map_err(|e| FrameError::Malformed { reason: e.to_string() })?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed {
            reason: format!("{} bytes after the message", rest.len()),
        });
    }
    Ok(message)
}

/// Reads a length prefix, refusing lengths over the limit before any allocation.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > PEER_FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { bytes: len });
    }
    Ok(len)
}

/// Decodes the bytes after a length prefix.
pub fn decode_frame<M: serde::de::DeserializeOwned>(
    body: &[u8],
    secret: Option<&ClusterSecret>,
) -> Result<M, FrameError> {
    let tag_len = if secret.is_some() { TAG_BYTES } else { 0 };
    if body.len() < 1 + tag_len {
        return Err(FrameError::Truncated);
    }
    let (signed, tag) = body.split_at(body.len() - tag_len);
    if let Some(secret) = secret {
        if !secret.verify(signed, tag) {
            return Err(FrameError::BadTag);
        }
    }
    decode_body(signed)
}

#[cfg(test)]
mod tests {
    use super::super::message::PeerMessage;
    use super::*;
    use crate::replication::anti_entropy::AntiEntropy;
    use proptest::prelude::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::new(*b"a cluster secret of 32 bytes....").unwrap()
    }

    fn sample() -> PeerMessage {
        PeerMessage::AntiEntropy(AntiEntropy::Top { groups: vec![1, 2, 3] })
    }

    fn body(frame: &[u8]) -> &[u8] {
        assert_eq!(frame_len(frame[..4].try_into().unwrap()).unwrap(), frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn a_frame_round_trips_with_and_without_a_secret() {
        for secret in [None, Some(secret())] {
            let frame = encode_frame(&sample(), secret.as_ref()).unwrap();
            assert_eq!(
                decode_frame::<PeerMessage>(body(&frame), secret.as_ref()).unwrap(),
                sample()
            );
        }
    }

    #[test]
    fn a_frame_signed_with_another_secret_is_refused() {
        let other = ClusterSecret::new(*b"another secret, also 32 bytes...").unwrap();
        let frame = encode_frame(&sample(), Some(&other)).unwrap();
        assert_eq!(
            decode_frame::<PeerMessage>(body(&frame), Some(&secret())),
            Err(FrameError::BadTag)
        );
        let unsigned = encode_frame(&sample(), None).unwrap();
        assert!(decode_frame::<PeerMessage>(body(&unsigned), Some(&secret())).is_err());
    }

    #[test]
    fn a_tampered_frame_is_refused() {
        let mut frame = encode_frame(&sample(), Some(&secret())).unwrap();
        frame[6] ^= 1;
        assert_eq!(
            decode_frame::<PeerMessage>(&frame[4..], Some(&secret())),
            Err(FrameError::BadTag)
        );
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let prefix = ((PEER_FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
        assert_eq!(
            frame_len(prefix),
            Err(FrameError::TooLarge { bytes: PEER_FRAME_BYTES_MAX + 1 })
        );
    }

    #[test]
    fn truncated_frames_are_refused() {
        let frame = encode_frame(&sample(), None).unwrap();
        for cut in 0..frame.len() - 4 {
            assert!(decode_frame::<PeerMessage>(&frame[4..4 + cut], None).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn weak_secrets_are_refused() {
        assert!(ClusterSecret::new(*b"short").is_none());
    }

    proptest! {
        #[test]
        fn prop_garbage_never_panics_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<PeerMessage>(&bytes, None);
            let _ = decode_frame::<PeerMessage>(&bytes, Some(&secret()));
        }

        #[test]
        fn prop_flipping_any_byte_of_a_signed_frame_is_detected(index in any::<prop::sample::Index>(), bit in 0u8..8) {
            let frame = encode_frame(&sample(), Some(&secret())).unwrap();
            let mut body = frame[4..].to_vec();
            let i = index.index(body.len());
            body[i] ^= 1 << bit;
            prop_assert!(decode_frame::<PeerMessage>(&body, Some(&secret())).is_err());
        }
    }
}

#[cfg(test)]
mod nesting {
    use super::super::message::PeerMessage;
    use super::*;
    use crate::op::{Action, CounterOp, CrdtOp, Key, MapOp, Op};
    use crate::Limits;

    /// Built with `execute`, which (unlike a node's write path) does not check
    /// the depth: the state a hostile peer could send.
    fn nested_state(depth: usize) -> crate::Envelope {
        let mut op = CrdtOp::Counter(CounterOp::Incr(1));
        for _ in 0..depth {
            let update = std::collections::BTreeMap::from([("f".to_string(), op)]);
            op = CrdtOp::Map(MapOp { update, remove: vec![] });
        }
        let key = Key::new("k", &Limits::default()).unwrap();
        let mut state = crate::Envelope::default();
        let (actor, now) = (calmkv_crdts::NodeId(7), calmkv_crdts::Hlc::default());
        let op = Op { key, action: Action::Crdt(op) };
        crate::node::execute(&mut state, &op, actor, now, &Limits::default()).unwrap();
        state
    }

    fn deltas(depth: usize) -> PeerMessage {
        PeerMessage::Deltas { deltas: vec![("k".into(), nested_state(depth))], ack: Some(1) }
    }

    #[test]
    fn a_state_nested_as_deep_as_the_limits_allow_decodes() {
        let depth = (FRAME_NESTING_MAX - FRAME_NESTING_OVERHEAD) / FRAME_NESTING_PER_MAP_LEVEL;
        let message = deltas(depth);
        let body = encode_body(&message).unwrap();
        assert_eq!(decode_body::<PeerMessage>(&body).unwrap(), message);
    }

    #[test]
    fn a_frame_nested_deeper_than_the_bound_is_refused_not_a_stack_overflow() {
        let body = encode_body(&deltas(FRAME_NESTING_MAX)).unwrap();
        assert!(matches!(decode_body::<PeerMessage>(&body), Err(FrameError::Malformed { .. })));
        // Raw nesting: arrays of one array, 100,000 deep, in 100 kB.
        let mut raw = vec![FRAME_VERSION];
        raw.extend(std::iter::repeat_n(0x91u8, 100_000));
        raw.push(0xc0);
        assert!(decode_body::<PeerMessage>(&raw).is_err());
    }
}
