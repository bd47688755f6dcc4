//! The seeded simulations, shared by their `cargo test` entry points
//! (`tests/replication_sim.rs`, `tests/bank_sim.rs`) and the soak command
//! (`cargo run --release --example sim -- --seeds 10000`).
//!
//! - `replication.rs`: nodes over a lossy, partitioned network, judged by the
//!   history checkers of `tests/checkers/`.
//! - `seeds.rs`: which seeds a run takes, and how a failure names its seed.

// Each entry point uses part of the simulations.
#![allow(dead_code)]

pub mod replication;
pub mod seeds;
