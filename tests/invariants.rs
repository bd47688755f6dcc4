//! Invariant declarations and the I-confluence analysis: every row of the
//! table, each counterexample checked by merging its two states again, the
//! local kinds checked to have no counterexample, and every malformed
//! declaration refused with its typed error.

use calmkv::invariants::analysis::{self, search};
use calmkv::invariants::{Invariants, InvariantsError, OpKind, Route, Rule};
use calmkv::{Action, CounterOp, CrdtOp, Key, Limits, NodeError, Op, SetOp};
use calmkv_crdts::Crdt;

fn rules() -> Vec<Rule> {
    vec![
        Rule::Counter { min: Some(0), max: None },
        Rule::Counter { min: Some(-5), max: None },
        Rule::Counter { min: None, max: Some(10) },
        Rule::Counter { min: Some(0), max: Some(100) },
        Rule::Set { min_size: None, max_size: Some(3) },
        Rule::Set { min_size: Some(2), max_size: None },
        Rule::Set { min_size: Some(1), max_size: Some(4) },
        Rule::Unique,
    ]
}

/// docs/design.md §6's table, plus deletes: (rule, kind, needs the quorum).
#[test]
fn every_row_of_the_table_has_its_verdict() {
    let min = Rule::Counter { min: Some(0), max: None };
    let max = Rule::Counter { min: None, max: Some(10) };
    let max_size = Rule::Set { min_size: None, max_size: Some(50) };
    let min_size = Rule::Set { min_size: Some(1), max_size: None };
    let table = [
        (&min, OpKind::Incr, false),
        (&min, OpKind::Decr, true),
        (&min, OpKind::Delete, true),
        (&max, OpKind::Decr, false),
        (&max, OpKind::Incr, true),
        (&max, OpKind::Delete, true),
        (&max_size, OpKind::Remove, false),
        (&max_size, OpKind::Delete, false),
        (&max_size, OpKind::Add, true),
        (&min_size, OpKind::Add, false),
        (&min_size, OpKind::Remove, true),
        (&min_size, OpKind::Delete, true),
        (&Rule::Unique, OpKind::Update, false),
        (&Rule::Unique, OpKind::Delete, false),
        (&Rule::Unique, OpKind::Create, true),
    ];
    for (rule, kind, quorum) in table {
        let verdict = analysis::verdict(rule, kind);
        assert_eq!(!verdict.confluent, quorum, "{rule} / {kind}: {}", verdict.reason);
        assert!(!verdict.reason.is_empty());
    }
}

/// Each verdict that needs the quorum has a counterexample; merging its two
/// states again gives a state that breaks the rule while both sides keep it.
#[test]
fn every_quorum_verdict_has_a_counterexample_that_merging_confirms() {
    for rule in rules() {
        for &kind in OpKind::for_type(rule.key_type()) {
            if analysis::verdict(&rule, kind).confluent {
                assert_eq!(analysis::counterexample(&rule, kind), None);
                continue;
            }
            let Some(example) = analysis::counterexample(&rule, kind) else {
                // Only a delete whose result alone is out of bounds (0 < min) has
                // no two-replica counterexample: it is refused sequentially.
                let zero_out_of_bounds = matches!(rule, Rule::Counter { min: Some(m), .. } if m > 0)
                    || matches!(rule, Rule::Set { min_size: Some(m), .. } if m > 0);
                assert!(
                    kind == OpKind::Delete && zero_out_of_bounds,
                    "{rule} / {kind}: none found"
                );
                continue;
            };
            let merged = example.left_state.merged(&example.right_state);
            match rule {
                Rule::Unique => {
                    assert_eq!(example.left_state.value.register().len(), 1, "{example}");
                    assert_eq!(example.right_state.value.register().len(), 1, "{example}");
                    assert_eq!(merged.value.register().len(), 2, "two creations: {example}");
                }
                _ => {
                    assert!(rule.holds(&example.left_state), "{rule}: left invalid: {example}");
                    assert!(rule.holds(&example.right_state), "{rule}: right invalid: {example}");
                    assert!(!rule.holds(&merged), "{rule}: merge valid: {example}");
                }
            }
            assert!(example.to_string().contains("their merge is"), "{example}");
        }
    }
}

