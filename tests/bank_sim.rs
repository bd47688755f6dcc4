//! The bank simulation (`tests/sim/bank.rs`): deposits everywhere, withdrawals
//! and transfers through the coordinator, under partitions, crashes and a
//! lossy network; judged at every step and after healing by the history
//! checkers (`tests/checkers/`).
//!
//! Every `cargo test` runs [`REGRESSION_SEEDS`] and a random batch of 16
//! (`CALMKV_SIM_SEEDS=<count>` for more); a failure names its seed, replay it
//! with `CALMKV_SIM_SEED=<seed>`. Soak: `cargo run --release --example sim`.

mod checkers;
mod sim;

use calmkv::{Action, CounterOp, CrdtOp, NodeError, Op, SetOp};
use checkers::invariants;
use checkers::linearizable::{self, Claim, ClaimOp, ClaimRet};
use checkers::{History, Outcome};
use rand::Rng;
use sim::bank::{account, key, rules, Sim, ACCOUNTS, NODES};

/// Seeds that find a bug once found: run on every `cargo test`.
///
/// With the old counter (each node's every live share summed, not its
/// latest) each of these takes a balance below zero: a replica that missed a
/// delta kept a node's superseded share beside its latest one, and the
/// coordinator's view counted both. The soak found them, 12 seeds in 6,000
/// (`cargo run --release --example sim -- --sim bank --seeds 6000 --base 777`
/// with the old counter planted); the seeds that first found the bug belong
/// to the simulation before deltas waited out partitions, and no longer
/// reach the same interleaving.
const REGRESSION_SEEDS: [u64; 3] = [1930, 2302, 2500];

#[test]
fn no_replica_ever_goes_below_zero_and_healing_reflects_every_acknowledged_operation() {
    let seeds = sim::seeds::seeds(&REGRESSION_SEEDS, 16);
    let runs = sim::seeds::run_all(&seeds, sim::bank::simulate);
    let sum = |f: fn(&sim::bank::Stats) -> u64| runs.iter().map(f).sum::<u64>();
    let (committed, refused, unavailable) =
        (sum(|s| s.withdrawals), sum(|s| s.refused), sum(|s| s.unavailable));
    eprintln!(
        "{} seeds: {committed} withdrawals committed, {refused} refused as uncovered, \
         {unavailable} refused as unavailable, {} observations checked",
        seeds.len(),
        sum(|s| s.observations)
    );
    // Not vacuous: the coordinator both committed and refused, and partitions
    // both allowed and prevented coordination.
    assert!(committed > 0 && refused > 0 && unavailable > 0);
}

#[test]
fn during_a_partition_deposits_work_on_both_sides_and_withdrawals_only_with_the_majority() {
    let mut sim = Sim::new(7);
    for acct in 0..ACCOUNTS {
        sim.deposit(0, acct, 50);
    }
    sim.heal().unwrap();
    // Voters 0 and 1 with node 3 on one side; voter 2 with node 4 on the other.
    sim.partitioned = true;
    sim.side = [true, true, false, true, false];
    for at in 0..NODES {
        sim.deposit(at, 0, 1);
    }
    assert!(sim.withdraw(0, 0, 1), "the majority side withdraws");
    assert!(sim.withdraw(3, 0, 1), "a non-voter on the majority side withdraws");
    for at in [2, 4] {
        let decr =
            Op { key: key("account/0"), action: Action::Crdt(CrdtOp::Counter(CounterOp::Decr(1))) };
        let refused = sim.propose(at, decr);
        assert!(matches!(refused, Err(NodeError::CoordinationUnavailable { .. })), "{refused:?}");
    }
    // Node 4's deposit has not crossed the partition: held, not lost.
    let before = sim.replicas[0].node.envelope(&key("account/0")).unwrap().value.counter().value();
    for _ in 0..200 {
        sim.deliver();
    }
    let after = sim.replicas[0].node.envelope(&key("account/0")).unwrap().value.counter().value();
    assert_eq!(before, after - 1, "only the majority side's deposit from node 3 can arrive");
    sim.heal().unwrap();
    let value = sim.replicas[4].node.envelope(&key("account/0")).unwrap().value.counter().value();
    assert_eq!(value, 50 + 5 - 2);
    sim.check_converged(&[account(0)]).unwrap();
}

#[test]
fn concurrent_claims_of_a_username_leave_exactly_one_owner_everywhere() {
    let rules = rules();
    let seeds = sim::seeds::seeds(&[], 8);
    sim::seeds::run_all(&seeds, |seed| {
        let mut sim = Sim::new(seed);
        for name in 0..20 {
            let username = format!("username/u{name}");
            let mut claimants: Vec<usize> = (0..NODES).collect();
            // Every node claims, in a random order, some before others' claims arrive.
            for i in (1..claimants.len()).rev() {
                claimants.swap(i, sim.rng.random_range(0..=i));
            }
            let mut claims: History<ClaimOp, ClaimRet> = History::new();
            for at in claimants {
                let who = format!("node-{at}");
                let claim = Op {
                    key: key(&username),
                    action: Action::Put {
                        value: who.clone().into(),
                        context: None,
                        if_absent: true,
                    },
                };
                let id = claims.invoke(at, ClaimOp::Claim(who));
                let won = match sim.propose(at, claim) {
                    Ok(()) => true,
                    Err(NodeError::PreconditionFailed { .. }) => false,
                    Err(other) => return Err(format!("{other:?}")),
                };
                claims.complete(id, Outcome::Ok(ClaimRet::Won(won)));
                if sim.rng.random_bool(0.5) {
                    sim.deliver();
                }
                invariants::check(&rules, &sim.observe(std::slice::from_ref(&username)))
                    .map_err(|v| v.0)?;
            }
            linearizable::check(Claim::default(), &claims)
                .map_err(|v| format!("{username}: {v}"))?;
            sim.heal()?;
            sim.check_converged(std::slice::from_ref(&username))?;
            invariants::check(&rules, &sim.observe(std::slice::from_ref(&username)))
                .map_err(|v| v.0)?;
            let owner = sim.replicas[0].node.envelope(&key(&username)).unwrap();
            if owner.value.register().values().count() != 1 {
                return Err(format!("{username} has no owner after healing"));
            }
        }
        Ok(())
    });
}

#[test]
fn concurrent_adds_never_grow_a_set_past_max_size() {
    let mut sim = Sim::new(11);
    let rules = rules();
    let cart = "cart/c".to_string();
    let mut admitted = 0;
    for (i, at) in (0..12).map(|i| (i, i % NODES)) {
        let add = Op {
            key: key(&cart),
            action: Action::Crdt(CrdtOp::Set(SetOp {
                add: vec![format!("item-{i}")],
                remove: vec![],
            })),
        };
        match sim.propose(at, add) {
            Ok(()) => admitted += 1,
            Err(NodeError::InvariantViolation { .. }) => {}
            Err(other) => panic!("{other:?}"),
        }
        invariants::check(&rules, &sim.observe(std::slice::from_ref(&cart))).unwrap();
    }
    assert_eq!(admitted, 3);
    sim.heal().unwrap();
    sim.check_converged(std::slice::from_ref(&cart)).unwrap();
    for replica in &sim.replicas {
        assert_eq!(replica.node.envelope(&key(&cart)).unwrap().value.set().len(), 3);
    }
}
