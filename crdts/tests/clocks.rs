//! Version vectors and causal contexts: join laws and the compaction invariant,
//! over contexts built from random sets of dots.

use calmkv_crdts::{decode, encode, CausalContext, Dot, NodeId, VersionVector};
use proptest::prelude::*;
use std::collections::BTreeSet;

fn dots() -> impl Strategy<Value = BTreeSet<Dot>> {
    prop::collection::btree_set(
        (1u64..4, 1u64..12).prop_map(|(n, c)| Dot::new(NodeId(n), c)),
        0..20,
    )
}

fn vv() -> impl Strategy<Value = VersionVector> {
    prop::collection::btree_map((1u64..4).prop_map(NodeId), 0u64..6, 0..4)
        .prop_map(VersionVector::from)
}

/// No cloud dot is covered by the vector or directly follows its node's entry.
fn is_compact(ctx: &CausalContext) -> bool {
    ctx.cloud().iter().all(|dot| dot.counter > ctx.vv().get(dot.node) + 1)
}

proptest! {
    #[test]
    fn prop_context_holds_exactly_the_dots_it_was_given(given in dots()) {
        let ctx = CausalContext::from_dots(given.iter().copied());
        prop_assert!(is_compact(&ctx));
        for node in 1..4 {
            for counter in 1..14 {
                let dot = Dot::new(NodeId(node), counter);
                prop_assert_eq!(ctx.contains(&dot), given.contains(&dot), "{}", dot);
            }
        }
    }

    #[test]
    fn prop_context_join_is_union(a in dots(), b in dots(), c in dots()) {
        let [x, y, z] = [&a, &b, &c].map(|d| CausalContext::from_dots(d.iter().copied()));
        let join = |p: &CausalContext, q: &CausalContext| { let mut r = p.clone(); r.join(q); r };
        prop_assert_eq!(join(&x, &y), join(&y, &x));
        prop_assert_eq!(join(&join(&x, &y), &z), join(&x, &join(&y, &z)));
        prop_assert_eq!(join(&x, &x), x.clone());
        let union = CausalContext::from_dots(a.union(&b).copied());
        prop_assert_eq!(join(&x, &y), union);
        prop_assert!(is_compact(&join(&x, &y)));
        prop_assert!(join(&x, &y).dominates(&x) && join(&x, &y).dominates(&y));
    }

    #[test]
    fn prop_next_dot_is_fresh(given in dots(), node in 1u64..4) {
        let ctx = CausalContext::from_dots(given.iter().copied());
        let next = ctx.next_dot(NodeId(node)).expect("small counters");
        prop_assert!(!ctx.contains(&next));
        prop_assert!(given.iter().all(|d| d.node != next.node || d.counter < next.counter));
    }

    #[test]
    fn prop_restriction_is_the_intersection(a in dots(), b in dots()) {
        let (x, y) = (CausalContext::from_dots(a.iter().copied()), CausalContext::from_dots(b.iter().copied()));
        let restricted = x.restricted_to(&y);
        let both = CausalContext::from_dots(a.intersection(&b).copied());
        prop_assert_eq!(&restricted, &both);
        prop_assert!(is_compact(&restricted));
        prop_assert!(x.dominates(&restricted) && y.dominates(&restricted));
    }

    #[test]
    fn prop_context_survives_encoding(given in dots()) {
        let ctx = CausalContext::from_dots(given);
        prop_assert_eq!(decode::<CausalContext>(&encode(&ctx).unwrap()).unwrap(), ctx);
    }

    #[test]
    fn prop_version_vector_join_is_the_pointwise_maximum(a in vv(), b in vv(), c in vv()) {
        let join = |p: &VersionVector, q: &VersionVector| { let mut r = p.clone(); r.join(q); r };
        prop_assert_eq!(join(&a, &b), join(&b, &a));
        prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)));
        prop_assert_eq!(join(&a, &a), a.clone());
        for node in (1..4).map(NodeId) {
            prop_assert_eq!(join(&a, &b).get(node), a.get(node).max(b.get(node)));
        }
    }

    #[test]
    fn prop_version_vector_order_agrees_with_dominance(a in vv(), b in vv()) {
        use std::cmp::Ordering::*;
        let expected = match (a.dominates(&b), b.dominates(&a)) {
            (true, true) => Some(Equal),
            (true, false) => Some(Greater),
            (false, true) => Some(Less),
            (false, false) => None,
        };
        prop_assert_eq!(a.partial_cmp(&b), expected);
        prop_assert_eq!(a.concurrent_with(&b), expected.is_none());
        prop_assert_eq!(a.concurrent_with(&b), b.concurrent_with(&a));
        prop_assert_eq!(a == b, expected == Some(Equal));
    }

    #[test]
    fn prop_compaction_keeps_only_what_is_above_the_stable_vector(a in vv(), stable in vv()) {
        let mut compacted = a.clone();
        compacted.compact(&stable);
        for node in (1..4).map(NodeId) {
            let expected = if a.get(node) > stable.get(node) { a.get(node) } else { 0 };
            prop_assert_eq!(compacted.get(node), expected);
        }
    }
}

