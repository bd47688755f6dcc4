//! The foca [`Codec`]: how headers and member updates become bytes.
//!
//! ```text
//! packet = WIRE_VERSION | header (MessagePack array)
//!          [ u16 count (foca) | member (MessagePack array) * count ]
//! sealed, with a cluster secret, as nonce | ciphertext | tag (see `auth`)
//! ```
//!
//! MessagePack *arrays* (`rmp_serde::encode::write`, not `to_vec_named`):
//! a packet is bounded at 1,400 bytes and carries an identity per member
//! update, so field names would cost a third of the room. The version byte
//! in front of the header covers the whole packet. Decoding reads from a
//! slice and returns an error on any input; it never panics.

use crate::identity::NodeIdentity;
use foca::{Codec, Header, Member, Message, State};
use serde::{Deserialize, Serialize};

/// Format version of gossip packets.
pub const WIRE_VERSION: u8 = 1;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The packet starts with a version this build does not know.
    #[error("unknown gossip wire version {version}")]
    UnknownVersion {
        /// The version byte found.
        version: u8,
    },
    /// The buffer ended before the item did.
    #[error("gossip packet truncated")]
    Truncated,
    /// MessagePack that does not decode to the expected shape.
    #[error("malformed gossip item: {source}")]
    Malformed {
        /// The decoder's complaint.
        #[from]
        source: rmp_serde::decode::Error,
    },
    /// Encoding failed (cannot happen for these types; kept for the trait).
    #[error("gossip item did not encode: {source}")]
    Encode {
        /// The encoder's complaint.
        #[from]
        source: rmp_serde::encode::Error,
    },
    /// Not enough room left in the packet; foca then stops adding items.
    #[error("no room for the item ({needed_bytes} bytes needed, {available_bytes} left)")]
    NoRoom {
        /// Encoded size of the item.
        needed_bytes: usize,
        /// Room left in the packet.
        available_bytes: usize,
    },
}

/// calmkv's gossip codec (versioned, compact MessagePack).
#[derive(Debug, Default, Clone, Copy)]
pub struct WireCodec;

#[derive(Serialize, Deserialize)]
struct WireHeader {
    src: NodeIdentity,
    src_incarnation: u16,
    dst: NodeIdentity,
    message: WireMessage,
}

#[derive(Serialize, Deserialize)]
enum WireMessage {
    Ping(u8),
    Ack(u8),
    PingReq { target: NodeIdentity, probe: u8 },
    IndirectPing { origin: NodeIdentity, probe: u8 },
    IndirectAck { target: NodeIdentity, probe: u8 },
    ForwardedAck { origin: NodeIdentity, probe: u8 },
    Announce,
    Feed,
    Gossip,
    Broadcast,
    TurnUndead,
}

#[derive(Serialize, Deserialize)]
struct WireMember {
    id: NodeIdentity,
    incarnation: u16,
    state: u8,
}

fn message_to_wire(message: &Message<NodeIdentity>) -> WireMessage {
    match *message {
        Message::Ping(p) => WireMessage::Ping(p),
        Message::Ack(p) => WireMessage::Ack(p),
        Message::PingReq { target, probe_number } => {
            WireMessage::PingReq { target, probe: probe_number }
        }
        Message::IndirectPing { origin, probe_number } => {
            WireMessage::IndirectPing { origin, probe: probe_number }
        }
        Message::IndirectAck { target, probe_number } => {
            WireMessage::IndirectAck { target, probe: probe_number }
        }
        Message::ForwardedAck { origin, probe_number } => {
            WireMessage::ForwardedAck { origin, probe: probe_number }
        }
        Message::Announce => WireMessage::Announce,
        Message::Feed => WireMessage::Feed,
        Message::Gossip => WireMessage::Gossip,
        Message::Broadcast => WireMessage::Broadcast,
        Message::TurnUndead => WireMessage::TurnUndead,
    }
}

