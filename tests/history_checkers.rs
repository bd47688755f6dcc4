//! The history checkers' own tests: each checker accepts histories calmkv may
//! produce and rejects one known to be bad, so a checker that could not fail
//! is caught here before it passes a simulation.

mod checkers;

use checkers::counter::{self, CounterOp};
use checkers::invariants::{self, Observation, Observed, Rule};
use checkers::linearizable::{self, Claim, ClaimOp, ClaimRet};
use checkers::register::{self, LwwOp, LwwRet, MvOp};
use checkers::set::{self, SetOp};
use checkers::{convergence, History, Outcome};
use std::collections::{BTreeMap, BTreeSet};

fn members(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn bytes(values: &[&str]) -> BTreeSet<Vec<u8>> {
    values.iter().map(|v| v.as_bytes().to_vec()).collect()
}

// --- sets

fn set_history() -> History<SetOp, set::SetRet> {
    let mut h = History::new();
    h.record(0, SetOp::Add("a".into()), Outcome::Ok(None));
    h.record(1, SetOp::Add("b".into()), Outcome::Ok(None));
    h.record(0, SetOp::Read, Outcome::Ok(Some(members(&["a"]))));
    h.record(1, SetOp::Add("c".into()), Outcome::Indeterminate);
    h
}

#[test]
fn set_accepts_a_history_with_every_add_settled() {
    set::check(&set_history(), &members(&["a", "b"]), true).unwrap();
    set::check(&set_history(), &members(&["a", "b", "c"]), true).unwrap();
}

#[test]
fn set_rejects_a_lost_acknowledged_add() {
    let err = set::check(&set_history(), &members(&["a"]), true).unwrap_err();
    assert!(err.0.contains("\"b\"") && err.0.contains("lost"), "{err}");
}

#[test]
fn set_accepts_an_add_removed_later_and_rejects_one_removed_before_it_was_acknowledged() {
    let mut h = set_history();
    h.record(1, SetOp::Remove("b".into()), Outcome::Ok(None));
    set::check(&h, &members(&["a"]), true).unwrap();
    // A remove invoked before the add was acknowledged could not have seen it.
    let mut h = History::new();
    let remove = h.invoke(1, SetOp::Remove("b".into()));
    h.record(0, SetOp::Add("b".into()), Outcome::Ok(None));
    h.complete(remove, Outcome::Ok(None));
    let err = set::check(&h, &members(&[]), true).unwrap_err();
    assert!(err.0.contains("lost"), "{err}");
}

#[test]
fn set_rejects_a_member_never_added() {
    let mut h = set_history();
    h.record(1, SetOp::Read, Outcome::Ok(Some(members(&["b", "z"]))));
    let err = set::check(&h, &members(&["a", "b"]), true).unwrap_err();
    assert!(err.0.contains("\"z\""), "{err}");
    let err = set::check(&set_history(), &members(&["a", "b", "y"]), true).unwrap_err();
    assert!(err.0.contains("never added"), "{err}");
}

#[test]
fn set_rejects_a_failed_add_that_shows_up() {
    let mut h = set_history();
    h.record(0, SetOp::Add("f".into()), Outcome::Failed);
    let err = set::check(&h, &members(&["a", "b", "f"]), true).unwrap_err();
    assert!(err.0.contains("\"f\""), "{err}");
}

#[test]
fn set_rejects_a_member_that_vanishes_from_a_replica_and_allows_it_across_a_lossy_crash() {
    let mut h = set_history();
    h.record(0, SetOp::Read, Outcome::Ok(Some(members(&[]))));
    let err = set::check(&h, &members(&["a", "b"]), true).unwrap_err();
    assert!(err.0.contains("replica 0 showed \"a\""), "{err}");
    let mut h = set_history();
    h.crash(0);
    h.record(0, SetOp::Read, Outcome::Ok(Some(members(&[]))));
    set::check(&h, &members(&["a", "b"]), false).unwrap();
    set::check(&h, &members(&["a", "b"]), true).unwrap_err();
}

// --- counters

fn counter_history() -> History<CounterOp, counter::CounterRet> {
    let mut h = History::new();
    h.record(0, CounterOp::Add(5), Outcome::Ok(None));
    h.record(1, CounterOp::Add(3), Outcome::Ok(None));
    h.record(1, CounterOp::Add(-2), Outcome::Indeterminate);
    h.record(0, CounterOp::Add(7), Outcome::Failed);
    h
}

#[test]
fn counter_accepts_reads_between_the_bounds() {
    let mut h = counter_history();
    h.record(0, CounterOp::Read, Outcome::Ok(Some(5))); // has not seen node 1's yet
    h.record(1, CounterOp::Read, Outcome::Ok(Some(1))); // 3 − 2
    h.record(0, CounterOp::Read, Outcome::Ok(Some(6)));
    counter::check(&h, 6, true).unwrap();
    counter::check(&h, 8, true).unwrap(); // the indeterminate decrement never landed
}

#[test]
fn counter_rejects_a_read_missing_its_own_acknowledged_increment() {
    let mut h = counter_history();
    // 5 − 2 = 3 is possible (the indeterminate decrement landed, node 1's
    // increment had not); 2 is not.
    h.record(0, CounterOp::Read, Outcome::Ok(Some(3)));
    counter::check(&h, 6, true).unwrap();
    h.record(0, CounterOp::Read, Outcome::Ok(Some(2)));
    let err = counter::check(&h, 6, true).unwrap_err();
    assert!(err.0.contains("outside [3, 8]"), "{err}");
}

#[test]
fn counter_rejects_a_read_above_every_attempted_increment() {
    let mut h = counter_history();
    h.record(1, CounterOp::Read, Outcome::Ok(Some(15))); // counts the failed 7
    let err = counter::check(&h, 6, true).unwrap_err();
    assert!(err.0.contains("read 15"), "{err}");
}

#[test]
fn counter_rejects_a_settled_value_that_lost_an_update() {
    let err = counter::check(&counter_history(), 5, true).unwrap_err();
    assert!(err.0.contains("settled value 5 is outside [6, 8]"), "{err}");
    let err = counter::check(&counter_history(), 15, true).unwrap_err();
    assert!(err.0.contains("settled"), "{err}");
}

// --- registers

fn write(value: &str, covers: &[&str]) -> MvOp {
    MvOp::Write { value: value.as_bytes().to_vec(), covers: bytes(covers) }
}

#[test]
fn mv_register_accepts_siblings_and_causal_overwrites() {
    let mut h = History::new();
    h.record(0, write("x", &[]), Outcome::Ok(None));
    h.record(1, write("y", &[]), Outcome::Ok(None));
    register::check_mv(&h, &bytes(&["x", "y"])).unwrap();
    h.record(0, write("z", &["x", "y"]), Outcome::Ok(None));
    register::check_mv(&h, &bytes(&["z"])).unwrap();
}

#[test]
fn mv_register_rejects_a_lost_write_a_resurrected_one_and_a_phantom() {
    let mut h = History::new();
    h.record(0, write("x", &[]), Outcome::Ok(None));
    h.record(1, write("y", &[]), Outcome::Ok(None));
    let err = register::check_mv(&h, &bytes(&["x"])).unwrap_err();
    assert!(err.0.contains("lost"), "{err}");
    h.record(0, write("z", &["x"]), Outcome::Ok(None));
    let err = register::check_mv(&h, &bytes(&["x", "y", "z"])).unwrap_err();
    assert!(err.0.contains("overwritten"), "{err}");
    let err = register::check_mv(&h, &bytes(&["y", "z", "q"])).unwrap_err();
    assert!(err.0.contains("never written"), "{err}");
    h.record(1, MvOp::Read, Outcome::Ok(Some(bytes(&["w"]))));
    let err = register::check_mv(&h, &bytes(&["y", "z"])).unwrap_err();
    assert!(err.0.contains("no write before it"), "{err}");
}

/// Stamps as calmkv orders them: (wall ms, logical, node).
type Stamp = (u64, u32, u64);

#[test]
fn lww_register_takes_the_greatest_stamp_whatever_the_order_of_writes() {
    let mut h: History<LwwOp, LwwRet<Stamp>> = History::new();
    // Node 2's clock runs ahead: its earlier write carries the greater stamp.
    h.record(1, LwwOp::Write(b"ahead".to_vec()), Outcome::Ok(LwwRet::Stamped((9_000, 0, 2))));
    h.record(0, LwwOp::Write(b"later".to_vec()), Outcome::Ok(LwwRet::Stamped((5_000, 0, 1))));
    register::check_lww(&h, Some(b"ahead")).unwrap();
    let err = register::check_lww(&h, Some(b"later")).unwrap_err();
    assert!(err.0.contains("not the greatest"), "{err}");
    let err = register::check_lww(&h, None).unwrap_err();
    assert!(err.0.contains("lost"), "{err}");
    let err = register::check_lww(&h, Some(b"never")).unwrap_err();
    assert!(err.0.contains("never written"), "{err}");
    // Equal wall clocks: the node id breaks the tie.
    h.record(2, LwwOp::Write(b"tie".to_vec()), Outcome::Ok(LwwRet::Stamped((9_000, 0, 3))));
    register::check_lww(&h, Some(b"tie")).unwrap();
    register::check_lww(&h, Some(b"ahead")).unwrap_err();
}

// --- invariants

#[test]
fn invariants_reject_a_negative_balance_an_oversized_set_and_two_owners() {
    let rules = [
        Rule::CounterMin { prefix: "account/".into(), min: 0 },
        Rule::CounterMax { prefix: "quota/".into(), max: 10 },
        Rule::SetMaxSize { prefix: "cart/".into(), max: 2 },
        Rule::Unique { prefix: "username/".into() },
    ];
    let look = |replica, key: &str, value| Observation { replica, at: 1, key: key.into(), value };
    let good = vec![
        look(0, "account/1", Observed::Counter(0)),
        look(1, "other/1", Observed::Counter(-5)),
        look(0, "quota/1", Observed::Counter(10)),
        look(0, "cart/1", Observed::Set(members(&["a", "b"]))),
        look(0, "username/u", Observed::Register(bytes(&["n1"]))),
        look(1, "username/u", Observed::Register(bytes(&["n1"]))),
        look(2, "username/u", Observed::Register(bytes(&[]))),
    ];
    invariants::check(&rules, &good).unwrap();
    let bad = [
        (look(1, "account/1", Observed::Counter(-1)), "below its minimum"),
        (look(1, "quota/1", Observed::Counter(11)), "above its maximum"),
        (look(1, "cart/1", Observed::Set(members(&["a", "b", "c"]))), "more than 2"),
        (look(2, "username/u", Observed::Register(bytes(&["n2"]))), "changed owner"),
        (look(2, "username/u", Observed::Register(bytes(&["n1", "n2"]))), "2 owners"),
    ];
    for (observation, expected) in bad {
        let mut all = good.clone();
        all.push(observation);
        let err = invariants::check(&rules, &all).unwrap_err();
        assert!(err.0.contains(expected), "{err}");
    }
}

// --- linearizability

#[test]
fn claims_are_linearizable_when_one_wins_and_reads_agree() {
    let mut h = History::new();
    let a = h.invoke(0, ClaimOp::Claim("a".into()));
    let b = h.invoke(1, ClaimOp::Claim("b".into()));
    // Concurrent: either order is fine, so b may win though a was invoked first.
    h.complete(b, Outcome::Ok(ClaimRet::Won(true)));
    h.complete(a, Outcome::Ok(ClaimRet::Won(false)));
    h.record(2, ClaimOp::Read, Outcome::Ok(ClaimRet::Owner(Some("b".into()))));
    linearizable::check(Claim::default(), &h).unwrap();
}

#[test]
fn claims_are_not_linearizable_with_two_winners_or_a_stale_read() {
    let mut h = History::new();
    h.record(0, ClaimOp::Claim("a".into()), Outcome::Ok(ClaimRet::Won(true)));
    h.record(1, ClaimOp::Claim("b".into()), Outcome::Ok(ClaimRet::Won(true)));
    linearizable::check(Claim::default(), &h).unwrap_err();

    let mut h = History::new();
    h.record(0, ClaimOp::Claim("a".into()), Outcome::Ok(ClaimRet::Won(true)));
    h.record(1, ClaimOp::Read, Outcome::Ok(ClaimRet::Owner(None)));
    linearizable::check(Claim::default(), &h).unwrap_err();

    // Real time: b lost to a claim that had not been invoked yet.
    let mut h = History::new();
    h.record(1, ClaimOp::Claim("b".into()), Outcome::Ok(ClaimRet::Won(false)));
    h.record(0, ClaimOp::Claim("a".into()), Outcome::Ok(ClaimRet::Won(true)));
    linearizable::check(Claim::default(), &h).unwrap_err();
}

#[test]
fn an_indeterminate_claim_may_have_won_or_never_happened() {
    // It won: the later claim lost to it.
    let mut h = History::new();
    h.invoke(0, ClaimOp::Claim("a".into()));
    h.record(1, ClaimOp::Claim("b".into()), Outcome::Ok(ClaimRet::Won(false)));
    h.record(2, ClaimOp::Read, Outcome::Ok(ClaimRet::Owner(Some("a".into()))));
    linearizable::check(Claim::default(), &h).unwrap();
    // It never happened.
    let mut h = History::new();
    h.invoke(0, ClaimOp::Claim("a".into()));
    h.record(1, ClaimOp::Claim("b".into()), Outcome::Ok(ClaimRet::Won(true)));
    linearizable::check(Claim::default(), &h).unwrap();
    // But nobody can have read an owner no claim named.
    h.record(2, ClaimOp::Read, Outcome::Ok(ClaimRet::Owner(Some("c".into()))));
    linearizable::check(Claim::default(), &h).unwrap_err();
}

#[test]
fn the_search_is_fast_on_many_concurrent_claims() {
    // 40 claims all concurrent, one winner, then reads: memoisation keeps
    // this from exploring 40! orders.
    let mut h = History::new();
    let ids: Vec<usize> = (0..40).map(|i| h.invoke(i, ClaimOp::Claim(format!("n{i}")))).collect();
    for (i, id) in ids.into_iter().enumerate() {
        h.complete(id, Outcome::Ok(ClaimRet::Won(i == 17)));
    }
    h.record(0, ClaimOp::Read, Outcome::Ok(ClaimRet::Owner(Some("n17".into()))));
    linearizable::check(Claim::default(), &h).unwrap();
    h.record(1, ClaimOp::Read, Outcome::Ok(ClaimRet::Owner(Some("n3".into()))));
    linearizable::check(Claim::default(), &h).unwrap_err();
}

// --- convergence

#[test]
fn convergence_rejects_a_differing_missing_or_extra_key() {
    let a: BTreeMap<&str, u32> = [("k1", 1), ("k2", 2)].into();
    convergence::check(&[a.clone(), a.clone(), a.clone()]).unwrap();
    let differs: BTreeMap<&str, u32> = [("k1", 1), ("k2", 3)].into();
    assert!(convergence::check(&[a.clone(), differs]).unwrap_err().0.contains("differ at \"k2\""));
    let missing: BTreeMap<&str, u32> = [("k1", 1)].into();
    assert!(convergence::check(&[a.clone(), missing]).unwrap_err().0.contains("lacks \"k2\""));
    let extra: BTreeMap<&str, u32> = [("k1", 1), ("k2", 2), ("k3", 0)].into();
    assert!(convergence::check(&[a, extra]).unwrap_err().0.contains("holds \"k3\""));
}
