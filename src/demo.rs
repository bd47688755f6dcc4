//! `calmkv demo`: a local cluster in one process, for trying calmkv out.
//!
//! Every node is a whole [`Server`] (store, HTTP API, peer channel, gossip) on
//! loopback. Node 1 starts first; the others join through its gossip address.
//! The command prints one line per node, `node <i> http=<url> gossip=<addr>`,
//! once every node sees all the others alive, and stops every node cleanly on
//! Ctrl-C or SIGTERM (each leaves the cluster and flushes its store).

use anyhow::{bail, Context as _};
use calmkv::invariants::Invariants;
use calmkv::replication::frame::ClusterSecret;
use calmkv::server::{BoundListener, GossipOptions, QuorumOptions, Server, ServerConfig};
use calmkv::Config;
use calmkv_gossip::MemberState;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most nodes a demo starts.
const NODES_MAX: usize = 16;
/// How long the demo waits for every node to see every other alive.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct DemoArgs {
    /// Nodes to start (1 to 16).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Node i listens for HTTP on 127.0.0.1:<base-port + i - 1>, for peers on
    /// <base-port + 100 + i - 1> and for gossip (UDP) on <base-port + 200 + i - 1>.
    /// 0 lets the system pick free ports.
    #[arg(long, default_value_t = 7071)]
    base_port: u16,
    /// Keep node i's data in <DIR>/node-<i> (kept on exit, so a demo can be
    /// restarted); by default a temporary directory, removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Shared secret (at least 16 bytes) for gossip, peer and quorum traffic;
    /// several, comma-separated, make a keyring (the first seals).
    #[arg(long, env = "CALMKV_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Invariant declarations every node enforces (TOML; docs/invariants.md).
    #[arg(long)]
    invariants: Option<PathBuf>,
    /// How many of the nodes are quorum voters (the first ones); their quorum
    /// addresses are <base-port + 300 + i - 1>.
    #[arg(long, default_value_t = 3)]
    voters: usize,
}

/// The voters' quorum addresses: fixed ports from the base, or, with base 0,
/// ports the system hands out now, with their listeners kept bound until the
/// voters serve on them (every node must know every voter's address before
/// the first starts).
fn quorum_addrs(base: u16, count: usize) -> anyhow::Result<Vec<(String, Option<BoundListener>)>> {
    if base != 0 {
        return (0..count).map(|i| Ok((addr(base, 300, i)?, None))).collect();
    }
    (0..count)
        .map(|_| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            Ok((listener.local_addr()?.to_string(), Some(BoundListener::new(listener))))
        })
        .collect()
}

fn addr(base: u16, offset: u16, i: usize) -> anyhow::Result<String> {
    if base == 0 {
        return Ok("127.0.0.1:0".to_string());
    }
    let port = u16::try_from(i)
        .ok()
        .and_then(|i| base.checked_add(offset)?.checked_add(i))
        .context("--base-port is too high for that many nodes")?;
    Ok(format!("127.0.0.1:{port}"))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > NODES_MAX {
        bail!("--nodes must be between 1 and {NODES_MAX}");
    }
    let secret = match &args.cluster_secret {
        Some(secret) => Some(ClusterSecret::parse(secret).context(
            "--cluster-secret must be at least 16 bytes (each of 1 to 8 comma-separated secrets)",
        )?),
        None => None,
    };
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("calmkv-demo-").tempdir()?),
    };
    let root = match (&args.data_dir, &temp) {
        (Some(dir), _) => dir.clone(),
        (None, Some(temp)) => temp.path().to_path_buf(),
        (None, None) => unreachable!("a temporary directory is made when --data-dir is absent"),
    };
    let invariants = match &args.invariants {
        Some(path) => Arc::new(Invariants::load(path)?),
        None => Arc::new(Invariants::none()),
    };
    let voter_count = args.voters.clamp(1, args.nodes);
    let bound = quorum_addrs(args.base_port, voter_count)?;
    let voters: Vec<String> = bound.iter().map(|(addr, _)| addr.clone()).collect();
    let stop = crate::shutdown_signal();
    let mut servers: Vec<Server> = Vec::new();
    for i in 0..args.nodes {
        let node = Config {
            invariants: invariants.clone(),
            ..Config::new(root.join(format!("node-{}", i + 1)))
        };
        let mut config = ServerConfig::new(node, addr(args.base_port, 0, i)?);
        config.quorum = Some(QuorumOptions {
            voters: voters.clone(),
            listen: voters.get(i).cloned(),
            listener: bound.get(i).and_then(|(_, listener)| listener.clone()),
            ..QuorumOptions::default()
        });
        config.peer_addr = Some(addr(args.base_port, 100, i)?);
        config.cluster_secret = secret.clone();
        let seeds = servers.first().and_then(Server::gossip_addr).into_iter().collect();
        config.gossip = Some(GossipOptions::new(addr(args.base_port, 200, i)?, seeds));
        let server = Server::start(config)
            .await
            .with_context(|| format!("node {} could not start", i + 1))?;
        servers.push(server);
    }
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let has_leader = |servers: &[Server]| {
        servers.iter().filter_map(Server::quorum).all(|q| q.status().leader.is_some())
    };
    while !all_see_each_other(&servers) || !has_leader(&servers) {
        if Instant::now() > deadline {
            eprintln!("warning: the nodes do not all see each other (or no quorum leader) yet; starting anyway");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, server) in servers.iter().enumerate() {
        let gossip = server.gossip_addr().map_or_else(|| "-".to_string(), |a| a.to_string());
        println!("node {} http=http://{} gossip={gossip}", i + 1, server.http_addr());
    }
    println!("quorum voters: nodes 1 to {voter_count} ({})", voters.join(", "));
    match &temp {
        Some(temp) => println!(
            "data in {} (removed on exit); Ctrl-C stops the cluster",
            temp.path().display()
        ),
        None => println!("data in {} (kept); Ctrl-C stops the cluster", root.display()),
    }
    stop.await;
    for (i, server) in servers.into_iter().enumerate() {
        if let Err(error) = server.shutdown().await {
            eprintln!("node {}: {error}", i + 1);
        }
    }
    drop(temp);
    Ok(())
}

/// Whether every node sees every other node alive.
fn all_see_each_other(servers: &[Server]) -> bool {
    servers.iter().all(|server| {
        server.membership().is_none_or(|watch| {
            let alive = watch.members().iter().filter(|m| m.state == MemberState::Alive).count();
            alive + 1 >= servers.len()
        })
    })
}