/// The other direction: among the kinds the table runs locally, the bounded
/// search finds no pair of valid replicas whose merge breaks the rule.
#[test]
fn local_kinds_have_no_counterexample_in_the_bounded_search() {
    for rule in rules() {
        let local: Vec<OpKind> = OpKind::for_type(rule.key_type())
            .iter()
            .copied()
            .filter(|&k| analysis::verdict(&rule, k).confluent)
            .collect();
        assert_eq!(search(&rule, &local, &local), None, "{rule}: local kinds {local:?}");
    }
}

fn op(key: &str, action: Action) -> Op {
    Op { key: Key::new(key, &Limits::default()).unwrap(), action }
}

const BANK: &str = r#"
# A bank and a user directory.
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

#[test]
fn routing_sends_only_the_unsafe_direction_to_the_quorum() {
    let invariants = Invariants::parse(BANK).unwrap();
    let counter = |n: CounterOp| Action::Crdt(CrdtOp::Counter(n));
    let local = [
        op("account/alice", counter(CounterOp::Incr(5))),
        op("visits", counter(CounterOp::Decr(5))),
        op("cart/bob", Action::Crdt(CrdtOp::Set(SetOp { add: vec![], remove: vec!["x".into()] }))),
    ];
    for op in &local {
        assert_eq!(invariants.route(op).unwrap(), Route::Local, "{op:?}");
    }
    let quorum = [
        (op("account/alice", counter(CounterOp::Decr(5))), OpKind::Decr),
        (op("account/alice", Action::Delete { context: None }), OpKind::Delete),
        (
            op(
                "cart/bob",
                Action::Crdt(CrdtOp::Set(SetOp { add: vec!["x".into()], remove: vec![] })),
            ),
            OpKind::Add,
        ),
        (
            op("username/ann", Action::Put { value: "1".into(), context: None, if_absent: false }),
            OpKind::Create,
        ),
        (
            op("username/ann", Action::Put { value: "1".into(), context: None, if_absent: true }),
            OpKind::Create,
        ),
    ];
    for (op, kind) in &quorum {
        match invariants.route(op).unwrap() {
            Route::Quorum { kinds, .. } => assert_eq!(kinds, vec![*kind], "{op:?}"),
            Route::Local => panic!("{op:?} routed locally"),
        }
    }
    let wrong_type = op("account/alice", Action::Crdt(CrdtOp::Set(SetOp::default())));
    assert!(matches!(invariants.route(&wrong_type), Err(NodeError::TypeMismatch { .. })));
}

#[test]
fn admission_refuses_a_state_out_of_bounds_and_a_second_creation() {
    let invariants = Invariants::parse(BANK).unwrap();
    let account = invariants.rule_for("account/a").unwrap();
    let mut balance = calmkv::Envelope::default();
    let limits = Limits::default();
    let decr = op("account/a", Action::Crdt(CrdtOp::Counter(CounterOp::Decr(1))));
    let before = balance.clone();
    calmkv::node::execute(
        &mut balance,
        &decr,
        calmkv_crdts::NodeId(9),
        Default::default(),
        &limits,
    )
    .unwrap();
    let refused = Invariants::admit(account, &[OpKind::Decr], "account/a", &before, &balance);
    match refused {
        Err(NodeError::InvariantViolation { violation, .. }) => {
            assert!(violation.contains("account/*: counter min = 0"), "{violation}");
            assert!(violation.contains("the value would be -1"), "{violation}");
        }
        other => panic!("{other:?}"),
    }
    let unique = invariants.rule_for("username/ann").unwrap();
    let mut taken = calmkv::Envelope::default();
    let create =
        op("username/ann", Action::Put { value: "x".into(), context: None, if_absent: true });
    calmkv::node::execute(
        &mut taken,
        &create,
        calmkv_crdts::NodeId(9),
        Default::default(),
        &limits,
    )
    .unwrap();
    let again = Invariants::admit(unique, &[OpKind::Create], "username/ann", &taken, &taken);
    assert!(matches!(again, Err(NodeError::PreconditionFailed { .. })), "{again:?}");
}

