//! The quorum group over real loopback TCP: three voters (and a non-voter)
//! commit proposals under a bank's `min = 0`, survive the loss of the leader,
//! refuse cleanly without a majority, recover from their own log after a
//! restart, replace a dead voter, and shrug off garbage frames.

use calmkv::invariants::Invariants;
use calmkv::quorum::{QuorumConfig, QuorumGroup, Timings};
use calmkv::store::{Durability, SledStore};
use calmkv::{Action, Config, CounterOp, CrdtOp, Key, Node, NodeError, Op};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

const BANK: &str = "[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n";
const DEADLINE: Duration = Duration::from_secs(10);

struct Member {
    node: Arc<Node>,
    group: Arc<QuorumGroup>,
}

fn node() -> Arc<Node> {
    let config =
        Config { invariants: Arc::new(Invariants::parse(BANK).unwrap()), ..Config::in_memory() };
    Arc::new(config.open_node().unwrap())
}

fn timings() -> Timings {
    Timings { heartbeat: Duration::from_millis(50), election_min: Duration::from_millis(200) }
}

async fn start(
    voters: &[String],
    listener: Option<TcpListener>,
    dir: &Path,
    node: Arc<Node>,
) -> Member {
    start_as(None, voters, listener, dir, node).await
}

async fn start_as(
    id: Option<u64>,
    voters: &[String],
    listener: Option<TcpListener>,
    dir: &Path,
    node: Arc<Node>,
) -> Member {
    let listen = listener.as_ref().map(|l| l.local_addr().unwrap().to_string());
    let config =
        QuorumConfig { voters: voters.to_vec(), listen, id, secret: None, timings: timings() };
    let store = Arc::new(SledStore::open(dir, Durability::Sync).unwrap());
    let group = QuorumGroup::start_on(config, listener, node.clone(), store).await.unwrap();
    Member { node, group }
}

/// Three voters on fresh loopback ports, and their data directories.
async fn three(root: &Path) -> (Vec<String>, Vec<Member>) {
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let voters: Vec<String> =
        listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let mut members = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        members.push(start(&voters, Some(listener), &root.join(format!("v{i}")), node()).await);
    }
    (voters, members)
}

