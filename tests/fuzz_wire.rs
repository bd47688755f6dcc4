//! Fuzz-style properties for the decoders of network traffic: peer-channel
//! frame bodies (plain and sealed under a session key), quorum frames (plain
//! and sealed under a keyring), the peer handshake's hello, and gossip
//! packets. Each gets arbitrary bytes and structure-aware mutations of valid
//! encodings (bit flips, truncations, insertions, overwritten length
//! prefixes) and must answer with a typed error or a value, never a panic; a
//! mutated sealed frame must never open; any state a mutated plain frame
//! decodes to must pass through the admission check without panicking.
//!
//! The normal run makes 256 cases per property. For a soak:
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz_wire`.

use calmkv::replication::admission;
use calmkv::replication::anti_entropy::AntiEntropy;
use calmkv::replication::frame::{
    decode_body, decode_frame, encode_body, encode_frame, ClusterSecret, SessionKey,
};
use calmkv::replication::handshake::{Hello, HELLO_BYTES};
use calmkv::replication::message::PeerMessage;
use calmkv::{Action, Config, CounterOp, CrdtOp, Envelope, Key, Limits, MapOp, Op, SetOp};
use calmkv_gossip::auth::PacketAuth;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn state(op: CrdtOp) -> Envelope {
    let node = Config::in_memory().open_node().unwrap();
    let key = Key::new("k", node.limits()).unwrap();
    node.apply(&Op { key, action: Action::Crdt(op) }).unwrap().state
}

/// Valid messages of every kind, carrying states of several types.
fn messages() -> Vec<PeerMessage> {
    let counter = state(CrdtOp::Counter(CounterOp::Incr(3)));
    let set = state(CrdtOp::Set(SetOp { add: vec!["a".into(), "b".into()], remove: vec![] }));
    let nested = CrdtOp::Map(MapOp {
        update: BTreeMap::from([("n".to_string(), CrdtOp::Register("v".into()))]),
        remove: vec![],
    });
    let map = state(CrdtOp::Map(MapOp {
        update: BTreeMap::from([("f".to_string(), nested)]),
        remove: vec![],
    }));
    vec![
        PeerMessage::Deltas {
            deltas: vec![("c".into(), counter.clone()), ("m".into(), map.clone())],
            ack: Some(9),
        },
        PeerMessage::Acked { id: 9 },
        PeerMessage::Read { id: 1, key: "k".into() },
        PeerMessage::ReadReply { id: 1, state: set.clone() },
        PeerMessage::AntiEntropy(AntiEntropy::Top { groups: vec![1, 2, 3] }),
        PeerMessage::AntiEntropy(AntiEntropy::States {
            states: vec![("s".into(), set), ("m".into(), map)],
            want: vec!["x".into()],
        }),
        PeerMessage::Ping,
        PeerMessage::Part { message: 1, index: 0, total: 1 << 21, bytes: vec![1, 2, 3] },
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: prop::sample::Index, bit: u8 },
    Truncate { at: prop::sample::Index },
    Insert { at: prop::sample::Index, bytes: Vec<u8> },
    Overwrite { at: prop::sample::Index, value: u32 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
        (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<prop::sample::Index>(), any::<u32>())
            .prop_map(|(at, value)| Mutation::Overwrite { at, value }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Flip { at, bit } => {
                let i = at.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            Mutation::Truncate { at } => bytes.truncate(at.index(bytes.len())),
            Mutation::Insert { at, bytes: more } => {
                let i = at.index(bytes.len());
                bytes.splice(i..i, more.iter().copied());
            }
            Mutation::Overwrite { at, value } => {
                // A MessagePack length (array32/map32/bin32/str32) or any u32.
                let i = at.index(bytes.len());
                let end = (i + 4).min(bytes.len());
                bytes[i..end].copy_from_slice(&value.to_be_bytes()[..end - i]);
            }
        }
    }
    bytes
}

fn secret() -> ClusterSecret {
    ClusterSecret::parse("a cluster secret for fuzzing,and a second one to accept").unwrap()
}

/// Every state a decoded message carries goes through the admission check.
fn admit_all(message: &PeerMessage) {
    let limits = Limits::default();
    let states: Vec<&Envelope> = match message {
        PeerMessage::Deltas { deltas, .. } => deltas.iter().map(|(_, s)| s).collect(),
        PeerMessage::ReadReply { state, .. } => vec![state],
        PeerMessage::AntiEntropy(AntiEntropy::States { states, .. }) => {
            states.iter().map(|(_, s)| s).collect()
        }
        _ => vec![],
    };
    for state in states {
        let _ = admission::check(state, &limits, 3);
    }
}

proptest! {
    #[test]
    fn prop_arbitrary_bytes_never_panic_the_wire_decoders(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(message) = decode_body::<PeerMessage>(&bytes) {
            admit_all(&message);
        }
        let _ = decode_frame::<PeerMessage>(&bytes, None);
        prop_assert!(decode_frame::<PeerMessage>(&bytes, Some(&secret())).is_err());
        let mut sealed = bytes.clone();
        prop_assert!(!SessionKey::new([7; 32]).open(0, &mut sealed));
        prop_assert_eq!(PacketAuth::new(b"a gossip secret of some length").open(&bytes), None);
        let mut hello = [0u8; HELLO_BYTES];
        let n = bytes.len().min(HELLO_BYTES);
        hello[..n].copy_from_slice(&bytes[..n]);
        let _ = Hello::decode(&hello);
    }

    #[test]
    fn prop_mutated_plain_frames_decode_or_fail_cleanly(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let messages = messages();
        let message = &messages[which.index(messages.len())];
        let body = mutate(encode_body(message).unwrap(), &mutations);
        if let Ok(decoded) = decode_body::<PeerMessage>(&body) {
            admit_all(&decoded);
        }
        let frame = encode_frame(message, None).unwrap();
        let _ = decode_frame::<PeerMessage>(&mutate(frame[4..].to_vec(), &mutations), None);
    }

    #[test]
    fn prop_mutated_sealed_frames_never_open(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
        seq in 0u64..4,
    ) {
        let messages = messages();
        let message = &messages[which.index(messages.len())];
        // Quorum frames under the keyring.
        let frame = encode_frame(message, Some(&secret())).unwrap();
        let original = frame[4..].to_vec();
        let mutated = mutate(original.clone(), &mutations);
        if mutated != original {
            prop_assert!(decode_frame::<PeerMessage>(&mutated, Some(&secret())).is_err());
        }
        // Peer frames under a session key, at their sequence number.
        let key = SessionKey::new([3; 32]);
        let mut sealed = encode_body(message).unwrap();
        key.seal(seq, &mut sealed);
        let original = sealed.clone();
        let mut mutated = mutate(sealed, &mutations);
        if mutated != original {
            prop_assert!(!key.open(seq, &mut mutated));
        }
        // Gossip packets.
        let auth = PacketAuth::new(b"a gossip secret of some length");
        let mut packet = encode_body(message).unwrap();
        packet.truncate(1200);
        auth.seal(&mut packet);
        let mutated = mutate(packet.clone(), &mutations);
        if mutated != packet {
            prop_assert_eq!(auth.open(&mutated), None);
        }
    }
}