#[test]
fn the_hash_ignores_order_spacing_and_comments_and_changes_with_a_rule() {
    let reordered = r#"
[[invariant]]
keys = "cart/*"
type   = "set"
max_size = 50
[[invariant]]
unique = true
keys = "username/*"
[[invariant]]
keys = "account/*"
min = 0
type = "counter"
"#;
    let a = Invariants::parse(BANK).unwrap();
    let b = Invariants::parse(reordered).unwrap();
    assert_eq!(a.hash(), b.hash());
    let changed = BANK.replace("max_size = 50", "max_size = 51");
    assert_ne!(a.hash(), Invariants::parse(&changed).unwrap().hash());
    assert_ne!(Invariants::none().hash(), a.hash());
}

#[test]
fn malformed_declarations_are_refused_with_their_typed_error() {
    type Expected = fn(&InvariantsError) -> bool;
    let cases: Vec<(&str, Expected, &str)> = vec![
        ("[[invariant]\nkeys = 1", |e| matches!(e, InvariantsError::Malformed { .. }), "malformed"),
        (
            "[[invariant]]\nkeys = \"a/*\"\ntype = \"counter\"\nmin = 0\ncolour = \"red\"",
            |e| matches!(e, InvariantsError::Malformed { .. }),
            "colour",
        ),
        (
            "[[invariant]]\nkeys = \"a/*\"\ntype = \"histogram\"\nmin = 0",
            |e| matches!(e, InvariantsError::UnknownKind { .. }),
            "histogram",
        ),
        (
            "[[invariant]]\nkeys = \"a/*\"\ntype = \"counter\"\nmin = 5\nmax = 1",
            |e| matches!(e, InvariantsError::Invalid { .. }),
            "above max",
        ),
        (
            "[[invariant]]\nkeys = \"a/*\"\ntype = \"counter\"",
            |e| matches!(e, InvariantsError::Invalid { .. }),
            "needs `min` or `max`",
        ),
        (
            "[[invariant]]\nkeys = \"a/*\"\ntype = \"set\"\nmax_size = -1",
            |e| matches!(e, InvariantsError::Invalid { .. }),
            "negative",
        ),
        (
            "[[invariant]]\nkeys = \"a/*\"\ntype = \"set\"\nmin = 1",
            |e| matches!(e, InvariantsError::Invalid { .. }),
            "not `min`/`max`",
        ),
        (
            "[[invariant]]\nkeys = \"a/*\"\ntype = \"counter\"\nunique = true",
            |e| matches!(e, InvariantsError::Invalid { .. }),
            "registers",
        ),
        (
            "[[invariant]]\nkeys = \"a/*\"\nmin = 0",
            |e| matches!(e, InvariantsError::Invalid { .. }),
            "needs `type",
        ),
        (
            "[[invariant]]\nkeys = \"\"\nunique = true",
            |e| matches!(e, InvariantsError::Invalid { .. }),
            "empty",
        ),
        (
            "[[invariant]]\nkeys = \"a/*\"\ntype = \"counter\"\nmin = 0\n[[invariant]]\nkeys = \"a/vip/*\"\ntype = \"counter\"\nmax = 9",
            |e| matches!(e, InvariantsError::Overlap { .. }),
            "can both match a key such as \"a/vip/",
        ),
    ];
    for (text, expected, message) in cases {
        match Invariants::parse(text) {
            Err(error) => {
                assert!(expected(&error), "{text:?}: {error:?}");
                assert!(error.to_string().contains(message), "{text:?}: {error}");
            }
            Ok(parsed) => panic!("{text:?} was accepted: {parsed:?}"),
        }
    }
    let too_many: String = (0..=calmkv::invariants::DECLARATIONS_MAX)
        .map(|i| format!("[[invariant]]\nkeys = \"k{i}\"\nunique = true\n"))
        .collect();
    assert!(matches!(Invariants::parse(&too_many), Err(InvariantsError::TooMany { .. })));
}

#[test]
fn an_empty_file_declares_nothing_and_routes_everything_locally() {
    let none = Invariants::parse("# nothing yet\n").unwrap();
    assert!(none.declarations().is_empty());
    assert_eq!(none, Invariants::none());
    let decr = op("account/a", Action::Crdt(CrdtOp::Counter(CounterOp::Decr(1))));
    assert_eq!(none.route(&decr).unwrap(), Route::Local);
}
