//! A local three-node cluster in one process: each node has its own data
//! directory, HTTP API and peer channel on loopback. Writes a value on node 1,
//! reads it from node 3, prints every node's URL, and serves until Ctrl-C.
//!
//! ```sh
//! cargo run --example cluster            # 3 nodes
//! cargo run --example cluster -- 5       # 5 nodes
//! ```

use calmkv::server::{connect_all, Server, ServerConfig};
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
        servers.push(Server::start(config).await?);
    }
    connect_all(&servers);
    for (i, server) in servers.iter().enumerate() {
        println!("node {} http=http://{} id={}", i + 1, server.http_addr(), server.node().id());
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