/// The leader all `members` agree on, once it is one of them (a stopped
/// voter may still be believed leader for an election timeout).
async fn leader_of(members: &[&Member]) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    let ids: Vec<Option<u64>> = members.iter().map(|m| m.group.status().id).collect();
    loop {
        let leaders: Vec<Option<u64>> = members.iter().map(|m| m.group.status().leader).collect();
        if let Some(Some(leader)) = leaders.first() {
            if ids.contains(&Some(*leader)) && leaders.iter().all(|l| *l == Some(*leader)) {
                return *leader;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn op(key: &str, counter: CounterOp) -> Op {
    Op {
        key: Key::new(key, &Default::default()).unwrap(),
        action: Action::Crdt(CrdtOp::Counter(counter)),
    }
}

fn balance(node: &Node, key: &str) -> i128 {
    node.envelope(&Key::new(key, node.limits()).unwrap()).unwrap().value.counter().value()
}

async fn decr(member: &Member, key: &str, n: u64) -> Result<calmkv::Applied, NodeError> {
    member.group.propose(op(key, CounterOp::Decr(n)), Instant::now() + DEADLINE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrements_commit_from_any_node_only_while_the_quorums_view_stays_at_or_above_min() {
    let root = tempfile::tempdir().unwrap();
    let (voters, members) = three(root.path()).await;
    leader_of(&members.iter().collect::<Vec<_>>()).await;

    // An increment is local; the proposer's observation carries it in.
    members[0].node.apply(&op("account/a", CounterOp::Incr(10))).unwrap();
    let applied = decr(&members[0], "account/a", 4).await.unwrap();
    assert!(applied.coordinated);
    assert_eq!(applied.state.value.counter().value(), 6);

    // A node that has not seen the increment is refused: the quorum's view is
    // everything committed plus what that node observed, 0 - 4 - 7 < 0.
    let refused = decr(&members[1], "account/a", 7).await;
    assert!(matches!(refused, Err(NodeError::InvariantViolation { .. })), "{refused:?}");
    // Once it has seen it (replication would bring it), 10 - 4 - 6 = 0 passes.
    members[1]
        .node
        .merge(&Key::new("account/a", &Default::default()).unwrap(), &applied.state)
        .unwrap();
    decr(&members[1], "account/a", 6).await.unwrap();
    let refused = decr(&members[2], "account/a", 1).await;
    assert!(matches!(refused, Err(NodeError::InvariantViolation { .. })), "{refused:?}");

    // A non-voter proposes through the voters.
    let client_dir = root.path().join("client");
    let client = start(&voters, None, &client_dir, node()).await;
    client.node.apply(&op("account/b", CounterOp::Incr(3))).unwrap();
    let applied = decr(&client, "account/b", 3).await.unwrap();
    assert_eq!(applied.state.value.counter().value(), 0);
    assert_eq!(balance(&client.node, "account/b"), 0, "the proposer merged the outcome");

    // Every voter's state machine admitted the same states, and merged them.
    let deadline = Instant::now() + DEADLINE;
    for member in &members {
        while balance(&member.node, "account/a") != 0 || balance(&member.node, "account/b") != 0 {
            assert!(Instant::now() < deadline, "a voter never merged the committed states");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for member in &members {
        member.group.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_decrements_succeed_exactly_as_often_as_the_balance_allows() {
    let root = tempfile::tempdir().unwrap();
    let (_, members) = three(root.path()).await;
    leader_of(&members.iter().collect::<Vec<_>>()).await;
    let funded = members[0].node.apply(&op("account/race", CounterOp::Incr(5))).unwrap();
    let key = Key::new("account/race", &Default::default()).unwrap();
    for member in &members[1..] {
        member.node.merge(&key, &funded.state).unwrap();
    }
    let members = Arc::new(members);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let members = members.clone();
        tasks.push(tokio::spawn(async move { decr(&members[i % 3], "account/race", 1).await }));
    }
    let mut admitted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(NodeError::InvariantViolation { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(admitted, 5, "five units, five decrements of one");
    for member in members.iter() {
        member.group.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_survives_a_lost_leader_refuses_without_a_majority_and_recovers_from_its_log() {
    let root = tempfile::tempdir().unwrap();
    let (voters, mut members) = three(root.path()).await;
    let leader = leader_of(&members.iter().collect::<Vec<_>>()).await;
    let funded = members[0].node.apply(&op("account/a", CounterOp::Incr(100))).unwrap();
    let key = Key::new("account/a", &Default::default()).unwrap();
    for member in &members[1..] {
        member.node.merge(&key, &funded.state).unwrap();
    }
    decr(&members[0], "account/a", 1).await.unwrap();

    // The leader goes away; the two others elect a new one and go on.
    let gone = (leader - 1) as usize;
    members[gone].group.shutdown().await;
    let rest: Vec<&Member> =
        members.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, m)| m).collect();
    let new_leader = leader_of(&rest).await;
    assert_ne!(new_leader, leader);
    decr(rest[0], "account/a", 1).await.unwrap();

    // With a second voter gone, nothing commits: a clean refusal by the deadline.
    let (second, alone) = {
        let others: Vec<usize> = (0..3).filter(|i| *i != gone).collect();
        (others[1], others[0])
    };
    members[second].group.shutdown().await;
    let refused = members[alone]
        .group
        .propose(op("account/a", CounterOp::Decr(1)), Instant::now() + Duration::from_secs(2))
        .await;
    // "Not applied" from a follower (no leader), "unknown" from a leader that
    // appended the entry and cannot commit it.
    assert!(
        matches!(
            refused,
            Err(NodeError::CoordinationUnavailable { .. }
                | NodeError::CoordinationIndeterminate { .. })
        ),
        "{refused:?}"
    );

    // The first voter restarts on its data: its log and vote are there, the
    // group has a majority again and its state machine holds the decrements.
    drop(members.remove(gone));
    let listener = TcpListener::bind(&voters[gone]).await.unwrap();
    let dir = root.path().join(format!("v{gone}"));
    members.insert(gone, start(&voters, Some(listener), &dir, node()).await);
    leader_of(&[&members[gone], &members[alone]]).await;
    decr(&members[gone], "account/a", 1).await.unwrap();
    // The restarted voter applies what it missed as it catches up: three
    // admitted decrements (the refused one may have committed late, a fourth).
    let remaining = |m: &Member| m.group.admitted("account/a").map(|s| s.value.counter().value());
    let deadline = Instant::now() + DEADLINE;
    while remaining(&members[gone]) > Some(97) {
        assert!(Instant::now() < deadline, "never caught up: {:?}", remaining(&members[gone]));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let settled = remaining(&members[gone]).expect("the state machine has the key");
    assert!(settled == 97 || settled == 96, "{settled}");
    for member in &members {
        member.group.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_voter_is_replaced_and_garbage_frames_are_counted() {
    let root = tempfile::tempdir().unwrap();
    let (voters, members) = three(root.path()).await;
    let leader = leader_of(&members.iter().collect::<Vec<_>>()).await;
    let dead = if leader == 3 { 2 } else { 3 };
    members[(dead - 1) as usize].group.shutdown().await;

    // Garbage on a voter's quorum port: counted, connection closed, still serving.
    let target = &members[(leader - 1) as usize];
    let before = target.group.metrics().frames_refused.load(std::sync::atomic::Ordering::Relaxed);
    {
        use tokio::io::AsyncWriteExt;
        let mut stream =
            tokio::net::TcpStream::connect(&voters[(leader - 1) as usize]).await.unwrap();
        stream.write_all(&[0, 0, 0, 5, 9, 9, 9, 9, 9]).await.unwrap();
        let mut oversized =
            tokio::net::TcpStream::connect(&voters[(leader - 1) as usize]).await.unwrap();
        oversized.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    }
    let deadline = Instant::now() + DEADLINE;
    while target.group.metrics().frames_refused.load(std::sync::atomic::Ordering::Relaxed)
        < before + 2
    {
        assert!(Instant::now() < deadline, "garbage frames were not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let spare = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let spare_addr = spare.local_addr().unwrap().to_string();
    // The replacement starts as a voter-to-be: it lists the group as it will be.
    let mut future_voters = voters.clone();
    future_voters[(dead - 1) as usize] = spare_addr.clone();
    let new_id = 4;
    let replacement =
        start_as(Some(new_id), &future_voters, Some(spare), &root.path().join("spare"), node())
            .await;
    let reused = target.group.replace_voter(dead, dead, spare_addr.clone()).await;
    assert!(reused.is_err(), "an id is never reused");
    target.group.replace_voter(dead, new_id, spare_addr.clone()).await.unwrap();
    let status = target.group.status();
    assert!(
        status.voters.contains_key(&new_id) && !status.voters.contains_key(&dead),
        "{status:?}"
    );
    target.node.apply(&op("account/r", CounterOp::Incr(1))).unwrap();
    decr(target, "account/r", 1).await.unwrap();
    for member in &members {
        member.group.shutdown().await;
    }
    replacement.group.shutdown().await;
}
