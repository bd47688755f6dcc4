//! The quorum's RPCs under a cluster secret: three voters whose connections
//! open with the challenge-response handshake and whose frames are sealed
//! under each connection's session key elect a leader, commit a proposal and
//! decide a forwarded one, two of them in the first step of a secret rotation
//! (keyring `old,new`: they prove with the old secret and accept both). A
//! stranger, or a recording of a real connection replayed, gets nothing.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_or_a_replayed_recording_gets_nothing_from_a_sealed_voter() {
    use calmkv::quorum::network::Request;
    use calmkv::replication::frame::encode_frame;
    use calmkv::replication::handshake::{Hello, HANDSHAKE_READ_BYTES};
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let secret = ClusterSecret::keyring([b"the only cluster secret".to_vec()]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = QuorumConfig {
        voters: vec![addr.clone()],
        listen: Some(addr.clone()),
        id: None,
        secret: Some(secret.clone()),
        timings: Timings::default(),
    };
    let group = QuorumGroup::start_on(config, Some(listener), node(), Arc::new(MemoryStore::new()))
        .await
        .unwrap();
    let refused = || group.metrics().handshakes_refused.load(Ordering::Relaxed);
    let served = || group.metrics().requests_served.load(Ordering::Relaxed);
    let served_before = served();
    // A plain frame, a frame sealed the way a secret holder could seal one
    // without a session (what a recording of an older connection holds), and
    // a hello with a forged proof: each connection is closed unanswered.
    let vote = Request::Vote(openraft::raft::VoteRequest {
        vote: openraft::Vote::new(1, 9),
        last_log_id: None,
    });
    // (Padded past a hello's length, so each is judged at once.)
    let padded = |mut bytes: Vec<u8>| {
        bytes.resize(bytes.len().max(HANDSHAKE_READ_BYTES), 0);
        bytes
    };
    let forged_hello = [&Hello::new(calmkv_crdts::NodeId(9), true).encode()[..], &[0u8; 32]];
    let attempts = [
        padded(encode_frame(&vote, None).unwrap()),
        padded(encode_frame(&vote, Some(&secret)).unwrap()),
        forged_hello.concat(),
    ];
    for (i, bytes) in attempts.iter().enumerate() {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = stream.write_all(bytes).await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
        let _ = read.await.expect("the voter closes the connection");
        // At most the voter's own hello and proof: never a response frame.
        assert!(answer.len() <= HANDSHAKE_READ_BYTES, "attempt {i} got {} bytes", answer.len());
    }
    let deadline = Instant::now() + DEADLINE;
    while refused() < attempts.len() as u64 {
        assert!(Instant::now() < deadline, "only {} handshakes refused", refused());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served(), served_before, "a request was served without a handshake");
    group.shutdown().await;
}
