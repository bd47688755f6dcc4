//! The embedded API: `calmkv::Db` and its typed handles over a sled data
//! directory — every handle type, type mismatches, scans and deletes, and what
//! survives dropping the `Db` and opening the directory again.

use calmkv::store::Durability;
use calmkv::{
    Action, Config, CounterOp, CrdtOp, Db, FlagOp, Key, KeyType, MapOp, NodeError, Op, SetOp,
    TypedValue,
};
use std::collections::BTreeMap;
use std::path::Path;

fn open(dir: &Path) -> Db {
    Db::open(dir).expect("the data directory opens")
}

fn values(read: Option<calmkv::db::RegisterValue>) -> Vec<String> {
    let read = read.expect("the register has a value");
    read.values.iter().map(|v| String::from_utf8(v.to_vec()).unwrap()).collect()
}

fn assert_type_mismatch<T: std::fmt::Debug>(result: Result<T, NodeError>, what: &str) {
    match result {
        Err(NodeError::TypeMismatch { .. }) => {}
        other => panic!("{what}: expected TypeMismatch, got {other:?}"),
    }
}

/// Map fields as JSON, `{"field": [{"type": .., "value": ..}]}`, for comparison.
fn map_json(db: &Db, key: &str) -> serde_json::Value {
    serde_json::to_value(db.map(key).get().unwrap().expect("the map has fields")).unwrap()
}

#[test]
fn counters_read_zero_when_absent_and_return_the_new_value_on_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let counter = db.counter("hits");
    assert_eq!(counter.get().unwrap(), 0);
    assert_eq!(counter.incr(5).unwrap(), 5);
    assert_eq!(counter.decr(7).unwrap(), -2);
    assert_eq!(db.counter("hits").get().unwrap(), -2);
}

#[test]
fn a_counter_increment_past_the_nodes_u64_share_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    assert_eq!(db.counter("c").incr(u64::MAX).unwrap(), i128::from(u64::MAX));
    let error = db.counter("c").incr(1).unwrap_err();
    assert_eq!(error.code(), "limit_exceeded", "{error}");
    assert_eq!(db.counter("c").decr(1).unwrap(), i128::from(u64::MAX) - 1, "decrements still work");
}

#[test]
fn counter_increments_from_many_threads_all_count() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..25 {
                    db.counter("shared").incr(2).unwrap();
                }
            });
        }
    });
    assert_eq!(db.counter("shared").get().unwrap(), 200);
}

#[test]
fn sets_add_and_remove_members_and_apply_both_in_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let set = db.set("cart");
    assert!(set.members().unwrap().is_empty());
    set.add("pear").unwrap();
    set.add("apple").unwrap();
    set.add("apple").unwrap();
    assert_eq!(set.members().unwrap(), ["apple", "pear"], "ordered, no duplicates");
    set.apply(SetOp { add: vec!["fig".into()], remove: vec!["pear".into()] }).unwrap();
    assert_eq!(set.members().unwrap(), ["apple", "fig"]);
    assert!(set.contains("fig").unwrap() && !set.contains("pear").unwrap());
    set.remove("absent").unwrap();
    assert_eq!(set.members().unwrap(), ["apple", "fig"]);
}

#[test]
fn a_set_operation_that_adds_and_removes_one_member_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.set("s").add("a").unwrap();
    let both = SetOp { add: vec!["b".into()], remove: vec!["b".into()] };
    assert!(matches!(db.set("s").apply(both), Err(NodeError::BadRequest { .. })));
    let nothing = SetOp::default();
    assert!(matches!(db.set("s").apply(nothing), Err(NodeError::BadRequest { .. })));
    assert_eq!(db.set("s").members().unwrap(), ["a"]);
}

#[test]
fn a_register_write_with_the_read_context_replaces_and_one_without_adds_a_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let register = db.register("profile");
    assert_eq!(register.get().unwrap(), None);
    let first = register.put("v1", None).unwrap();
    register.put("v2", Some(&first)).unwrap();
    assert_eq!(values(register.get().unwrap()), ["v2"]);

    register.put("blind", None).unwrap();
    let read = register.get().unwrap().unwrap();
    assert_eq!(values(Some(read.clone())), ["v2", "blind"]);
    let resolved = register.put("merged", Some(&read.context)).unwrap();
    assert_eq!(values(register.get().unwrap()), ["merged"]);
    assert_eq!(register.get().unwrap().unwrap().context, resolved, "put returns the new context");
}

#[test]
fn register_values_are_bytes_and_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let bytes: Vec<u8> = (0..=255).collect();
    db.register("binary").put(bytes.clone(), None).unwrap();
    assert_eq!(db.register("binary").get().unwrap().unwrap().values, [bytes]);
}

