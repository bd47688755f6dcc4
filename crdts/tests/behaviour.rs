//! Edge cases of each type, one behaviour per test.

use calmkv_crdts::{
    CausalContext, CausalCounter, Crdt, CrdtError, Dot, EwFlag, GCounter, Hlc, Limits, LwwRegister,
    MvRegister, NodeId, OrMap, OrSet, PnCounter, Value,
};
use serde_bytes::ByteBuf;

const A: NodeId = NodeId(0xA);
const B: NodeId = NodeId(0xB);

fn limits() -> Limits {
    Limits::default()
}

fn at(wall_ms: u64) -> Hlc {
    Hlc { wall_ms, logical: 0 }
}

fn members(set: &OrSet<&'static str>) -> Vec<&'static str> {
    set.members().copied().collect()
}

#[test]
fn empty_states_merge_to_empty_states() {
    assert_eq!(GCounter::new().merged(&GCounter::new()), GCounter::new());
    assert_eq!(PnCounter::new().merged(&PnCounter::new()).value(), 0);
    assert!(OrSet::<u8>::new().merged(&OrSet::new()).is_empty());
    assert!(MvRegister::<u8>::new().merged(&MvRegister::new()).is_empty());
    assert_eq!(LwwRegister::<u8>::new().merged(&LwwRegister::new()).get(), None);
    assert!(!EwFlag::new().merged(&EwFlag::new()).is_enabled());
    assert!(OrMap::<u8, EwFlag>::new().merged(&OrMap::new()).is_empty());
}

#[test]
fn merging_a_state_into_itself_changes_nothing() {
    let mut set = OrSet::new();
    set.add(A, "x", &limits()).unwrap();
    set.remove(&"x");
    set.add(A, "y", &limits()).unwrap();
    assert_eq!(set.merged(&set), set);

    let mut map: OrMap<&str, CausalCounter> = OrMap::new();
    map.update("n", &limits(), |c| c.incr(A, 3)).unwrap();
    assert_eq!(map.merged(&map), map);
}

#[test]
fn a_delta_merged_twice_or_late_changes_nothing_more() {
    let mut a = OrSet::new();
    let add = a.add(A, "x", &limits()).unwrap();
    let remove = a.remove(&"x");
    let mut b = OrSet::new();
    b.merge(&remove);
    b.merge(&add);
    b.merge(&add);
    assert_eq!(b, a);
    assert!(b.is_empty());
}

#[test]
fn counter_value_is_increments_minus_decrements_across_nodes() {
    let mut a = PnCounter::new();
    let mut b = PnCounter::new();
    a.incr(A, 10).unwrap();
    b.decr(B, 15).unwrap();
    a.merge(&b);
    assert_eq!(a.value(), -5);
    assert_eq!((a.increments(), a.decrements()), (10, 15));
}

#[test]
fn an_increment_past_u64_max_is_refused_and_changes_nothing() {
    let mut counter = GCounter::new();
    counter.incr(A, u64::MAX - 1).unwrap();
    let before = counter.clone();
    assert_eq!(counter.incr(A, 2), Err(CrdtError::CounterOverflow { node: A }));
    assert_eq!(counter, before);
    counter.incr(A, 1).unwrap();
    assert_eq!(counter.value(), u128::from(u64::MAX));
}

#[test]
fn shares_of_different_nodes_sum_beyond_u64_max() {
    let mut counter = PnCounter::new();
    counter.incr(A, u64::MAX).unwrap();
    counter.incr(B, u64::MAX).unwrap();
    assert_eq!(counter.value(), 2 * i128::from(u64::MAX));
}

#[test]
fn the_lww_write_with_the_highest_time_wins() {
    let mut a = LwwRegister::new();
    let mut b = LwwRegister::new();
    a.set(A, at(20), "late");
    b.set(B, at(10), "early");
    assert_eq!(a.merged(&b).get(), Some(&"late"));
    assert_eq!(b.merged(&a).get(), Some(&"late"));
}

#[test]
fn equal_lww_times_are_broken_by_node_id() {
    let mut a = LwwRegister::new();
    let mut b = LwwRegister::new();
    a.set(A, at(10), "from a");
    b.set(B, at(10), "from b");
    assert!(B > A);
    assert_eq!(a.merged(&b).get(), Some(&"from b"));
}

#[test]
fn an_lww_write_after_a_read_wins_even_with_a_slower_wall_clock() {
    let mut a = LwwRegister::new();
    a.set(A, at(1_000), "first");
    let mut b = a.clone();
    b.set(B, at(5), "second, causally later");
    assert_eq!(a.merged(&b).get(), Some(&"second, causally later"));
}

#[test]
fn concurrent_register_writes_become_siblings() {
    let mut a = MvRegister::new();
    let mut b = MvRegister::new();
    a.write(A, "a", &CausalContext::new(), &limits()).unwrap();
    b.write(B, "b", &CausalContext::new(), &limits()).unwrap();
    let merged = a.merged(&b);
    assert_eq!(merged.values().copied().collect::<Vec<_>>().len(), 2);
}

#[test]
fn a_write_with_a_read_context_supersedes_exactly_what_it_saw() {
    let mut a = MvRegister::new();
    a.write(A, "seen", &CausalContext::new(), &limits()).unwrap();
    let read = a.context().clone();
    let mut b = MvRegister::new();
    b.write(B, "unseen", &CausalContext::new(), &limits()).unwrap();
    a.merge(&b);
    a.write(A, "new", &read, &limits()).unwrap();
    let mut values: Vec<_> = a.values().copied().collect();
    values.sort();
    assert_eq!(values, ["new", "unseen"]);
}

#[test]
fn a_write_past_the_sibling_limit_is_refused_until_a_context_resolves_it() {
    let two = Limits { siblings_max: 2, ..limits() };
    let mut reg = MvRegister::new();
    reg.write(A, 1, &CausalContext::new(), &two).unwrap();
    reg.write(B, 2, &CausalContext::new(), &two).unwrap();
    let before = reg.clone();
    assert_eq!(
        reg.write(A, 3, &CausalContext::new(), &two),
        Err(CrdtError::TooManySiblings { siblings: 3, max: 2 })
    );
    assert_eq!(reg, before);
    let seen = reg.context().clone();
    reg.write(A, 3, &seen, &two).unwrap();
    assert_eq!(reg.values().copied().collect::<Vec<_>>(), [3]);
}

#[test]
fn deleting_a_register_keeps_its_context_as_a_tombstone() {
    let mut reg = MvRegister::new();
    reg.write(A, 1, &CausalContext::new(), &limits()).unwrap();
    let old = reg.clone();
    reg.clear();
    assert!(reg.is_empty());
    assert!(!reg.context().is_empty());
    // A late copy of the deleted value does not bring it back.
    assert!(reg.merged(&old).is_empty());
}

#[test]
fn an_add_concurrent_with_a_remove_of_the_same_element_survives() {
    let mut a = OrSet::new();
    a.add(A, "x", &limits()).unwrap();
    let mut b = a.clone();
    b.remove(&"x");
    a.add(A, "x", &limits()).unwrap();
    assert_eq!(members(&a.merged(&b)), ["x"]);
    assert_eq!(members(&b.merged(&a)), ["x"]);
}

#[test]
fn re_adding_a_removed_element_makes_it_a_member_again() {
    let mut set = OrSet::new();
    set.add(A, "x", &limits()).unwrap();
    set.remove(&"x");
    assert!(!set.contains(&"x"));
    set.add(B, "x", &limits()).unwrap();
    assert!(set.contains(&"x"));
}

#[test]
fn removing_an_absent_element_is_a_no_op() {
    let mut set: OrSet<&str> = OrSet::new();
    let delta = set.remove(&"ghost");
    assert!(delta.is_empty() && delta.context().is_empty());
    assert_eq!(set, OrSet::new());
}

#[test]
fn an_add_past_the_member_limit_is_refused_whole_and_changes_nothing() {
    let two = Limits { members_max: 2, ..limits() };
    let mut set = OrSet::new();
    set.add(A, "a", &two).unwrap();
    let before = set.clone();
    assert_eq!(
        set.add_all(A, ["b", "c"], &two),
        Err(CrdtError::LimitExceeded { kind: "set", members: 3, max: 2 })
    );
    assert_eq!(set, before);
    // Re-adding a member at the limit does not grow the set, so it is allowed.
    set.add(A, "b", &two).unwrap();
    set.add(A, "b", &two).unwrap();
    assert_eq!(set.len(), 2);
}

#[test]
fn concurrent_enable_and_disable_leave_the_flag_enabled() {
    let mut a = EwFlag::new();
    a.enable(A).unwrap();
    let mut b = a.clone();
    b.disable();
    a.enable(A).unwrap();
    assert!(a.merged(&b).is_enabled());
    assert!(b.merged(&a).is_enabled());
}

#[test]
fn a_disable_that_saw_every_enable_wins() {
    let mut a = EwFlag::new();
    a.enable(A).unwrap();
    let mut b = a.clone();
    b.disable();
    assert!(!a.merged(&b).is_enabled());
}

#[test]
fn a_map_update_concurrent_with_a_remove_of_the_field_survives() {
    let mut a: OrMap<&str, OrSet<&str>> = OrMap::new();
    a.update("cart", &limits(), |s| s.add(A, "apple", &limits())).unwrap();
    let mut b = a.clone();
    b.remove(&"cart");
    a.update("cart", &limits(), |s| s.add(A, "pear", &limits())).unwrap();
    let merged = a.merged(&b);
    assert_eq!(merged, b.merged(&a));
    // The remove took away what it saw (the apple); the concurrent pear stays.
    let cart = merged.get(&"cart").expect("the updated field survives");
    assert_eq!(members(&cart), ["pear"]);
}

#[test]
fn a_removed_counter_field_restarts_from_zero() {
    let mut map: OrMap<&str, CausalCounter> = OrMap::new();
    map.update("qty", &limits(), |c| c.incr(A, 5)).unwrap();
    let mut other = map.clone();
    map.remove(&"qty");
    assert!(!map.contains_key(&"qty"));
    map.update("qty", &limits(), |c| c.incr(A, 1)).unwrap();
    assert_eq!(map.get(&"qty").unwrap().value(), 1);
    // A replica still holding the old value agrees after the merge.
    other.merge(&map);
    assert_eq!(other.get(&"qty").unwrap().value(), 1);
}

#[test]
fn a_refused_nested_update_leaves_the_map_unchanged() {
    let one = Limits { members_max: 1, ..limits() };
    let mut map: OrMap<&str, OrSet<&str>> = OrMap::new();
    map.update("s", &one, |s| s.add(A, "x", &one)).unwrap();
    let before = map.clone();
    let refused = map.update("s", &one, |s| s.add(A, "y", &one));
    assert!(matches!(refused, Err(CrdtError::LimitExceeded { kind: "set", .. })));
    assert_eq!(map, before);
    let refused = map.update("t", &one, |s| s.add(A, "x", &one));
    assert_eq!(refused, Err(CrdtError::LimitExceeded { kind: "map", members: 2, max: 1 }));
    assert_eq!(map, before);
}

#[test]
fn nested_maps_merge_field_by_field() {
    type Doc = OrMap<&'static str, OrMap<&'static str, EwFlag>>;
    let mut a: Doc = OrMap::new();
    let mut b: Doc = OrMap::new();
    a.update("user", &limits(), |m| m.update("admin", &limits(), |f| f.enable(A))).unwrap();
    b.update("user", &limits(), |m| m.update("banned", &limits(), |f| f.enable(B))).unwrap();
    let merged = a.merged(&b);
    let user = merged.get(&"user").unwrap();
    assert_eq!(user.keys().copied().collect::<Vec<_>>(), ["admin", "banned"]);
}

/// A value whose map is nested `depth` deep, with a flag at the bottom.
fn nested(depth: usize) -> Value {
    fn write(
        map: &mut OrMap<String, Value>,
        depth: usize,
    ) -> Result<OrMap<String, Value>, calmkv_crdts::CrdtError> {
        map.update("f".to_string(), &limits(), |field| {
            if depth == 1 {
                field.with_flag(|f| f.enable(A))
            } else {
                field.with_map(|m| write(m, depth - 1))
            }
        })
    }
    let mut value = Value::new();
    value.with_map(|m| write(m, depth)).unwrap();
    value
}

#[test]
fn validate_accepts_what_local_writes_make() {
    assert_eq!(nested(Limits::DEPTH_MAX).validate(&limits()), Ok(()));
    let mut value = Value::new();
    value.with_set(|s| s.add_all(A, ["x".to_string()], &limits())).unwrap();
    assert_eq!(value.validate(&limits()), Ok(()));
}

#[test]
fn validate_refuses_maps_nested_past_the_depth_limit() {
    let depth = Limits::DEPTH_MAX + 1;
    assert_eq!(
        nested(depth).validate(&limits()),
        Err(CrdtError::TooDeep { depth, max: Limits::DEPTH_MAX })
    );
}

#[test]
fn validate_refuses_a_context_past_its_entry_limit_or_claiming_a_last_dot() {
    let small = Limits { context_entries_max: 2, ..limits() };
    let mut value = Value::new();
    for node in 1..=3u64 {
        value.with_flag(|f| f.enable(NodeId(node))).unwrap();
    }
    assert_eq!(value.validate(&small), Err(CrdtError::ContextTooLarge { entries: 3, max: 2 }));
    let mut forged = Value::new();
    let claim = CausalContext::from_dots([Dot::new(NodeId(9), u64::MAX)]);
    forged.delete(&claim);
    let dot = Dot::new(NodeId(9), u64::MAX);
    let too_high =
        CrdtError::Malformed { reason: calmkv_crdts::MalformedReason::DotTooHigh { dot } };
    assert_eq!(forged.validate(&limits()), Err(too_high));
}

#[test]
fn validate_refuses_oversized_members_and_too_many_siblings() {
    let tight = Limits { member_bytes_max: 3, siblings_max: 1, ..limits() };
    let mut set = Value::new();
    set.with_set(|s| s.add_all(A, ["long".to_string()], &limits())).unwrap();
    assert_eq!(set.validate(&tight), Err(CrdtError::TooLong { what: "member", bytes: 4, max: 3 }));
    let mut register = Value::new();
    for node in [A, B] {
        register
            .with_register(|r| {
                r.write(node, ByteBuf::from(vec![1]), &CausalContext::new(), &limits())
            })
            .unwrap();
    }
    assert_eq!(register.validate(&tight), Err(CrdtError::TooManySiblings { siblings: 2, max: 1 }));
}
