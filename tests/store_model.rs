//! The storage engines against a model: random sequences of puts, deletes,
//! batches, reads, scans and reopens run on the memory engine, the sled engine and
//! a `BTreeMap`; all three agree after every step, across reopen of sled.
//! `PROPTEST_CASES` raises the number of sequences (default 48).

use calmkv::store::{Batch, Durability, MemoryStore, SledStore, Store};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
enum Step {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Batch(Vec<(Vec<u8>, Option<Vec<u8>>)>),
    Get(Vec<u8>),
    Scan { prefix: Vec<u8>, after: Option<Vec<u8>>, limit: usize },
    Reopen,
}

/// Keys from a tiny alphabet, so prefixes, cursors and overwrites collide often.
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'/']), 1..4)
}

fn step() -> impl Strategy<Value = Step> {
    let value = prop::collection::vec(any::<u8>(), 0..8);
    prop_oneof![
        4 => (key(), value.clone()).prop_map(|(k, v)| Step::Put(k, v)),
        2 => key().prop_map(Step::Delete),
        2 => prop::collection::vec((key(), prop::option::of(value)), 1..5).prop_map(Step::Batch),
        2 => key().prop_map(Step::Get),
        3 => (prop::collection::vec(prop::sample::select(vec![b'a', b'b']), 0..2), prop::option::of(key()), 1usize..5)
            .prop_map(|(prefix, after, limit)| Step::Scan { prefix, after, limit }),
        1 => Just(Step::Reopen),
    ]
}

fn model_scan(
    model: &BTreeMap<Vec<u8>, Vec<u8>>,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    model
        .iter()
        .filter(|(k, _)| k.starts_with(prefix) && after.is_none_or(|a| k.as_slice() > a))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(48)
    ))]

    #[test]
    fn prop_engines_agree_with_a_btreemap(steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryStore::new();
        let mut sled = Some(SledStore::open(dir.path(), Durability::None).unwrap());
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for step in steps {
            let disk = sled.as_ref().unwrap();
            match step {
                Step::Put(k, v) => {
                    memory.apply(Batch::new().put(k.clone(), v.clone())).unwrap();
                    disk.apply(Batch::new().put(k.clone(), v.clone())).unwrap();
                    model.insert(k, v);
                }
                Step::Delete(k) => {
                    memory.apply(Batch::new().delete(k.clone())).unwrap();
                    disk.apply(Batch::new().delete(k.clone())).unwrap();
                    model.remove(&k);
                }
                Step::Batch(changes) => {
                    let mut batch = Batch::new();
                    for (k, v) in changes {
                        batch = match v {
                            Some(v) => { model.insert(k.clone(), v.clone()); batch.put(k, v) }
                            None => { model.remove(&k); batch.delete(k) }
                        };
                    }
                    memory.apply(batch.clone()).unwrap();
                    disk.apply(batch).unwrap();
                }
                Step::Get(k) => {
                    prop_assert_eq!(memory.get(&k).unwrap(), model.get(&k).cloned());
                    prop_assert_eq!(disk.get(&k).unwrap(), model.get(&k).cloned());
                }
                Step::Scan { prefix, after, limit } => {
                    let expected = model_scan(&model, &prefix, after.as_deref(), limit);
                    prop_assert_eq!(&memory.scan_prefix(&prefix, after.as_deref(), limit).unwrap(), &expected);
                    prop_assert_eq!(&disk.scan_prefix(&prefix, after.as_deref(), limit).unwrap(), &expected);
                }
                Step::Reopen => {
                    drop(sled.take());
                    sled = Some(SledStore::open(dir.path(), Durability::None).unwrap());
                }
            }
        }
        let everything = model_scan(&model, b"", None, usize::MAX);
        prop_assert_eq!(&sled.unwrap().scan_prefix(b"", None, usize::MAX).unwrap(), &everything);
        prop_assert_eq!(&memory.scan_prefix(b"", None, usize::MAX).unwrap(), &everything);
    }
}
