//! A local three-node cluster in one process: each node has its own data
//! directory, HTTP API, peer channel and gossip on loopback, and finds the
//! others through gossip (node 1 is the seed). Writes a value on node 1, reads
//! it from node 3, prints every node's URL, and serves until Ctrl-C.
//!
//! ```sh
//! cargo run --example cluster            # 3 nodes
//! cargo run --example cluster -- 5       # 5 nodes
//! ```

use calmkv::server::{GossipOptions, Server, ServerConfig};
use calmkv::{Action, Config, Key, Op};
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nodes: usize = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(3);
    anyhow::ensure!((1..=16).contains(&nodes), "between 1 and 16 nodes");
    let dir = tempfile::tempdir()?;
    let mut servers = Vec::new();
    for i in 1..=nodes {
        let node = Config::new(dir.path().join(format!("node-{i}")));
        let mut config = ServerConfig::new(node, "127.0.0.1:0");
        config.peer_addr = Some("127.0.0.1:0".into());
        let seeds = servers.first().and_then(Server::gossip_addr).into_iter().collect();
        config.gossip = Some(GossipOptions::new("127.0.0.1:0", seeds));
        servers.push(Server::start(config).await?);
    }
    // Gossip needs a moment for every node to learn every other.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while servers.iter().any(|s| s.cluster().channel().peers().len() + 1 < nodes) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "gossip did not join the nodes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (i, server) in servers.iter().enumerate() {
        let gossip = server.gossip_addr().map(|a| a.to_string()).unwrap_or_default();
        println!("node {} http=http://{} gossip={gossip}", i + 1, server.http_addr());
    }

    // A write on the first node...
    let key = Key::new("greeting", servers[0].node().limits())?;
    let op = Op {
        key: key.clone(),
        action: Action::Put { value: "hello".into(), context: None, if_absent: false },
    };
    servers[0].cluster().write(op, Default::default(), Duration::from_secs(5)).await?;
    // ...is readable on the last one once its delta arrives.
    let last = servers.last().expect("at least one node");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while last.node().read(&key)?.is_none() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the write did not arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "wrote greeting=hello on node 1; node {nodes} reads {:?}",
        last.node().read(&key)?.map(|r| r.values)
    );
    println!("try: curl http://{}/v1/kv/greeting   (Ctrl-C stops the cluster)", last.http_addr());

    tokio::signal::ctrl_c().await?;
    for server in servers {
        server.shutdown().await?;
    }
    Ok(())
}
