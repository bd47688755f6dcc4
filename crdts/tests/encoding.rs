//! The stored and transmitted encoding: committed samples of every type decode to
//! the states they were made from, byte for byte, and bad input is refused with a
//! typed error.
//!
//! The files under `tests/samples/v1/` were written by this test with
//! `CALMKV_WRITE_SAMPLES=1`; they are never rewritten for a format change that
//! keeps version 1 — a new version gets a new directory and keeps these.

use calmkv_crdts::{
    decode, encode, CausalContext, CausalCounter, DecodeError, Dot, EwFlag, GCounter, Hlc, Limits,
    LwwRegister, MvRegister, NodeId, OrMap, OrSet, PnCounter, Value, VersionVector,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;
use std::fmt::Debug;
use std::path::PathBuf;

const A: NodeId = NodeId(0x0123_4567_89ab_cdef);
const B: NodeId = NodeId(0xfedc_ba98_7654_3210);

fn check_sample<T: Serialize + DeserializeOwned + PartialEq + Debug>(name: &str, sample: T) {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/samples/v1/{name}.bin"));
    let encoded = encode(&sample).expect("encodes");
    if std::env::var_os("CALMKV_WRITE_SAMPLES").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &encoded).unwrap();
    }
    let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(decode::<T>(&stored).expect("the stored sample decodes"), sample, "{name}");
    assert_eq!(stored, encoded, "{name}: the encoding of version 1 changed");
}

#[test]
fn committed_samples_of_every_type_decode() {
    let limits = Limits::default();

    let mut g = GCounter::new();
    g.incr(A, 7).unwrap();
    g.incr(B, u64::MAX).unwrap();
    check_sample("g_counter", g);

    let mut pn = PnCounter::new();
    pn.incr(A, 10).unwrap();
    pn.decr(B, 3).unwrap();
    check_sample("pn_counter", pn);

    let mut lww = LwwRegister::new();
    lww.set(A, Hlc { wall_ms: 1_700_000_000_000, logical: 2 }, "hello".to_string());
    check_sample("lww_register", lww);

    let mut mv = MvRegister::new();
    mv.write(A, ByteBuf::from(b"one".to_vec()), &CausalContext::new(), &limits).unwrap();
    mv.write(B, ByteBuf::from(b"two".to_vec()), &CausalContext::new(), &limits).unwrap();
    check_sample("mv_register", mv);

    let mut set = OrSet::new();
    set.add_all(A, ["apple".to_string(), "pear".to_string()], &limits).unwrap();
    set.remove(&"apple".to_string());
    check_sample("or_set", set);

    let mut map: OrMap<String, CausalCounter> = OrMap::new();
    map.update("qty".into(), &limits, |c| c.incr(A, 2)).unwrap();
    map.update("gone".into(), &limits, |c| c.decr(B, 1)).unwrap();
    map.remove(&"gone".to_string());
    check_sample("or_map", map);

    let mut flag = EwFlag::new();
    flag.enable(A).unwrap();
    flag.enable(B).unwrap();
    check_sample("ew_flag", flag);

    let ctx = CausalContext::from_dots([Dot::new(A, 1), Dot::new(A, 2), Dot::new(B, 5)]);
    check_sample("causal_context", ctx);

    let mut value = Value::new();
    value
        .with_map(|m| m.update("qty".into(), &limits, |v| v.with_counter(|c| c.incr(A, 3))))
        .unwrap();
    value.with_set(|s| s.add(B, "concurrently a set".into(), &limits)).unwrap();
    check_sample("value", value);

    let vv: VersionVector = [(A, 3), (B, 9)].into_iter().collect();
    check_sample("version_vector", vv);
}

#[test]
fn empty_input_is_refused() {
    assert!(matches!(decode::<GCounter>(&[]), Err(DecodeError::Empty)));
}

#[test]
fn an_unknown_version_is_refused() {
    let mut bytes = encode(&GCounter::new()).unwrap();
    bytes[0] = 2;
    assert!(matches!(
        decode::<GCounter>(&bytes),
        Err(DecodeError::UnsupportedVersion { found: 2 })
    ));
}

#[test]
fn truncated_input_is_refused() {
    let mut set = OrSet::new();
    set.add(A, "x".to_string(), &Limits::default()).unwrap();
    let bytes = encode(&set).unwrap();
    for cut in 1..bytes.len() {
        let result = decode::<OrSet<String>>(&bytes[..cut]);
        assert!(matches!(result, Err(DecodeError::Malformed { .. })), "cut at {cut}: {result:?}");
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = encode(&GCounter::new()).unwrap();
    bytes.push(0);
    assert!(matches!(decode::<GCounter>(&bytes), Err(DecodeError::TrailingBytes { extra: 1 })));
}

#[test]
fn a_dot_with_counter_zero_is_refused() {
    let bytes = encode(&(1u64, 0u64)).unwrap();
    assert!(matches!(decode::<Dot>(&bytes), Err(DecodeError::Malformed { .. })));
}

#[test]
fn a_state_of_another_type_is_refused() {
    let bytes = encode(&PnCounter::new()).unwrap();
    assert!(decode::<OrSet<String>>(&bytes).is_err());
}

#[test]
fn a_decoded_context_is_compacted() {
    #[derive(Serialize)]
    struct RawContext {
        vv: std::collections::BTreeMap<u64, u64>,
        cloud: Vec<Dot>,
    }
    let raw = RawContext { vv: [(1, 1)].into(), cloud: vec![Dot::new(NodeId(1), 2)] };
    let ctx: CausalContext = decode(&encode(&raw).unwrap()).unwrap();
    assert_eq!(ctx.vv().get(NodeId(1)), 2);
    assert!(ctx.cloud().is_empty());
}
