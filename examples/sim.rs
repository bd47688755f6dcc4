//! The simulation soak: runs the seeded simulations of `tests/sim/` over many
//! seeds, with a progress line and a summary, and lists every failing seed
//! (replay one with `CALMKV_SIM_SEED=<seed> cargo test --test <sim>`).
//!
//! ```text
//! cargo run --release --example sim -- --seeds 10000
//! cargo run --release --example sim -- --sim bank --seeds 500 --base 42
//! ```

#[path = "../tests/checkers/mod.rs"]
mod checkers;
#[path = "../tests/sim/mod.rs"]
mod sim;

use clap::Parser;
use std::io::Write;
use std::time::{Duration, Instant};

/// Runs calmkv's seeded simulations over many seeds and summarises them.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Seeds per simulation.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// The first seed (random when not given; printed either way).
    #[arg(long)]
    base: Option<u64>,
    /// Which simulation: `replication`, `bank`, or `all`.
    #[arg(long, default_value = "all")]
    sim: String,
    /// Stop after this long, whatever is left (seconds).
    #[arg(long, default_value_t = 3600)]
    time_limit: u64,
    /// Fail fsyncs too in the replication simulation (0.4% of them), so that
    /// crashes take back writes other replicas may already hold.
    #[arg(long)]
    fsync_faults: bool,
}

struct Tally {
    name: &'static str,
    runs: u64,
    failures: Vec<(u64, String)>,
    counters: Vec<(&'static str, u64)>,
    elapsed: Duration,
}

fn add(counters: &mut Vec<(&'static str, u64)>, values: &[(&'static str, u64)]) {
    if counters.is_empty() {
        counters.extend(values.iter().map(|(n, _)| (*n, 0)));
    }
    for (slot, (_, v)) in counters.iter_mut().zip(values) {
        slot.1 += v;
    }
}

fn soak(
    name: &'static str,
    seeds: impl Iterator<Item = u64>,
    total: u64,
    deadline: Instant,
    mut run: impl FnMut(u64) -> Result<Vec<(&'static str, u64)>, String>,
) -> Tally {
    let started = Instant::now();
    let mut tally = Tally {
        name,
        runs: 0,
        failures: Vec::new(),
        counters: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut last_line = Instant::now();
    for seed in seeds {
        if Instant::now() > deadline {
            eprintln!("\n{name}: time limit reached");
            break;
        }
        // A panic inside the simulation (a node error, an assertion) is a
        // failure of that seed, not the end of the soak.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed)));
        match outcome {
            Ok(Ok(values)) => add(&mut tally.counters, &values),
            Ok(Err(why)) => tally.failures.push((seed, why)),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into());
                tally.failures.push((seed, why));
            }
        }
        tally.runs += 1;
        if last_line.elapsed() > Duration::from_millis(500) || tally.runs == total {
            last_line = Instant::now();
            let rate = tally.runs as f64 / started.elapsed().as_secs_f64();
            eprint!(
                "\r{name}: {}/{total} seeds, {} failed, {rate:.0} seeds/s   ",
                tally.runs,
                tally.failures.len()
            );
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    tally.elapsed = started.elapsed();
    tally
}

fn main() {
    let args = Args::parse();
    let base = args.base.unwrap_or_else(rand::random);
    let deadline = Instant::now() + Duration::from_secs(args.time_limit);
    println!("base seed {base}, {} seeds per simulation", args.seeds);
    // Panics are collected per seed; keep their default report quiet.
    std::panic::set_hook(Box::new(|_| {}));
    let seeds = || (0..args.seeds).map(|i| base.wrapping_add(i));
    let mut tallies = Vec::new();
    if matches!(args.sim.as_str(), "all" | "replication") {
        tallies.push(soak("replication", seeds(), args.seeds, deadline, |seed| {
            let faults = if args.fsync_faults {
                sim::replication::DISK_FAULTS_WITH_FSYNC
            } else {
                sim::replication::DISK_FAULTS
            };
            let s = sim::replication::simulate_with(seed, faults)?;
            Ok(vec![
                ("operations checked", s.operations),
                ("messages", s.messages),
                ("messages dropped", s.dropped),
                ("messages duplicated", s.duplicated),
                ("partitions", s.partitions),
                ("restarts", s.restarts),
                ("clock skews and jumps", s.clock_faults),
                ("disk faults", s.disk_faults),
                ("writes indeterminate (failed fsync)", s.indeterminate),
            ])
        }));
    }
    if matches!(args.sim.as_str(), "all" | "bank") {
        tallies.push(soak("bank", seeds(), args.seeds, deadline, |seed| {
            let s = sim::bank::simulate(seed)?;
            Ok(vec![
                ("observations checked", s.observations),
                ("deposits", s.deposits),
                ("withdrawals committed", s.withdrawals),
                ("withdrawals refused (uncovered)", s.refused),
                ("withdrawals refused (unavailable)", s.unavailable),
                ("partitions", s.partitions),
                ("crashes", s.crashes),
                ("deltas lost", s.lost),
            ])
        }));
    }
    if tallies.is_empty() {
        eprintln!("--sim must be replication, bank or all");
        std::process::exit(2);
    }
    let mut failed = false;
    for t in &tallies {
        println!(
            "\n## {}: {} seeds in {:.1} s ({:.0} seeds/s), {} failed",
            t.name,
            t.runs,
            t.elapsed.as_secs_f64(),
            t.runs as f64 / t.elapsed.as_secs_f64().max(1e-9),
            t.failures.len()
        );
        for (name, value) in &t.counters {
            println!("- {name}: {value}");
        }
        for (seed, why) in t.failures.iter().take(20) {
            println!("FAILED seed {seed}: {why}");
        }
        failed |= !t.failures.is_empty();
    }
    std::process::exit(i32::from(failed));
}
