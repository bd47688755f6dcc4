//! The seeded simulations, shared by their `cargo test` entry points
//! (`tests/replication_sim.rs`, `tests/bank_sim.rs`) and the soak command
//! (`cargo run --release --example sim -- --seeds 10000`).
//!
//! - `replication.rs`: nodes over a lossy, partitioned network, judged by the
//!   history checkers of `tests/checkers/`.
//! - `bank.rs`: a bank, usernames and carts under declared invariants, with
//!   the coordinator's state machine deciding the unsafe operations.
//! - `seeds.rs`: which seeds a run takes, and how a failure names its seed.

// Each entry point uses part of the simulations.
#![allow(dead_code)]

pub mod bank;
pub mod replication;
pub mod seeds;

use calmkv::replication::anti_entropy::{self, AntiEntropy};
use calmkv::Node;

/// Runs anti-entropy exchanges (the real handlers, messages passed directly)
/// between every ordered pair of `nodes` until every digest agrees; the
/// number of pair exchanges it took, or an error after `rounds_max`.
pub fn anti_entropy_until_quiet(nodes: &[&Node], rounds_max: usize) -> Result<usize, String> {
    let agreed =
        |nodes: &[&Node]| nodes.iter().all(|n| n.digest().top() == nodes[0].digest().top());
    let mut rounds = 0;
    while !agreed(nodes) {
        for a in 0..nodes.len() {
            for b in (0..nodes.len()).filter(|&b| b != a) {
                rounds += 1;
                if rounds > rounds_max {
                    return Err(format!(
                        "digests still differ after {rounds_max} anti-entropy exchanges"
                    ));
                }
                let (mut from, mut to) = (nodes[a], nodes[b]);
                let mut message: Option<AntiEntropy> = Some(anti_entropy::start(from));
                while let Some(m) = message.take() {
                    let (reply, _) =
                        anti_entropy::handle(to, &m).map_err(|e| format!("anti-entropy: {e:?}"))?;
                    message = reply;
                    std::mem::swap(&mut from, &mut to);
                }
            }
        }
    }
    Ok(rounds)
}
