//! Which seeds a simulation runs: a fixed set that once found bugs, then a
//! random batch; `CALMKV_SIM_SEED` replays one, `CALMKV_SIM_SEEDS` sizes the
//! batch. A failing seed is named in the failure message.

use rand::Rng;

/// `CALMKV_SIM_SEED` alone when set; otherwise `fixed`, then
/// `CALMKV_SIM_SEEDS` (default `default`) consecutive seeds from a random base.
pub fn seeds(fixed: &[u64], default: u64) -> Vec<u64> {
    match std::env::var("CALMKV_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("CALMKV_SIM_SEED is a number")],
        Err(_) => {
            let count = std::env::var("CALMKV_SIM_SEEDS")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(default);
            let base: u64 = rand::rng().random();
            fixed.iter().copied().chain((0..count).map(|i| base.wrapping_add(i))).collect()
        }
    }
}

/// Runs `simulate` on every seed; panics naming the first seed that fails.
pub fn run_all<S>(seeds: &[u64], mut simulate: impl FnMut(u64) -> Result<S, String>) -> Vec<S> {
    let mut results = Vec::new();
    for &seed in seeds {
        match simulate(seed) {
            Ok(stats) => results.push(stats),
            Err(why) => panic!("seed {seed} failed (replay: CALMKV_SIM_SEED={seed}): {why}"),
        }
    }
    results
}