fn message_from_wire(message: WireMessage) -> Message<NodeIdentity> {
    match message {
        WireMessage::Ping(p) => Message::Ping(p),
        WireMessage::Ack(p) => Message::Ack(p),
        WireMessage::PingReq { target, probe } => Message::PingReq { target, probe_number: probe },
        WireMessage::IndirectPing { origin, probe } => {
            Message::IndirectPing { origin, probe_number: probe }
        }
        WireMessage::IndirectAck { target, probe } => {
            Message::IndirectAck { target, probe_number: probe }
        }
        WireMessage::ForwardedAck { origin, probe } => {
            Message::ForwardedAck { origin, probe_number: probe }
        }
        WireMessage::Announce => Message::Announce,
        WireMessage::Feed => Message::Feed,
        WireMessage::Gossip => Message::Gossip,
        WireMessage::Broadcast => Message::Broadcast,
        WireMessage::TurnUndead => Message::TurnUndead,
    }
}

fn state_to_wire(state: State) -> u8 {
    match state {
        State::Alive => 0,
        State::Suspect => 1,
        State::Down => 2,
    }
}

fn state_from_wire(byte: u8) -> Option<State> {
    match byte {
        0 => Some(State::Alive),
        1 => Some(State::Suspect),
        2 => Some(State::Down),
        _ => None,
    }
}

/// Writes `bytes` whole or not at all (foca requires a clean buffer on failure).
fn put_all(bytes: &[u8], mut buf: impl bytes::BufMut) -> Result<(), CodecError> {
    if buf.remaining_mut() < bytes.len() {
        return Err(CodecError::NoRoom {
            needed_bytes: bytes.len(),
            available_bytes: buf.remaining_mut(),
        });
    }
    buf.put_slice(bytes);
    Ok(())
}

/// Decodes one MessagePack item from the front of `buf` and advances it.
fn take_item<T: for<'de> Deserialize<'de>>(mut buf: impl bytes::Buf) -> Result<T, CodecError> {
    let chunk = buf.chunk();
    if chunk.is_empty() {
        return Err(CodecError::Truncated);
    }
    let mut reader: &[u8] = chunk;
    let item = rmp_serde::decode::from_read(&mut reader)?;
    let consumed = chunk.len() - reader.len();
    buf.advance(consumed);
    Ok(item)
}

