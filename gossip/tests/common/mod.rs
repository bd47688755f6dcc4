//! Shared helpers of the gossip integration tests: addresses, node start-up
//! on the in-memory network, and waiting for a condition with a deadline.
#![allow(dead_code)]

use calmkv_gossip::{GossipConfig, MemNetwork, MemberState, Membership, NodeMeta};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

/// The seed of this run: `CALMKV_TEST_SEED` or a fixed default. Printed.
pub fn test_seed() -> u64 {
    let seed =
        std::env::var("CALMKV_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0xca1b_0001);
    println!("test seed {seed} (set CALMKV_TEST_SEED to reproduce)");
    seed
}

pub fn gossip_addr(i: u64) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, u8::try_from(i).unwrap()], 7946))
}

pub fn meta(i: u64) -> NodeMeta {
    let port = u16::try_from(7000 + i).unwrap();
    NodeMeta {
        http_addr: SocketAddr::from(([10, 0, 0, u8::try_from(i).unwrap()], port)),
        peer_addr: SocketAddr::from(([10, 0, 1, u8::try_from(i).unwrap()], port)),
        invariants_hash: 0xfeed,
    }
}

pub fn config(i: u64, seed: u64, seeds: &[u64]) -> GossipConfig {
    let mut config = GossipConfig::new(i, meta(i));
    config.seeds = seeds.iter().map(|s| gossip_addr(*s)).collect();
    config.rng_seed = Some(seed.wrapping_add(i));
    config
}

pub async fn start(net: &MemNetwork, config: GossipConfig) -> Membership {
    let transport = net.bind(gossip_addr(config.node_id));
    Membership::start(config, transport).await.expect("membership starts")
}

/// Starts nodes `ids`, all seeded with `ids[0]`.
pub async fn start_cluster(
    net: &MemNetwork,
    seed: u64,
    ids: &[u64],
    secret: Option<&[u8]>,
    state_dir: Option<&std::path::Path>,
) -> Vec<Membership> {
    let mut nodes = Vec::new();
    for &i in ids {
        let mut config = config(i, seed, &ids[..1]);
        config.cluster_secret = secret.map(<[u8]>::to_vec);
        config.state_path = state_dir.map(|d| state_path(d, i));
        nodes.push(start(net, config).await);
    }
    nodes
}

pub fn state_path(dir: &std::path::Path, i: u64) -> PathBuf {
    dir.join(format!("node-{i}.gossip"))
}

/// Polls `condition` every 50 ms (virtual time under `start_paused`) until
/// it holds; panics after `deadline`. Returns how long it took.
pub async fn wait_for(
    deadline: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if condition() {
            return start.elapsed();
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The state in which `observer` sees node `id` (None when unknown).
pub fn state_of(observer: &Membership, id: u64) -> Option<MemberState> {
    observer.member(id).map(|m| m.state)
}

/// Whether every node in `observers` sees every id in `ids` (except itself) in `state`.
pub fn all_see(observers: &[&Membership], ids: &[u64], state: MemberState) -> bool {
    observers.iter().all(|o| {
        ids.iter()
            .filter(|id| **id != o.identity().node_id)
            .all(|id| state_of(o, *id) == Some(state))
    })
}
