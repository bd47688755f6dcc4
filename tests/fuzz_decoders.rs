//! Fuzz-style properties for every decoder that reads bytes from outside:
//! context tokens, stored and replicated key states, invariant declarations,
//! the gossip state file. Each gets arbitrary bytes and structure-aware
//! mutations of valid encodings (bit flips, truncations, insertions, spliced
//! length prefixes), and must answer with a typed error or a value, never a
//! panic, a hang or a huge allocation. A decoded state must also survive the
//! checks and merges the node runs on it.
//!
//! The normal run makes 256 cases per property. For a soak:
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz_decoders`.

use calmkv::envelope::Envelope;
use calmkv::invariants::Invariants;
use calmkv_crdts::{
    decode, encode, CausalContext, Crdt, Dot, Hlc, Limits, NodeId, Value, VersionVector,
};
use proptest::prelude::*;
use serde_bytes::ByteBuf;

/// A few states of every kind, encoded: the seeds mutations start from.
fn samples() -> Vec<Vec<u8>> {
    let limits = Limits::default();
    let (a, b) = (NodeId(1), NodeId(u64::MAX - 1));
    let mut register = Envelope::default();
    register
        .value
        .with_register(|r| {
            r.write(a, ByteBuf::from(b"hello".to_vec()), &CausalContext::new(), &limits)
        })
        .unwrap();
    let mut counter = Envelope::default();
    counter.value.with_counter(|c| c.incr(a, 5)).unwrap();
    counter.value.with_counter(|c| c.decr(b, 2)).unwrap();
    let mut set = Envelope::default();
    set.value.with_set(|s| s.add_all(a, ["x".to_string(), "y".to_string()], &limits)).unwrap();
    let mut map = Envelope::default();
    map.value
        .with_map(|m| m.update("f".to_string(), &limits, |v| v.with_flag(|f| f.enable(b))))
        .unwrap();
    let mut lww = Envelope::default();
    lww.lww.set(a, Hlc { wall_ms: 17, logical: 2 }, ByteBuf::from(vec![1, 2, 3]));
    let mut vv = VersionVector::new();
    vv.observe(a, 3);
    let ctx = CausalContext::from(vv);
    let mut gapped = ctx.clone();
    gapped.insert(Dot::new(b, 9));
    let mut out: Vec<Vec<u8>> =
        [register, counter, set, map, lww].iter().map(|e| encode(e).unwrap()).collect();
    out.push(encode(&ctx).unwrap());
    out.push(encode(&gapped).unwrap());
    out
}

/// One mutation of an encoding.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: prop::sample::Index,
        bit: u8,
    },
    Truncate {
        at: prop::sample::Index,
    },
    Insert {
        at: prop::sample::Index,
        bytes: Vec<u8>,
    },
    /// A MessagePack length prefix announcing a huge container or string.
    HugeLength {
        at: prop::sample::Index,
        marker: u8,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let index = any::<prop::sample::Index>();
    prop_oneof![
        (index.clone(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        index.clone().prop_map(|at| Mutation::Truncate { at }),
        (index.clone(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        // array32, map32, bin32, str32
        (index, prop::sample::select(vec![0xdd, 0xdf, 0xc6, 0xdb]))
            .prop_map(|(at, marker)| Mutation::HugeLength { at, marker }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            bytes.push(0);
        }
        match m {
            Mutation::Flip { at, bit } => {
                let i = at.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            Mutation::Truncate { at } => bytes.truncate(at.index(bytes.len())),
            Mutation::Insert { at, bytes: extra } => {
                let i = at.index(bytes.len() + 1);
                bytes.splice(i..i, extra.iter().copied());
            }
            Mutation::HugeLength { at, marker } => {
                let i = at.index(bytes.len() + 1);
                bytes.splice(i..i, [*marker, 0xff, 0xff, 0xff, 0xf0]);
            }
        }
    }
    bytes
}

fn inputs() -> impl Strategy<Value = Vec<u8>> {
    let samples = samples();
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        3 => (prop::sample::select(samples), prop::collection::vec(mutation(), 1..4))
            .prop_map(|(sample, mutations)| mutate(sample, &mutations)),
    ]
}

/// What the node does with a key state it decoded from a peer or its disk.
fn use_state(envelope: &Envelope) {
    let limits = calmkv::Limits::default().crdt();
    let valid = envelope.value.validate(&limits).is_ok();
    let _ = envelope.types();
    let _ = envelope.value.counter().value();
    let _ = envelope.value.register().values().count();
    let _ = envelope.value.set().members().count();
    let _ = envelope.value.map().fields().count();
    let mut merged = Envelope::default();
    merged.merge(envelope);
    merged.merge(envelope);
    if valid {
        // What the node accepts behaves as a state: merging it is idempotent
        // and leaves it as it was.
        assert_eq!(&merged, envelope, "a validated state changed by merging it into the bottom");
    }
}

proptest! {
    #[test]
    fn prop_a_key_state_from_outside_decodes_or_is_refused(bytes in inputs()) {
        if let Ok(envelope) = decode::<Envelope>(&bytes) {
            use_state(&envelope);
        }
        if let Ok(value) = decode::<Value>(&bytes) {
            let _ = value.validate(&Limits::default());
        }
    }

    #[test]
    fn prop_a_context_token_decodes_or_is_refused(bytes in inputs()) {
        if let Ok(ctx) = decode::<CausalContext>(&bytes) {
            // A decoded context is compact and survives a round trip.
            let again: CausalContext = decode(&encode(&ctx).unwrap()).unwrap();
            prop_assert_eq!(&again, &ctx);
            let _ = ctx.next_dot(NodeId(1));
            let _ = ctx.restricted_to(&CausalContext::new());
        }
    }

    #[test]
    fn prop_a_declarations_file_parses_or_is_refused(text in declarations_text()) {
        if let Ok(invariants) = Invariants::parse(&text) {
            let _ = invariants.hash();
        }
    }

    #[test]
    fn prop_a_gossip_state_file_loads_or_is_refused(bytes in inputs()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let mut with_version = vec![1u8];
        with_version.extend_from_slice(&bytes);
        for content in [&bytes, &with_version] {
            std::fs::write(&path, content).unwrap();
            let _ = calmkv_gossip::state_file::load(&path);
        }
    }
}

/// Valid declarations, mutated as text, and arbitrary strings.
fn declarations_text() -> impl Strategy<Value = String> {
    let valid = r#"
[[invariant]]
keys = "account/*"
type = "counter"
min = 0

[[invariant]]
keys = "username/*"
unique = true

[[invariant]]
keys = "cart/*"
type = "set"
max_size = 50
"#;
    prop_oneof![
        1 => ".{0,200}",
        3 => (prop::collection::vec(mutation(), 1..4))
            .prop_map(move |m| String::from_utf8_lossy(&mutate(valid.as_bytes().to_vec(), &m)).into_owned()),
    ]
}

#[test]
fn a_huge_announced_length_allocates_nothing_large() {
    // bin32 announcing 4 GiB after the version byte, with 3 bytes behind it.
    for marker in [0xc6u8, 0xdb, 0xdd, 0xdf] {
        let bytes = [1, marker, 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(decode::<Envelope>(&bytes).is_err());
        assert!(decode::<CausalContext>(&bytes).is_err());
    }
}

#[test]
fn a_state_holding_an_unseen_dot_or_an_empty_member_is_malformed() {
    use calmkv_crdts::{CrdtError, MalformedReason};
    let unseen: Value =
        serde_json::from_str(r#"{"store":{"flag":[[5,1]]},"ctx":{"vv":{},"cloud":[]}}"#).unwrap();
    assert_eq!(
        unseen.validate(&Limits::default()),
        Err(CrdtError::Malformed {
            reason: MalformedReason::UnseenDot { dot: Dot::new(NodeId(5), 1) }
        })
    );
    let empty: Value =
        serde_json::from_str(r#"{"store":{"set":{"x":[]}},"ctx":{"vv":{},"cloud":[]}}"#).unwrap();
    assert_eq!(
        empty.validate(&Limits::default()),
        Err(CrdtError::Malformed { reason: MalformedReason::EmptyEntry })
    );
    let fine: Value =
        serde_json::from_str(r#"{"store":{"set":{"x":[[5,1]]}},"ctx":{"vv":{},"cloud":[[5,1]]}}"#)
            .unwrap();
    assert_eq!(fine.validate(&Limits::default()), Ok(()));
}
