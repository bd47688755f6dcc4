//! The quorum's RPCs under a cluster secret: three voters whose frames are
//! sealed (XChaCha20-Poly1305) elect a leader, commit a proposal and decide a
//! forwarded one, two of them in the first step of a secret rotation (keyring
//! `old,new`: they seal with the old secret and open both).

use calmkv::invariants::Invariants;
use calmkv::quorum::{QuorumConfig, QuorumGroup, Timings};
use calmkv::replication::frame::ClusterSecret;
use calmkv::store::MemoryStore;
use calmkv::{Action, Config, CounterOp, CrdtOp, Key, Node, Op};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

const BANK: &str = "[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n";
const DEADLINE: Duration = Duration::from_secs(20);

fn node() -> Arc<Node> {
    let config =
        Config { invariants: Arc::new(Invariants::parse(BANK).unwrap()), ..Config::in_memory() };
    Arc::new(config.open_node().unwrap())
}

fn op(counter: CounterOp) -> Op {
    Op {
        key: Key::new("account/alice", &Default::default()).unwrap(),
        action: Action::Crdt(CrdtOp::Counter(counter)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_voters_elect_a_leader_and_commit() {
    let (old, new) = (b"the old cluster secret".to_vec(), b"the new cluster secret".to_vec());
    let secrets = [
        ClusterSecret::keyring([old.clone()]).unwrap(),
        ClusterSecret::keyring([old.clone(), new.clone()]).unwrap(),
        ClusterSecret::keyring([old.clone(), new]).unwrap(),
    ];
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let voters: Vec<String> =
        listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let timings =
        Timings { heartbeat: Duration::from_millis(50), election_min: Duration::from_millis(200) };
    let mut members = Vec::new();
    for (listener, secret) in listeners.into_iter().zip(secrets) {
        let config = QuorumConfig {
            voters: voters.clone(),
            listen: Some(listener.local_addr().unwrap().to_string()),
            id: None,
            secret: Some(secret),
            timings,
        };
        let (node, store) = (node(), Arc::new(MemoryStore::new()));
        let group = QuorumGroup::start_on(config, Some(listener), node.clone(), store).await;
        members.push((node, group.unwrap()));
    }
    // An increment is local; the proposer's observation carries it in.
    members[0].0.apply(&op(CounterOp::Incr(5))).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let decr = loop {
        match members[0].1.propose(op(CounterOp::Decr(3)), Instant::now() + DEADLINE).await {
            Ok(applied) => break applied,
            Err(error) => {
                assert!(Instant::now() < deadline, "no commit under sealed frames: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(decr.coordinated);
    assert_eq!(decr.state.value.counter().value(), 2);
    // Another voter's proposals, forwarded to the leader, sealed both ways:
    // the quorum's view (5 seen, 3 committed) admits 1 more and refuses 2.
    let forwarded = members[2].1.propose(op(CounterOp::Decr(1)), Instant::now() + DEADLINE).await;
    assert_eq!(forwarded.unwrap().state.value.counter().value(), 1);
    let refused = members[2].1.propose(op(CounterOp::Decr(2)), Instant::now() + DEADLINE).await;
    assert!(
        matches!(refused, Err(calmkv::NodeError::InvariantViolation { .. })),
        "5 - 3 - 1 - 2 is below min: {refused:?}"
    );
    let groups: Vec<_> = members.into_iter().map(|(_, group)| group).collect();
    for group in groups {
        group.shutdown().await;
    }
}