impl Codec<NodeIdentity> for WireCodec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<NodeIdentity>,
        buf: impl bytes::BufMut,
    ) -> Result<(), CodecError> {
        let wire = WireHeader {
            src: header.src,
            src_incarnation: header.src_incarnation,
            dst: header.dst,
            message: message_to_wire(&header.message),
        };
        let mut bytes = vec![WIRE_VERSION];
        rmp_serde::encode::write(&mut bytes, &wire)?;
        put_all(&bytes, buf)
    }

    fn decode_header(
        &mut self,
        mut buf: impl bytes::Buf,
    ) -> Result<Header<NodeIdentity>, CodecError> {
        if !buf.has_remaining() {
            return Err(CodecError::Truncated);
        }
        let version = buf.get_u8();
        if version != WIRE_VERSION {
            return Err(CodecError::UnknownVersion { version });
        }
        let wire: WireHeader = take_item(buf)?;
        Ok(Header {
            src: wire.src,
            src_incarnation: wire.src_incarnation,
            dst: wire.dst,
            message: message_from_wire(wire.message),
        })
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeIdentity>,
        buf: impl bytes::BufMut,
    ) -> Result<(), CodecError> {
        let wire = WireMember {
            id: *member.id(),
            incarnation: member.incarnation(),
            state: state_to_wire(member.state()),
        };
        let bytes = rmp_serde::encode::to_vec(&wire)?;
        put_all(&bytes, buf)
    }

    fn decode_member(&mut self, buf: impl bytes::Buf) -> Result<Member<NodeIdentity>, CodecError> {
        let wire: WireMember = take_item(buf)?;
        let state = state_from_wire(wire.state)
            .ok_or(CodecError::Malformed { source: rmp_serde::decode::Error::OutOfRange })?;
        Ok(Member::new(wire.id, wire.incarnation, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeMeta;
    use bytes::BufMut;
    use rand::{RngExt, SeedableRng};

    fn id(n: u64) -> NodeIdentity {
        NodeIdentity {
            node_id: u64::MAX - n,
            gossip_addr: format!("[2001:db8::{n}]:65000").parse().unwrap(),
            bump: u64::MAX - 1,
            meta: NodeMeta {
                http_addr: "255.255.255.255:65535".parse().unwrap(),
                peer_addr: "[2001:db8::ffff]:65535".parse().unwrap(),
                invariants_hash: u64::MAX,
            },
        }
    }

    fn sample_packet() -> Vec<u8> {
        let mut codec = WireCodec;
        let mut buf = Vec::new();
        let header = Header {
            src: id(1),
            src_incarnation: 7,
            dst: id(2),
            message: Message::PingReq { target: id(3), probe_number: 9 },
        };
        codec.encode_header(&header, &mut buf).unwrap();
        buf.put_u16(2);
        codec.encode_member(&Member::new(id(4), 3, State::Suspect), &mut buf).unwrap();
        codec.encode_member(&Member::new(id(5), 0, State::Down), &mut buf).unwrap();
        buf
    }

    #[test]
    fn header_and_members_round_trip() {
        let packet = sample_packet();
        let mut codec = WireCodec;
        let mut rest: &[u8] = &packet;
        let header = codec.decode_header(&mut rest).unwrap();
        assert_eq!(header.src, id(1));
        assert_eq!(header.src_incarnation, 7);
        assert!(
            matches!(header.message, Message::PingReq { target, probe_number: 9 } if target == id(3))
        );
        assert_eq!(bytes::Buf::get_u16(&mut rest), 2);
        let m = codec.decode_member(&mut rest).unwrap();
        assert_eq!((m.id(), m.incarnation(), m.state()), (&id(4), 3, State::Suspect));
        let m = codec.decode_member(&mut rest).unwrap();
        assert_eq!(m.state(), State::Down);
        assert!(rest.is_empty());
    }

    #[test]
    fn worst_case_identity_stays_small() {
        let mut codec = WireCodec;
        let mut buf = Vec::new();
        codec.encode_member(&Member::new(id(1), u16::MAX, State::Alive), &mut buf).unwrap();
        // IPv6 everywhere and every integer at its widest.
        assert!(buf.len() <= 120, "member encodes to {} bytes", buf.len());
    }

    #[test]
    fn encoding_leaves_a_full_buffer_clean() {
        let mut codec = WireCodec;
        let mut storage = Vec::new();
        let mut buf = (&mut storage).limit(10);
        let err = codec.encode_member(&Member::alive(id(1)), &mut buf);
        assert!(matches!(err, Err(CodecError::NoRoom { .. })));
        assert!(storage.is_empty());
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut packet = sample_packet();
        packet[0] = WIRE_VERSION + 1;
        let err = WireCodec.decode_header(&mut &packet[..]);
        assert!(
            matches!(err, Err(CodecError::UnknownVersion { version }) if version == WIRE_VERSION + 1)
        );
    }

    /// A small fuzz: truncations, bit flips and random bytes never panic.
    #[test]
    fn decoding_garbage_never_panics() {
        let seed = 0x5eed_0001;
        println!("seed {seed:#x}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let packet = sample_packet();
        let mut codec = WireCodec;
        let mut decode_all = |bytes: &[u8]| {
            let mut rest = bytes;
            if codec.decode_header(&mut rest).is_ok() {
                while codec.decode_member(&mut rest).is_ok() {}
            }
        };
        for cut in 0..packet.len() {
            decode_all(&packet[..cut]);
        }
        for _ in 0..20_000 {
            let mut mutated = packet.clone();
            for _ in 0..rng.random_range(1..8) {
                let at = rng.random_range(0..mutated.len());
                mutated[at] = rng.random();
            }
            decode_all(&mutated);
            let len = rng.random_range(0..1500);
            let mut noise = vec![WIRE_VERSION; len];
            rng.fill(&mut noise[..]);
            if let Some(first) = noise.first_mut() {
                *first = WIRE_VERSION;
            }
            decode_all(&noise);
        }
    }
}