#[test]
fn a_gap_in_the_dots_stays_in_the_cloud_until_it_closes() {
    let n = NodeId(7);
    let mut ctx = CausalContext::from_dots([Dot::new(n, 1), Dot::new(n, 3)]);
    assert_eq!(ctx.vv().get(n), 1);
    assert_eq!(ctx.cloud().len(), 1);
    ctx.insert(Dot::new(n, 2));
    assert_eq!(ctx.vv().get(n), 3);
    assert!(ctx.cloud().is_empty());
}

#[test]
fn increment_issues_consecutive_dots() {
    let mut vv = VersionVector::new();
    assert_eq!(vv.increment(NodeId(1)), Ok(Dot::new(NodeId(1), 1)));
    assert_eq!(vv.increment(NodeId(1)), Ok(Dot::new(NodeId(1), 2)));
    assert!(vv.contains(&Dot::new(NodeId(1), 2)));
    assert!(!vv.contains(&Dot::new(NodeId(1), 3)));
}

#[test]
fn zero_entries_do_not_make_vectors_differ() {
    let with_zero: VersionVector = [(NodeId(1), 2), (NodeId(2), 0)].into_iter().collect();
    let without: VersionVector = [(NodeId(1), 2)].into_iter().collect();
    assert_eq!(with_zero, without);
    assert_eq!(with_zero.len(), 1);
}

#[test]
fn a_context_claiming_a_nodes_last_dot_gives_an_error_not_a_panic() {
    let node = NodeId(7);
    let ctx = CausalContext::from_dots([Dot::new(node, u64::MAX)]);
    assert_eq!(ctx.next_dot(node), Err(calmkv_crdts::CrdtError::DotsExhausted { node }));
    let mut vv = VersionVector::new();
    vv.observe(node, u64::MAX);
    let before = vv.clone();
    assert_eq!(vv.increment(node), Err(calmkv_crdts::CrdtError::DotsExhausted { node }));
    assert_eq!(vv, before, "a refused increment changed the vector");
}

#[test]
fn restricting_a_forged_claim_costs_nothing_and_keeps_only_real_dots() {
    // A client claims node 1 up to u64::MAX and node 9, which never wrote.
    let mut forged = VersionVector::new();
    forged.observe(NodeId(1), u64::MAX);
    forged.observe(NodeId(9), 5);
    let forged = CausalContext::from(forged);
    let real = CausalContext::from_dots([
        Dot::new(NodeId(1), 1),
        Dot::new(NodeId(1), 2),
        Dot::new(NodeId(1), 40),
    ]);
    let restricted = forged.restricted_to(&real);
    assert_eq!(restricted, real);
    assert_eq!(restricted.next_dot(NodeId(1)), Ok(Dot::new(NodeId(1), 41)));
}
