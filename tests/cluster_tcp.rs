//! Replication over real TCP on loopback: three in-process nodes, each with its
//! peer channel, wired to each other as peers. Checks delta push, `w` waits,
//! harvest reads with a node down, read repair, anti-entropy, and that bad peer
//! input is refused and counted while the node keeps serving.

use calmkv::replication::cluster::{Cluster, ClusterError, WriteQuorum};
use calmkv::replication::frame::{encode_frame, ClusterSecret};
use calmkv::replication::handshake::Hello;
use calmkv::replication::harvest::Consistency;
use calmkv::replication::message::PeerMessage;
use calmkv::replication::outbox::OUTBOX_BYTES_MAX;
use calmkv::replication::peer::{Peer, PeerChannel};
use calmkv::{Action, Config, CounterOp, CrdtOp, Key, Limits, Node, Op, TypedValue};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(10);

struct TestNode {
    cluster: Arc<Cluster>,
    addr: SocketAddr,
    serve: Option<JoinHandle<()>>,
}

impl TestNode {
    async fn start(secret: Option<ClusterSecret>) -> TestNode {
        let node = Arc::new(Config::in_memory().open_node().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let channel = PeerChannel::new(node, secret, OUTBOX_BYTES_MAX);
        let serve = tokio::spawn(channel.clone().serve(listener));
        TestNode { cluster: Arc::new(Cluster::new(channel)), addr, serve: Some(serve) }
    }

    fn node(&self) -> &Arc<Node> {
        self.cluster.channel().node()
    }

    fn peer(&self) -> Peer {
        Peer { id: self.node().id(), addr: self.addr }
    }

    /// Stops accepting peer traffic (as if the node were down); its state stays.
    fn stop_listening(&mut self) {
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
    }

    async fn listen_again(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve = Some(tokio::spawn(self.cluster.channel().clone().serve(listener)));
    }

    fn counter(&self, key: &str) -> Option<i128> {
        let read = self.node().read(&k(key)).unwrap()?;
        read.values.iter().find_map(|v| match v {
            TypedValue::Counter(n) => Some(*n),
            _ => None,
        })
    }
}

async fn cluster(n: usize, secret: Option<ClusterSecret>) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(TestNode::start(secret.clone()).await);
    }
    let peers: Vec<Peer> = nodes.iter().map(TestNode::peer).collect();
    for node in &nodes {
        node.cluster.channel().set_peers(peers.clone());
    }
    nodes
}

fn k(key: &str) -> Key {
    Key::new(key, &Limits::default()).unwrap()
}