#[test]
fn create_writes_only_when_the_key_has_no_value() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.register("user/ada").create("first").unwrap();
    match db.register("user/ada").create("second") {
        Err(error @ NodeError::PreconditionFailed { .. }) => {
            assert_eq!(error.code(), "precondition_failed")
        }
        other => panic!("expected PreconditionFailed, got {other:?}"),
    }
    assert_eq!(values(db.register("user/ada").get().unwrap()), ["first"]);
}

#[test]
fn a_register_delete_with_a_context_removes_only_what_that_context_saw() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let register = db.register("k");
    let seen = register.put("old", None).unwrap();
    register.put("concurrent", None).unwrap();
    register.delete(Some(&seen)).unwrap();
    assert_eq!(values(register.get().unwrap()), ["concurrent"]);
    register.delete(None).unwrap();
    assert_eq!(register.get().unwrap(), None);
}

#[test]
fn an_lww_register_keeps_the_latest_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    assert_eq!(db.lww("theme").get().unwrap(), None);
    db.lww("theme").set("light").unwrap();
    db.lww("theme").set("dark").unwrap();
    assert_eq!(db.lww("theme").get().unwrap().as_deref(), Some(&b"dark"[..]));
}

#[test]
fn map_fields_hold_nested_crdts_and_a_removed_field_disappears() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let order = db.map("order/1");
    assert_eq!(order.get().unwrap(), None);
    order.update("qty", CrdtOp::Counter(CounterOp::Incr(2))).unwrap();
    order.update("status", CrdtOp::Register("paid".into())).unwrap();
    order.update("gift", CrdtOp::Flag(FlagOp::Enable)).unwrap();
    let nested = MapOp {
        update: BTreeMap::from([("city".to_string(), CrdtOp::Register("Lyon".into()))]),
        remove: vec![],
    };
    order
        .apply(MapOp {
            update: BTreeMap::from([
                ("qty".to_string(), CrdtOp::Counter(CounterOp::Decr(1))),
                ("tags".to_string(), CrdtOp::Set(SetOp { add: vec!["a".into()], remove: vec![] })),
                ("address".to_string(), CrdtOp::Map(nested)),
            ]),
            remove: vec![],
        })
        .unwrap();
    assert_eq!(
        map_json(&db, "order/1"),
        serde_json::json!({
            "address": [{"type": "map", "value": {"city": {"type": "register", "value": "Lyon"}}}],
            "gift": [{"type": "flag", "value": true}],
            "qty": [{"type": "counter", "value": 1}],
            "status": [{"type": "register", "value": "paid"}],
            "tags": [{"type": "set", "value": ["a"]}],
        })
    );
    order.remove("status").unwrap();
    let fields = order.get().unwrap().unwrap();
    assert_eq!(fields.keys().collect::<Vec<_>>(), ["address", "gift", "qty", "tags"]);
    assert_eq!(fields["qty"], [TypedValue::Counter(1)]);
}

#[test]
fn a_map_field_keeps_its_type() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.map("m").update("n", CrdtOp::Counter(CounterOp::Incr(1))).unwrap();
    let result = db.map("m").update("n", CrdtOp::Register("text".into()));
    assert_type_mismatch(result, "a register op on a counter field");
    assert_eq!(db.map("m").get().unwrap().unwrap()["n"], [TypedValue::Counter(1)]);
}

#[test]
fn flags_enable_and_disable_and_read_off_when_absent() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let flag = db.flag("feature");
    assert!(!flag.get().unwrap());
    flag.enable().unwrap();
    assert!(flag.get().unwrap());
    flag.disable().unwrap();
    assert!(!flag.get().unwrap());
}

#[test]
fn every_handle_refuses_a_key_of_another_type_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.counter("c").incr(3).unwrap();
    assert_type_mismatch(db.set("c").add("x"), "set add");
    assert_type_mismatch(db.set("c").members(), "set read");
    assert_type_mismatch(db.flag("c").enable(), "flag enable");
    assert_type_mismatch(db.flag("c").get(), "flag read");
    assert_type_mismatch(db.map("c").update("f", CrdtOp::Flag(FlagOp::Enable)), "map update");
    assert_type_mismatch(db.map("c").get(), "map read");
    assert_type_mismatch(db.register("c").put("v", None), "register put");
    assert_type_mismatch(db.register("c").create("v"), "register create");
    assert_type_mismatch(db.register("c").get(), "register read");
    assert_type_mismatch(db.lww("c").set("v"), "lww set");
    assert_type_mismatch(db.lww("c").get(), "lww read");
    assert_eq!(db.counter("c").get().unwrap(), 3);

    db.register("r").put("v", None).unwrap();
    assert_type_mismatch(db.counter("r").incr(1), "counter incr on a register");
    assert_type_mismatch(db.lww("r").set("w"), "lww set on a register");
    db.lww("l").set("v").unwrap();
    assert_type_mismatch(db.register("l").put("w", None), "register put on an lww");
    let error = db.counter("l").incr(1).unwrap_err();
    assert_eq!(error.code(), "type_mismatch");
    assert_eq!(db.lww("l").get().unwrap().as_deref(), Some(&b"v"[..]));
}

