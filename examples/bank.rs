//! A bank on three calmkv nodes in one process: accounts may never go below
//! zero. Deposits run locally on any node; withdrawals go through the quorum,
//! which refuses an overdraft; with two of the three voters stopped (the
//! minority side of a partition), deposits still work and withdrawals are
//! refused cleanly instead of risking a negative balance.
//!
//! ```sh
//! cargo run --example bank
//! ```

use calmkv::invariants::Invariants;
use calmkv::server::{BoundListener, GossipOptions, QuorumOptions, Server, ServerConfig};
use calmkv::{Action, Config, CounterOp, CrdtOp, Key, NodeError, Op};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const RULES: &str = r#"
[[invariant]]
keys = "account/*"
type = "counter"
min = 0
"#;

fn op(account: &str, op: CounterOp) -> anyhow::Result<Op> {
    let key = Key::new(format!("account/{account}"), &Default::default())?;
    Ok(Op { key, action: Action::Crdt(CrdtOp::Counter(op)) })
}

async fn run(server: &Server, what: &str, op: Op) {
    let result = server.cluster().write(op, Default::default(), Duration::from_secs(2)).await;
    match result {
        Ok(applied) => {
            let how = if applied.coordinated { "quorum" } else { "local" };
            println!(
                "{what:<44} ok ({how}); balance here {}",
                applied.state.value.counter().value()
            );
        }
        Err(error) => println!("{what:<44} refused: {error}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let invariants = Arc::new(Invariants::parse(RULES)?);
    let dir = tempfile::tempdir()?;
    // Quorum addresses must be known to every node up front; their ports
    // stay bound until each voter serves on its own.
    let probes: Vec<std::net::TcpListener> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let voters: Vec<String> =
        probes.iter().map(|p| p.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>()?;
    let mut probes = probes.into_iter().map(BoundListener::new);
    let mut nodes: Vec<Server> = Vec::new();
    for (i, voter) in voters.iter().enumerate() {
        let node = Config {
            invariants: invariants.clone(),
            ..Config::new(dir.path().join(format!("n{i}")))
        };
        let mut config = ServerConfig::new(node, "127.0.0.1:0");
        config.peer_addr = Some("127.0.0.1:0".into());
        let seeds = nodes.first().and_then(Server::gossip_addr).into_iter().collect();
        config.gossip = Some(GossipOptions::new("127.0.0.1:0", seeds));
        config.quorum = Some(QuorumOptions {
            voters: voters.clone(),
            listen: Some(voter.clone()),
            listener: probes.next(),
            ..Default::default()
        });
        nodes.push(Server::start(config).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|n| n.quorum().is_some_and(|q| q.status().leader.is_none())) {
        anyhow::ensure!(Instant::now() < deadline, "no quorum leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    run(&nodes[0], "node 1: deposit 100 to alice", op("alice", CounterOp::Incr(100))?).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // the delta reaches the others
    run(&nodes[1], "node 2: withdraw 70 from alice", op("alice", CounterOp::Decr(70))?).await;
    run(&nodes[2], "node 3: withdraw 70 from alice (overdraft)", op("alice", CounterOp::Decr(70))?)
        .await;

    println!("-- nodes 2 and 3 stop: node 1 is alone, without a majority of voters --");
    let first = nodes.remove(0);
    for node in nodes {
        node.shutdown().await?;
    }
    run(&first, "node 1: deposit 5 to alice", op("alice", CounterOp::Incr(5))?).await;
    let refused = first
        .cluster()
        .write(op("alice", CounterOp::Decr(1))?, Default::default(), Duration::from_secs(1))
        .await;
    match refused {
        Err(calmkv::replication::cluster::ClusterError::Node(
            NodeError::CoordinationUnavailable { .. } | NodeError::CoordinationIndeterminate { .. },
        )) => {
            println!(
                "{:<44} refused: no quorum (503 coordination_unavailable)",
                "node 1: withdraw 1 from alice"
            )
        }
        other => println!("node 1: withdraw 1 from alice: {other:?}"),
    }
    first.shutdown().await?;
    Ok(())
}