fn incr(key: &str, n: u64) -> Op {
    Op { key: k(key), action: Action::Crdt(CrdtOp::Counter(CounterOp::Incr(n))) }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_node_reaches_the_others() {
    let nodes = cluster(3, None).await;
    nodes[0].cluster.write(incr("visits", 5), WriteQuorum::One, DEADLINE).await.unwrap();
    nodes[2].cluster.write(incr("visits", 2), WriteQuorum::One, DEADLINE).await.unwrap();
    eventually("every node counts 7", || nodes.iter().all(|n| n.counter("visits") == Some(7)))
        .await;
    let top = nodes[0].node().digest().top();
    assert!(nodes.iter().all(|n| n.node().digest().top() == top));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w_all_waits_for_every_replica_and_says_when_one_is_missing() {
    let mut nodes = cluster(3, None).await;
    let applied = nodes[0].cluster.write(incr("c", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    // Acknowledged by all means stored by all: no waiting needed.
    assert!(nodes.iter().all(|n| n.counter("c") == Some(1)), "{applied:?}");
    nodes[2].stop_listening();
    let short = Duration::from_millis(300);
    let refused = nodes[0].cluster.write(incr("c", 1), WriteQuorum::All, short).await;
    assert!(
        matches!(refused, Err(ClusterError::InsufficientAcks { acked: 2, wanted: 3 })),
        "{refused:?}"
    );
    assert_eq!(nodes[0].counter("c"), Some(2), "the write is applied locally anyway");
    nodes[0].cluster.write(incr("c", 1), WriteQuorum::Quorum, DEADLINE).await.unwrap();
    // Deltas written into the broken connection are lost; once the node is
    // back, anti-entropy brings it up to date.
    nodes[2].listen_again().await;
    eventually("the returning node catches up", || {
        nodes[0].cluster.anti_entropy_round();
        nodes[2].counter("c") == Some(3)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_reports_its_harvest_and_refuses_below_min_harvest() {
    let mut nodes = cluster(3, None).await;
    nodes[0].cluster.write(incr("h", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    let all = nodes[1].cluster.read(&k("h"), Consistency::All, DEADLINE, 1.0).await.unwrap();
    assert_eq!((all.harvest.answered, all.harvest.replicas), (3, 3));
    nodes[2].stop_listening();
    // Node 2 no longer answers: a quorum read still succeeds with harvest 2/3.
    let short = Duration::from_millis(300);
    let quorum = nodes[1].cluster.read(&k("h"), Consistency::Quorum, short, 0.0).await.unwrap();
    assert_eq!(quorum.harvest.header(), "0.67");
    assert_eq!(quorum.harvest.replicas_header(), "2/3");
    let refused = nodes[1].cluster.read(&k("h"), Consistency::Quorum, short, 0.9).await;
    assert!(matches!(refused, Err(ClusterError::InsufficientHarvest { .. })), "{refused:?}");
    let refused = nodes[1].cluster.read(&k("h"), Consistency::All, short, 0.0).await;
    assert!(matches!(refused, Err(ClusterError::InsufficientHarvest { .. })), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_read_repairs_a_stale_replica() {
    let nodes = cluster(3, None).await;
    // A write applied on node 0 alone, as if its deltas had been lost.
    nodes[0].node().apply(&incr("r", 4)).unwrap();
    let read = nodes[1].cluster.read(&k("r"), Consistency::All, DEADLINE, 1.0).await.unwrap();
    assert_eq!(read.state.value.counter().value(), 4);
    eventually("both stale replicas are repaired", || {
        nodes[1].counter("r") == Some(4) && nodes[2].counter("r") == Some(4)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_repairs_writes_whose_deltas_were_lost() {
    let nodes = cluster(3, None).await;
    for i in 0..50 {
        nodes[i % 3].node().apply(&incr(&format!("ae/{i}"), 1)).unwrap();
    }
    eventually("anti-entropy makes every digest equal", || {
        for n in &nodes {
            n.cluster.anti_entropy_round();
        }
        let top = nodes[0].node().digest().top();
        nodes.iter().all(|n| n.node().digest().top() == top)
    })
    .await;
    assert!(nodes.iter().all(|n| n.counter("ae/49") == Some(1)));
    let repaired: u64 = nodes
        .iter()
        .map(|n| n.cluster.channel().metrics().keys_repaired.load(Ordering::Relaxed))
        .sum();
    assert!(repaired >= 100, "each of 50 keys was missing on two nodes; repaired {repaired}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_frames_are_refused_and_counted_while_the_node_keeps_serving() {
    let secret = ClusterSecret::new(*b"the cluster secret for the tests").unwrap();
    let nodes = cluster(2, Some(secret)).await;
    let target = &nodes[0];
    let refused = || {
        let metrics = target.cluster.channel().metrics();
        let handshakes: u64 = metrics.handshakes_refused().iter().map(|(_, n)| n).sum();
        handshakes + metrics.frames_refused.load(Ordering::Relaxed)
    };
    let wrong = ClusterSecret::new(*b"some other secret, not the right").unwrap();
    let deltas = PeerMessage::Deltas { deltas: vec![], ack: None };
    let mut claimed = Hello::new(calmkv_crdts::NodeId(99), true).encode().to_vec();
    claimed.extend_from_slice(&[0u8; 32]); // a proof made without the secret
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x00\x00\x05hello".to_vec()),
        ("oversized length", u32::MAX.to_be_bytes().to_vec()),
        ("truncated hello", b"CKVP\x02".to_vec()),
        ("a frame instead of a handshake", encode_frame(&deltas, None).unwrap()),
        ("a frame tagged with another secret", encode_frame(&deltas, Some(&wrong)).unwrap()),
        ("a hello claiming an id, with a forged proof", claimed),
    ];
    for (i, (what, bytes)) in attacks.into_iter().enumerate() {
        let mut stream = TcpStream::connect(target.addr).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        stream.shutdown().await.unwrap();
        eventually(what, || refused() == i as u64 + 1).await;
    }
    // Authenticated traffic still flows.
    nodes[1].cluster.write(incr("ok", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    assert_eq!(target.counter("ok"), Some(1));
}
