//! Frames of the peer channel and the quorum: how a message travels over TCP.
//!
//! ```text
//! plain:            u32 big-endian length | version 1 | MessagePack body (named fields)
//! session, sealed:  u32 big-endian length | ChaCha20-Poly1305(version 1 | body) | tag (16)
//! keyring, sealed:  u32 big-endian length | version 2 | nonce (24) | XChaCha20-Poly1305(body) | tag (16)
//! ```
//!
//! The length counts everything after itself and is bounded by
//! [`PEER_FRAME_BYTES_MAX`] before anything is allocated. Without a cluster
//! secret (loopback only) frames are plain. With one:
//!
//! - peer-channel and quorum frames ([`encode_body`], then
//!   [`SessionKey::seal`] on the connection) are sealed under the connection's
//!   session key (see `handshake`), the frame's sequence number on the
//!   connection as the nonce;
//! - [`encode_frame`] and [`decode_frame`] with a keyring seal a frame outside
//!   any session, under a key derived from the keyring's first secret with a
//!   random nonce (no connection uses it today; it sizes quorum batches and
//!   is kept fuzzed).
//!
//! A frame that does not open is refused whole, before anything in it is
//! parsed. Decoding never panics on any input and refuses nesting past
//! [`FRAME_NESTING_MAX`].

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, XChaCha20Poly1305, XNonce};
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
/// Bytes a sealed frame adds to its plaintext: the AEAD tag (peer frames;
/// quorum frames add a nonce too, see [`QUORUM_SEAL_BYTES`]).
pub const TAG_BYTES: usize = 16;
/// Format version of sealed quorum frames (XChaCha20-Poly1305 under the secret).
pub const SEALED_FRAME_VERSION: u8 = 2;
/// Bytes of a random XChaCha20 nonce.
pub const XNONCE_BYTES: usize = 24;
/// Bytes a sealed quorum frame adds: version, nonce, tag.
pub const QUORUM_SEAL_BYTES: usize = 1 + XNONCE_BYTES + TAG_BYTES;
/// Shortest secret accepted.
pub const SECRET_BYTES_MIN: usize = 16;
/// Most secrets a keyring holds.
pub const KEYRING_SECRETS_MAX: usize = 8;

const QUORUM_KEY_LABEL: &[u8] = b"calmkv-quorum-frame-key-v2\0";

/// The cluster's secrets, a keyring: the first seals and proves, every one is
/// accepted when opening or verifying, so a secret is rotated without downtime
/// (add the new one second everywhere, then first everywhere, then drop the
/// old). Authenticates and encrypts peer connections, quorum frames and gossip
/// packets.
#[derive(Clone)]
pub struct ClusterSecret {
    keys: Vec<Vec<u8>>,
}

impl ClusterSecret {
    /// A keyring of one secret (at least [`SECRET_BYTES_MIN`] bytes).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Option<ClusterSecret> {
        ClusterSecret::keyring([bytes.into()])
    }

    /// A keyring, first secret first; `None` when it is empty, holds more than
    /// [`KEYRING_SECRETS_MAX`] or a secret shorter than [`SECRET_BYTES_MIN`].
    pub fn keyring(secrets: impl IntoIterator<Item = Vec<u8>>) -> Option<ClusterSecret> {
        let keys: Vec<Vec<u8>> = secrets.into_iter().collect();
        let valid = !keys.is_empty()
            && keys.len() <= KEYRING_SECRETS_MAX
            && keys.iter().all(|k| k.len() >= SECRET_BYTES_MIN);
        valid.then_some(ClusterSecret { keys })
    }

    /// A keyring from comma-separated secrets, as `--cluster-secret` takes it.
    pub fn parse(text: &str) -> Option<ClusterSecret> {
        ClusterSecret::keyring(text.split(',').map(|s| s.as_bytes().to_vec()))
    }

    /// The first secret: the one this node seals and proves with.
    pub fn as_bytes(&self) -> &[u8] {
        &self.keys[0]
    }

    /// Every secret, the first first.
    pub fn all(&self) -> impl Iterator<Item = &[u8]> {
        self.keys.iter().map(Vec::as_slice)
    }

    /// A 32-byte key for one purpose, derived from `secret` (HMAC-SHA256 of
    /// the purpose's label under it).
    pub fn derive(secret: &[u8], label: &[u8]) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    fn quorum_cipher(secret: &[u8]) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&Self::derive(secret, QUORUM_KEY_LABEL).into())
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({} secrets)", self.keys.len())
    }
}