#[test]
fn bad_keys_are_refused_with_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let long = "k".repeat(calmkv::Limits::KEY_BYTES_MAX + 1);
    for key in ["", "tab\there", long.as_str()] {
        let error = db.counter(key).incr(1).unwrap_err();
        assert_eq!(error.code(), "bad_key", "{key:?}");
        assert_eq!(db.get(key).unwrap_err().code(), "bad_key");
    }
    assert!(db.scan("", None, 10).unwrap().keys.is_empty());
}

#[test]
fn get_reads_any_type_with_its_context() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    assert_eq!(db.get("absent").unwrap(), None);
    db.counter("c").incr(4).unwrap();
    db.set("s").add("m").unwrap();
    db.flag("f").enable().unwrap();
    db.lww("l").set("x").unwrap();
    db.register("r").put("y", None).unwrap();
    let read = |key: &str| db.get(key).unwrap().expect("a value").values;
    assert_eq!(read("c"), [TypedValue::Counter(4)]);
    assert_eq!(read("s"), [TypedValue::Set(vec!["m".into()])]);
    assert_eq!(read("f"), [TypedValue::Flag(true)]);
    assert_eq!(read("l"), [TypedValue::Lww("x".into())]);
    assert_eq!(read("r"), [TypedValue::Register(vec!["y".into()])]);
    let context = db.get("r").unwrap().unwrap().context;
    assert_eq!(context, db.register("r").get().unwrap().unwrap().context);
}

#[test]
fn apply_runs_a_hand_built_op_like_the_handles_do() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let key = Key::new("hand", db.node().limits()).unwrap();
    let op = Op { key, action: Action::Crdt(CrdtOp::Counter(CounterOp::Incr(9))) };
    let applied = db.apply(op).unwrap();
    assert_eq!(applied.state.value.counter().value(), 9);
    assert_eq!(db.counter("hand").get().unwrap(), 9);
}

#[test]
fn scan_pages_through_live_keys_with_a_prefix_and_skips_deleted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    for i in 0..5 {
        db.counter(&format!("p/{i}")).incr(1).unwrap();
    }
    db.set("p/set").add("m").unwrap();
    db.counter("q/other").incr(1).unwrap();
    db.delete("p/2").unwrap();

    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = db.scan("p/", after.as_deref(), 2).unwrap();
        assert!(page.keys.len() <= 2);
        pages += 1;
        keys.extend(page.keys);
        match page.cursor {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
        assert!(pages < 10, "the scan ends");
    }
    let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["p/0", "p/1", "p/3", "p/4", "p/set"]);
    assert_eq!(keys.last().unwrap().1, [KeyType::Set]);
    assert!(pages >= 3, "pages of 2: {pages}");
}

#[test]
fn a_deleted_key_reads_absent_and_a_later_write_starts_from_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.counter("c").incr(10).unwrap();
    db.delete("c").unwrap();
    assert_eq!(db.get("c").unwrap(), None);
    assert_eq!(db.counter("c").incr(1).unwrap(), 1, "the deleted increments stay deleted");
    db.set("s").add("old").unwrap();
    db.delete("s").unwrap();
    db.set("s").add("new").unwrap();
    assert_eq!(db.set("s").members().unwrap(), ["new"]);
}

/// Writes one value of every type.
fn write_every_type(db: &Db) {
    db.counter("c").incr(7).unwrap();
    db.set("s").add("a").unwrap();
    db.set("s").add("b").unwrap();
    db.register("r").put("reg", None).unwrap();
    db.lww("l").set("lww").unwrap();
    db.map("m").update("n", CrdtOp::Counter(CounterOp::Incr(2))).unwrap();
    db.flag("f").enable().unwrap();
    db.counter("gone").incr(1).unwrap();
    db.delete("gone").unwrap();
}

