//! Merge cost and delta size against full-state size, for the two types whose
//! states grow with their members: the OR-set and the OR-map.
//!
//! For each size it measures merging a one-operation delta into a replica, and
//! merging the full state of a replica that differs by that operation (what
//! anti-entropy without deltas would ship). Encoded sizes are printed as
//! `size <type>/<members>: full=<bytes> delta=<bytes>`. Replicas are returned from
//! the timed closure so that dropping them is not measured.
//!
//! Run: `cargo bench -p calmkv-crdts --bench merge`.

use calmkv_crdts::{encode, CausalCounter, Crdt, Limits, NodeId, OrMap, OrSet};
type CounterMap = OrMap<String, CausalCounter>;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};

const SIZES: [usize; 3] = [10, 1_000, 100_000];
const A: NodeId = NodeId(0xA11CE);
const B: NodeId = NodeId(0xB0B);

fn member(i: usize) -> String {
    format!("member-{i:08}")
}

/// A replica with `n - 1` members, the delta of the `n`-th add made on another
/// replica, and that other replica's full state (`n` members).
fn or_set(n: usize) -> (OrSet<String>, OrSet<String>, OrSet<String>) {
    let limits = Limits::default();
    let mut replica = OrSet::new();
    replica.add_all(A, (0..n - 1).map(member), &limits).unwrap();
    let mut other = replica.clone();
    let delta = other.add(B, member(n - 1), &limits).unwrap();
    (replica, delta, other)
}

fn or_map(
    n: usize,
) -> (OrMap<String, CausalCounter>, OrMap<String, CausalCounter>, OrMap<String, CausalCounter>) {
    let limits = Limits::default();
    let mut replica = CounterMap::new();
    for i in 0..n - 1 {
        replica.update(member(i), &limits, |c| c.incr(A, 1)).unwrap();
    }
    let mut other = replica.clone();
    let delta = other.update(member(n - 1), &limits, |c| c.incr(B, 1)).unwrap();
    (replica, delta, other)
}

fn bench_type<S: Crdt + serde::Serialize>(
    c: &mut Criterion,
    name: &str,
    build: fn(usize) -> (S, S, S),
) {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    for n in SIZES {
        let (replica, delta, full) = build(n);
        let (full_bytes, delta_bytes) =
            (encode(&full).unwrap().len(), encode(&delta).unwrap().len());
        println!("size {name}/{n}: full={full_bytes} delta={delta_bytes}");
        group.bench_with_input(BenchmarkId::new("merge_delta", n), &n, |b, _| {
            b.iter_batched(
                || replica.clone(),
                |mut r| {
                    r.merge(&delta);
                    r
                },
                BatchSize::LargeInput,
            )
        });
        group.bench_with_input(BenchmarkId::new("merge_full", n), &n, |b, _| {
            b.iter_batched(
                || replica.clone(),
                |mut r| {
                    r.merge(&full);
                    r
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_type(c, "or_set", or_set);
    bench_type(c, "or_map", or_map);
}

criterion_group!(merge, benches);
criterion_main!(merge);