/// The key that seals the frames of one peer connection (ChaCha20-Poly1305),
/// derived by the handshake from the cluster secret, both nonces and both ids.
/// The `seq`-th frame of the connection is sealed under nonce `seq`, so a
/// frame replayed, dropped or reordered fails to open.
#[derive(Clone)]
pub struct SessionKey(ChaCha20Poly1305);

impl SessionKey {
    /// A session key from its bytes.
    pub fn new(key: [u8; 32]) -> SessionKey {
        SessionKey(ChaCha20Poly1305::new(&key.into()))
    }

    fn nonce(seq: u64) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        nonce.into()
    }

    /// Encrypts the `seq`-th frame of the connection (from 0) in place and
    /// appends its [`TAG_BYTES`] tag.
    pub fn seal(&self, seq: u64, frame: &mut Vec<u8>) {
        self.0
            .encrypt_in_place(&Self::nonce(seq), b"", frame)
            .expect("a frame within the bound always encrypts");
    }

    /// Checks and decrypts the `seq`-th frame in place (its tag removed);
    /// `false`, with `frame` unchanged, when it does not open.
    pub fn open(&self, seq: u64, frame: &mut Vec<u8>) -> bool {
        self.0.decrypt_in_place(&Self::nonce(seq), b"", frame).is_ok()
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
    /// Nothing arrived on the connection within its heartbeat timeout (its
    /// other end is gone or stalled); not a bad frame, but the connection is
    /// closed all the same.
    #[error("no frame within the heartbeat timeout")]
    Silent,
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
    match secret {
        None => frame.push(FRAME_VERSION),
        Some(_) => {
            frame.push(SEALED_FRAME_VERSION);
            frame.extend_from_slice(&rand::random::<[u8; XNONCE_BYTES]>());
        }
    }
    let header = frame.len();
    let mut serializer = rmp_serde::Serializer::new(&mut frame).with_struct_map();
    serde::Serialize::serialize(message, &mut serializer)
        .map_err(|e| FrameError::Malformed { reason: e.to_string() })?;
    let len = frame.len() - 4 + if secret.is_some() { TAG_BYTES } else { 0 };
    if len > PEER_FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { bytes: len });
    }
    if let Some(secret) = secret {
        let (head, plaintext) = frame.split_at_mut(header);
        let nonce = XNonce::from_slice(&head[5..]);
        let tag = ClusterSecret::quorum_cipher(secret.as_bytes())
            .encrypt_in_place_detached(nonce, &head[4..5], plaintext)
            .expect("a frame within the bound always encrypts");
        frame.extend_from_slice(&tag);
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Encodes a peer-channel message as its version byte and MessagePack body,
/// without length prefix or tag (the connection adds both). Refused when the
/// frame, tag included, would exceed [`PEER_FRAME_BYTES_MAX`].
pub fn encode_body<M: serde::Serialize>(message: &M) -> Result<Vec<u8>, FrameError> {
    encode_bounded(message, PEER_FRAME_BYTES_MAX - TAG_BYTES)
}

/// Encodes a message as its version byte and MessagePack body, refused past
/// `bytes_max` (a message that travels in parts is bounded by the whole
/// message's limit, not one frame's).
pub fn encode_bounded<M: serde::Serialize>(
    message: &M,
    bytes_max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut body = vec![FRAME_VERSION];
    let mut serializer = rmp_serde::Serializer::new(&mut body).with_struct_map();
    serde::Serialize::serialize(message, &mut serializer)
        .map_err(|e| FrameError::Malformed { reason: e.to_string() })?;
    if body.len() > bytes_max {
        return Err(FrameError::TooLarge { bytes: body.len() + TAG_BYTES });
    }
    Ok(body)
}

/// Decodes a version byte and MessagePack body (its tag already checked).
pub fn decode_body<M: serde::de::DeserializeOwned>(signed: &[u8]) -> Result<M, FrameError> {
    let Some((&version, rest)) = signed.split_first() else {
        return Err(FrameError::Truncated);
    };
    if version != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    decode_msgpack(rest)
}

/// Decodes one MessagePack message that fills `bytes`, with the nesting bound.
fn decode_msgpack<M: serde::de::DeserializeOwned>(mut rest: &[u8]) -> Result<M, FrameError> {
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

/// Decodes the bytes after a length prefix. With a secret the frame must be
/// sealed and open under one of the keyring's secrets; without, it must not be.
pub fn decode_frame<M: serde::de::DeserializeOwned>(
    body: &[u8],
    secret: Option<&ClusterSecret>,
) -> Result<M, FrameError> {
    let Some(secret) = secret else { return decode_body(body) };
    match body.first() {
        None => return Err(FrameError::Truncated),
        Some(&SEALED_FRAME_VERSION) => {}
        Some(&FRAME_VERSION) => return Err(FrameError::BadTag),
        Some(&found) => return Err(FrameError::UnsupportedVersion { found }),
    }
    if body.len() < QUORUM_SEAL_BYTES {
        return Err(FrameError::Truncated);
    }
    let (head, rest) = body.split_at(1 + XNONCE_BYTES);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_BYTES);
    let nonce = XNonce::from_slice(&head[1..]);
    for key in secret.all() {
        let mut plaintext = ciphertext.to_vec();
        let cipher = ClusterSecret::quorum_cipher(key);
        if cipher.decrypt_in_place_detached(nonce, &head[..1], &mut plaintext, tag.into()).is_ok() {
            return decode_msgpack(&plaintext);
        }
    }
    Err(FrameError::BadTag)
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
    fn weak_secrets_and_bad_keyrings_are_refused() {
        assert!(ClusterSecret::new(*b"short").is_none());
        assert!(ClusterSecret::parse("a long enough secret,short").is_none());
        assert!(ClusterSecret::parse("").is_none());
        let nine = ["sixteen bytes ok"; KEYRING_SECRETS_MAX + 1].join(",");
        assert!(ClusterSecret::parse(&nine).is_none());
    }

    #[test]
    fn a_sealed_frame_does_not_show_its_plaintext() {
        let message = PeerMessage::Read { id: 7, key: "a very recognisable key".into() };
        let frame = encode_frame(&message, Some(&secret())).unwrap();
        let needle = b"recognisable";
        assert!(!frame.windows(needle.len()).any(|w| w == needle));
        let plain = encode_frame(&message, None).unwrap();
        assert!(plain.windows(needle.len()).any(|w| w == needle), "the check can fail");
        assert_eq!(decode_frame::<PeerMessage>(body(&frame), Some(&secret())).unwrap(), message);
    }

    #[test]
    fn any_secret_of_the_keyring_opens_and_the_first_seals() {
        let other = b"another secret, also 32 bytes...".to_vec();
        let old_first = ClusterSecret::keyring([secret().as_bytes().to_vec(), other.clone()]);
        let new_first = ClusterSecret::keyring([other.clone(), secret().as_bytes().to_vec()]);
        let (old_first, new_first) = (old_first.unwrap(), new_first.unwrap());
        let only_new = ClusterSecret::new(other).unwrap();
        let sealed_by_old = encode_frame(&sample(), Some(&secret())).unwrap();
        for ring in [&old_first, &new_first] {
            assert_eq!(
                decode_frame::<PeerMessage>(body(&sealed_by_old), Some(ring)).unwrap(),
                sample()
            );
        }
        assert_eq!(
            decode_frame::<PeerMessage>(body(&sealed_by_old), Some(&only_new)),
            Err(FrameError::BadTag)
        );
        let sealed_by_new_first = encode_frame(&sample(), Some(&new_first)).unwrap();
        assert!(decode_frame::<PeerMessage>(body(&sealed_by_new_first), Some(&only_new)).is_ok());
    }

    #[test]
    fn a_sealed_frame_is_refused_by_a_node_without_a_secret() {
        let frame = encode_frame(&sample(), Some(&secret())).unwrap();
        assert_eq!(
            decode_frame::<PeerMessage>(body(&frame), None),
            Err(FrameError::UnsupportedVersion { found: SEALED_FRAME_VERSION })
        );
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