/// Checks what [`write_every_type`] wrote.
fn assert_every_type(db: &Db) {
    assert_eq!(db.counter("c").get().unwrap(), 7);
    assert_eq!(db.set("s").members().unwrap(), ["a", "b"]);
    assert_eq!(values(db.register("r").get().unwrap()), ["reg"]);
    assert_eq!(db.lww("l").get().unwrap().as_deref(), Some(&b"lww"[..]));
    assert_eq!(db.map("m").get().unwrap().unwrap()["n"], [TypedValue::Counter(2)]);
    assert!(db.flag("f").get().unwrap());
    assert_eq!(db.get("gone").unwrap(), None);
    let names: Vec<String> =
        db.scan("", None, 100).unwrap().keys.into_iter().map(|k| k.0).collect();
    assert_eq!(names, ["c", "f", "l", "m", "r", "s"]);
}

#[test]
fn values_of_every_type_survive_dropping_the_db_and_reopening_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open(dir.path());
        write_every_type(&db);
    }
    let db = open(dir.path());
    assert_every_type(&db);
    // And the reopened node keeps writing on top of them.
    let context = db.register("r").get().unwrap().unwrap().context;
    db.register("r").put("after reopen", Some(&context)).unwrap();
    db.counter("c").incr(1).unwrap();
    drop(db);
    let db = open(dir.path());
    assert_eq!(values(db.register("r").get().unwrap()), ["after reopen"]);
    assert_eq!(db.counter("c").get().unwrap(), 8);
}

#[test]
fn every_durability_mode_keeps_its_writes_across_a_clean_drop_and_reopen() {
    let modes = [
        Durability::Sync,
        Durability::Interval(std::time::Duration::from_millis(50)),
        Durability::None,
    ];
    for durability in modes {
        let dir = tempfile::tempdir().unwrap();
        let config = || Config { durability, ..Config::new(dir.path()) };
        {
            let db = Db::open_with(config()).unwrap();
            write_every_type(&db);
        }
        let db = Db::open_with(config()).unwrap();
        assert_every_type(&db);
    }
}

#[test]
fn the_node_id_is_stable_across_reopen_and_differs_between_directories() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let id = open(a.path()).id();
    assert_eq!(open(a.path()).id(), id);
    assert_eq!(open(a.path()).id(), id);
    assert_ne!(open(b.path()).id(), id);
    let file = std::fs::read_to_string(a.path().join(calmkv::store::NODE_ID_FILE)).unwrap();
    assert_eq!(file.trim(), id.to_string());
}

#[test]
fn a_reopened_node_does_not_reuse_its_dots() {
    // Were dots reused after a restart, a new write would carry a dot the old
    // context already covers and be lost, or a delete would not cover it.
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open(dir.path());
        db.register("k").put("before", None).unwrap();
        db.delete("k").unwrap();
    }
    let db = open(dir.path());
    db.register("k").put("after", None).unwrap();
    assert_eq!(values(db.register("k").get().unwrap()), ["after"]);
    db.set("s").add("x").unwrap();
    drop(db);
    let db = open(dir.path());
    db.set("s").remove("x").unwrap();
    db.set("s").add("y").unwrap();
    assert_eq!(db.set("s").members().unwrap(), ["y"]);
}

#[test]
fn an_in_memory_db_keeps_nothing_and_gets_a_new_id_on_every_open() {
    let first = Db::open_with(Config::in_memory()).unwrap();
    first.counter("c").incr(1).unwrap();
    let id = first.id();
    drop(first);
    let second = Db::open_with(Config::in_memory()).unwrap();
    assert_ne!(second.id(), id);
    assert_eq!(second.get("c").unwrap(), None);
}

#[test]
fn open_refuses_a_file_where_the_data_directory_should_be() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    assert!(Db::open(&file).is_err());
}

#[test]
fn a_closed_db_mints_as_the_same_actor_and_a_dropped_one_as_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = |dir: &Path| calmkv::Config::new(dir).open_node().unwrap();
    let first = node(dir.path());
    let actor = first.actor();
    assert_eq!(actor, first.id(), "a new store mints as the node's id");
    let db = Db::from_node(first);
    db.set("s").add("x").unwrap();
    db.close().unwrap();
    let second = node(dir.path());
    assert_eq!(second.actor(), actor, "a clean stop keeps the actor");
    let db = Db::from_node(second);
    db.set("s").add("y").unwrap();
    drop(db); // a crash, as far as the next open knows
    let third = node(dir.path());
    assert_ne!(third.actor(), actor, "after a crash the node mints as a new actor");
    let db = Db::from_node(third);
    db.set("s").add("z").unwrap();
    let mut members = db.set("s").members().unwrap();
    members.sort();
    assert_eq!(members, ["x", "y", "z"]);
}
