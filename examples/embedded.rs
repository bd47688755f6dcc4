//! calmkv embedded in an application: no server, no network — a [`calmkv::Db`]
//! over a local data directory, with typed handles for counters, sets, registers
//! (with their causal context), last-writer-wins registers, maps and flags, plus
//! scans and deletes. Prints each step.
//!
//! ```sh
//! cargo run --example embedded                  # a temporary directory
//! cargo run --example embedded -- ./my-data     # a directory kept between runs
//! ```
//!
//! Run it twice with the same directory: the node id stays the same and the
//! `app/runs` counter goes up, because the data lives on disk (sled).

use calmkv::db::RegisterValue;
use calmkv::{CounterOp, CrdtOp, Db, MapOp, NodeError, SetOp, TypedValue};
use std::collections::BTreeMap;

fn main() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => dir.into(),
        None => temp.path().join("calmkv-data"),
    };
    let db = Db::open(&dir)?;
    println!("opened {} as node {}", dir.display(), db.id());

    // Counters: increments and decrements from anywhere merge without conflict.
    let runs = db.counter("app/runs").incr(1)?;
    println!("\n# counters\napp/runs = {runs} (run the example again on the same directory)");
    db.counter("stock/apples").incr(10)?;
    let left = db.counter("stock/apples").decr(3)?;
    println!("stock/apples: +10 -3 = {left}");

    // Sets: add-wins; a remove takes away only the adds it has seen.
    println!("\n# sets");
    let cart = db.set("cart/alice");
    cart.add("apple")?;
    cart.add("pear")?;
    cart.apply(SetOp { add: vec!["fig".into()], remove: vec!["pear".into()] })?;
    println!("cart/alice = {:?}, has fig: {}", cart.members()?, cart.contains("fig")?);

    // Registers: a read returns the values and a context; writing with that
    // context supersedes what the read saw.
    println!("\n# registers");
    let profile = db.register("profile/alice");
    let earlier = profile.get()?; // a value from an earlier run, if any
    profile.put("v1", earlier.as_ref().map(|read| &read.context))?;
    let read = profile.get()?.expect("just written");
    profile.put("v2", Some(&read.context))?;
    println!("profile/alice = {}", show(&profile.get()?));
    // Two writers that both read nothing (or both wrote blind) leave siblings.
    profile.put("written blind", None)?;
    let siblings = profile.get()?.expect("a value");
    println!("after a write without context: {}", show(&Some(siblings.clone())));
    profile.put("merged by the app", Some(&siblings.context))?;
    println!("resolved with the context: {}", show(&profile.get()?));
    // Create-only: the second create is refused.
    match db.register("username/ada").create("ada@example.com") {
        Ok(_) => println!("created username/ada"),
        Err(NodeError::PreconditionFailed { .. }) => println!("username/ada exists (earlier run)"),
        Err(error) => return Err(error.into()),
    }
    match db.register("username/ada").create("someone else") {
        Err(NodeError::PreconditionFailed { key }) => println!("second create of {key}: refused"),
        other => anyhow::bail!("expected PreconditionFailed, got {other:?}"),
    }

    // Last-writer-wins registers: one value, the latest write wins.
    println!("\n# lww");
    db.lww("config/theme").set("light")?;
    db.lww("config/theme").set("dark")?;
    let theme = db.lww("config/theme").get()?.expect("set");
    println!("config/theme = {}", String::from_utf8_lossy(&theme));

    // Maps: named fields, each a nested CRDT, updated through `CrdtOp`.
    println!("\n# maps");
    let order = db.map("order/42");
    order.update("qty", CrdtOp::Counter(CounterOp::Incr(2)))?;
    order.update("status", CrdtOp::Register("paid".into()))?;
    order.apply(MapOp {
        update: BTreeMap::from([
            ("tags".to_string(), CrdtOp::Set(SetOp { add: vec!["gift".into()], remove: vec![] })),
            ("qty".to_string(), CrdtOp::Counter(CounterOp::Incr(1))),
        ]),
        remove: vec![],
    })?;
    order.update("note", CrdtOp::Register("leave at the door".into()))?;
    order.remove("note")?;
    for (field, values) in order.get()?.expect("updated") {
        println!("order/42.{field} = {}", serde_json::to_string(&values)?);
    }

    // Flags: enable-wins.
    println!("\n# flags");
    let flag = db.flag("feature/dark-mode");
    flag.enable()?;
    println!("feature/dark-mode enabled: {}", flag.get()?);
    flag.disable()?;
    println!("feature/dark-mode after disable: {}", flag.get()?);

    // A key has one type: an operation of another type is refused.
    println!("\n# types");
    match db.counter("cart/alice").incr(1) {
        Err(error @ NodeError::TypeMismatch { .. }) => {
            println!("incr on a set: {} ({error})", error.code())
        }
        other => anyhow::bail!("expected TypeMismatch, got {other:?}"),
    }
    if let Some(read) = db.get("order/42")? {
        let types: Vec<_> = read.values.iter().map(TypedValue::key_type).collect();
        println!("order/42 holds {types:?}");
    }

    // Scans: live keys with a prefix, a page at a time.
    println!("\n# scan (pages of 2)");
    let mut after: Option<String> = None;
    loop {
        let page = db.scan("", after.as_deref(), 2)?;
        for (key, types) in &page.keys {
            println!("{key}\t{types:?}");
        }
        match page.cursor {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }

    // Deletes: the key reads as absent afterwards.
    println!("\n# delete");
    for key in ["stock/apples", "order/42"] {
        db.delete(key)?;
        println!("{key} after delete: {:?}", db.get(key)?.map(|read| read.values));
    }

    db.flush()?;
    println!("\nflushed; the data is in {}", dir.display());
    Ok(())
}

/// A register's values as text.
fn show(value: &Option<RegisterValue>) -> String {
    match value {
        None => "(absent)".into(),
        Some(read) => {
            let values: Vec<_> = read.values.iter().map(|v| String::from_utf8_lossy(v)).collect();
            match values.as_slice() {
                [one] => format!("{one:?}"),
                many => format!("siblings {many:?}"),
            }
        }
    }
}
