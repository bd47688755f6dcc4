//! The peer channel's trust boundary, attacked over real loopback TCP.
//!
//! - A sender's identity is proved, never claimed: a `Deltas` frame from a
//!   connection that did not prove the cluster secret changes nothing.
//! - Connections that announce huge frames before authenticating make the node
//!   hold nothing (asserted on the buffered-bytes gauge, not on RSS).
//! - Idle strangers neither crowd out a real peer nor stay forever.

use calmkv::replication::cluster::{Cluster, WriteQuorum};
use calmkv::replication::frame::{encode_body, encode_frame, ClusterSecret};
use calmkv::replication::handshake::{self, Hello, RefusalKind, HELLO_BYTES};
use calmkv::replication::message::PeerMessage;
use calmkv::replication::outbox::OUTBOX_BYTES_MAX;
use calmkv::replication::peer::{Peer, PeerChannel, PeerSettings};
use calmkv::{Action, Config, CounterOp, CrdtOp, Envelope, Key, Limits, Node, Op, TypedValue};
use calmkv_crdts::NodeId;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(20);
const MIB4: u32 = 4 * 1024 * 1024;

fn secret() -> ClusterSecret {
    ClusterSecret::new(*b"the cluster secret for the tests").unwrap()
}

struct TestNode {
    cluster: Arc<Cluster>,
    addr: SocketAddr,
    _serve: JoinHandle<()>,
}

impl TestNode {
    async fn start(secret: Option<ClusterSecret>, settings: PeerSettings) -> TestNode {
        let node = Arc::new(Config::in_memory().open_node().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let channel = PeerChannel::with_settings(node, secret, OUTBOX_BYTES_MAX, settings);
        let serve = tokio::spawn(channel.clone().serve(listener));
        TestNode { cluster: Arc::new(Cluster::new(channel)), addr, _serve: serve }
    }

    fn node(&self) -> &Arc<Node> {
        self.cluster.channel().node()
    }

    fn peer(&self) -> Peer {
        Peer { id: self.node().id(), addr: self.addr }
    }

    fn counter(&self, key: &str) -> Option<i128> {
        let read = self.node().read(&k(key)).unwrap()?;
        read.values.iter().find_map(|v| match v {
            TypedValue::Counter(n) => Some(*n),
            _ => None,
        })
    }

    fn refused(&self, kind: RefusalKind) -> u64 {
        self.cluster.channel().metrics().handshakes_refused_of(kind)
    }

    fn buffered(&self) -> u64 {
        self.cluster.channel().metrics().inbound_buffered_bytes.load(Ordering::Relaxed)
    }
}

fn k(key: &str) -> Key {
    Key::new(key, &Limits::default()).unwrap()
}

fn incr(key: &str, n: u64) -> Op {
    Op { key: k(key), action: Action::Crdt(CrdtOp::Counter(CounterOp::Incr(n))) }
}

/// The delta of `incr(key, n)` as some node would send it.
fn forged_delta(key: &str, n: u64) -> Envelope {
    let elsewhere = Config::in_memory().open_node().unwrap();
    elsewhere.apply(&incr(key, n)).unwrap().delta
}

fn deltas(key: &str) -> PeerMessage {
    PeerMessage::Deltas { deltas: vec![(key.to_string(), forged_delta(key, 1000))], ack: None }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the node closes `stream` (EOF or reset), within the deadline.
async fn closed_by_node(stream: &mut TcpStream) {
    let mut sink = [0u8; 256];
    let read_to_end = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, read_to_end).await.expect("the node closes the connection");
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_from_a_connection_that_did_not_prove_the_secret_change_nothing() {
    let target = TestNode::start(Some(secret()), PeerSettings::default()).await;
    let key = "account/alice";
    // 1. The old attack: a Hello frame claiming any sender, then Deltas.
    let mut old = encode_frame(&deltas(key), None).unwrap();
    old.extend(encode_frame(&deltas(key), None).unwrap());
    // 2. A handshake that claims an id with a made-up proof, then a Deltas frame.
    let mut forged = Hello::new(NodeId(7), true).encode().to_vec();
    forged.extend_from_slice(&[0u8; 32]);
    forged.extend(frame(encode_body(&deltas(key)).unwrap()));
    // 3. A handshake saying "no secret", then a Deltas frame.
    let mut plain = Hello::new(NodeId(7), false).encode().to_vec();
    plain.extend_from_slice(&[0u8; 32]);
    plain.extend(frame(encode_body(&deltas(key)).unwrap()));
    for (what, bytes) in [("old hello", old), ("forged proof", forged), ("no secret", plain)] {
        let mut stream = TcpStream::connect(target.addr).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        closed_by_node(&mut stream).await;
        assert_eq!(target.counter(key), None, "{what}: the forged delta was merged");
    }
    // 4. A node that runs the real handshake with another secret.
    let wrong = ClusterSecret::new(*b"some other secret, not the right").unwrap();
    let mut stream = TcpStream::connect(target.addr).await.unwrap();
    let dialed = handshake::dial(&mut stream, Some(&wrong), NodeId(7), None, DEADLINE).await;
    assert_eq!(dialed.unwrap_err().kind(), RefusalKind::WrongSecret);
    let _ = stream.write_all(&frame(encode_body(&deltas(key)).unwrap())).await;
    closed_by_node(&mut stream).await;
    eventually("the wrong secret is counted", || target.refused(RefusalKind::WrongSecret) >= 2)
        .await;
    assert!(target.refused(RefusalKind::Malformed) >= 1, "the old hello is not a handshake");
    assert!(target.refused(RefusalKind::SecretMismatch) >= 1);
    assert_eq!(target.counter(key), None);
    assert_eq!(target.cluster.channel().metrics().deltas_applied.load(Ordering::Relaxed), 0);

    // The control: a peer that proves the secret is heard.
    let friend = TestNode::start(Some(secret()), PeerSettings::default()).await;
    friend.cluster.channel().set_peers(vec![target.peer()]);
    target.cluster.channel().set_peers(vec![friend.peer()]);
    friend.cluster.write(incr(key, 5), WriteQuorum::All, DEADLINE).await.unwrap();
    assert_eq!(target.counter(key), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_announcing_4_mib_frames_before_authenticating_pin_no_memory() {
    let target = TestNode::start(Some(secret()), PeerSettings::default()).await;
    let mut streams = Vec::new();
    for i in 0..100 {
        let mut stream = TcpStream::connect(target.addr).await.unwrap();
        let mut bytes = Vec::new();
        if i % 2 == 0 {
            // A hello, then a 4 MiB frame where the proof should be.
            bytes.extend_from_slice(&Hello::new(NodeId(1000 + i), true).encode());
        }
        bytes.extend_from_slice(&MIB4.to_be_bytes());
        bytes.extend_from_slice(&[7u8; 1024]);
        stream.write_all(&bytes).await.unwrap();
        streams.push(stream);
    }
    let refused =
        || target.refused(RefusalKind::WrongSecret) + target.refused(RefusalKind::Malformed);
    eventually("every announcing connection is refused", || refused() == 100).await;
    assert_eq!(target.buffered(), 0, "nothing was buffered for strangers");
    for stream in &mut streams {
        closed_by_node(stream).await;
    }
    assert_eq!(
        target.cluster.channel().metrics().inbound_buffered_bytes.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_frame_holds_only_what_arrived() {
    // Without a secret (loopback only) a connection can pass the handshake;
    // a frame it announces still costs only the bytes it really sends.
    let target = TestNode::start(None, PeerSettings::default()).await;
    let connections = 50u64;
    let mut streams = Vec::new();
    for i in 0..connections {
        let mut stream = TcpStream::connect(target.addr).await.unwrap();
        handshake::dial(&mut stream, None, NodeId(1000 + i), None, DEADLINE).await.unwrap();
        let mut bytes = MIB4.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1u8; 1024]);
        stream.write_all(&bytes).await.unwrap();
        streams.push(stream);
    }
    eventually("every connection's kilobyte is buffered", || {
        target.buffered() >= connections * 1024
    })
    .await;
    let held = target.buffered();
    assert!(
        held <= connections * 64 * 1024,
        "{held} bytes held for {connections} connections that sent 1 KiB each"
    );
    assert!(held < u64::from(MIB4), "far below even one announced frame");
    drop(streams);
    eventually("closed connections release their buffers", || target.buffered() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_idle_connections_do_not_lock_out_a_real_peer() {
    // A long handshake timeout: only the separate, evicting pool of handshake
    // slots keeps the real peer's connection from being refused.
    let settings = PeerSettings {
        handshake_timeout: Duration::from_secs(120),
        handshakes_max: 64,
        inbound_connections_max: 256,
        ..PeerSettings::default()
    };
    let target = TestNode::start(Some(secret()), settings).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(target.addr).await.unwrap());
    }
    eventually("strangers beyond the pool are evicted", || {
        target.refused(RefusalKind::Evicted) >= 300 - 64
    })
    .await;
    let friend = TestNode::start(Some(secret()), PeerSettings::default()).await;
    friend.cluster.channel().set_peers(vec![target.peer()]);
    target.cluster.channel().set_peers(vec![friend.peer()]);
    friend.cluster.write(incr("k", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    assert_eq!(target.counter("k"), Some(1));
    let pending = target.cluster.channel().metrics().handshakes_pending.load(Ordering::Relaxed);
    assert!(pending <= 64, "{pending} handshakes pending, bound 64");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stranger_is_closed_at_the_handshake_deadline() {
    let settings =
        PeerSettings { handshake_timeout: Duration::from_millis(200), ..PeerSettings::default() };
    let target = TestNode::start(Some(secret()), settings).await;
    let mut idle = TcpStream::connect(target.addr).await.unwrap();
    // Half a hello, then silence.
    idle.write_all(&Hello::new(NodeId(5), true).encode()[..HELLO_BYTES / 2]).await.unwrap();
    closed_by_node(&mut idle).await;
    assert_eq!(target.refused(RefusalKind::Timeout), 1);
}

/// The state of a map nested `depth` levels deep, built with `execute` (which,
/// unlike a node's write path, does not check the depth), as a buggy or
/// hostile peer would send it.
fn nested_map_state(depth: usize) -> Envelope {
    std::thread::Builder::new()
        .stack_size(256 * 1024 * 1024)
        .spawn(move || {
            let mut op = CrdtOp::Counter(CounterOp::Incr(1));
            for _ in 0..depth {
                let update = std::collections::BTreeMap::from([("f".to_string(), op)]);
                op = CrdtOp::Map(calmkv::MapOp { update, remove: vec![] });
            }
            let op = Op { key: k("deep"), action: Action::Crdt(op) };
            let mut state = Envelope::default();
            let now = calmkv_crdts::Hlc::default();
            calmkv::node::execute(&mut state, &op, NodeId(7), now, &Limits::default()).unwrap()
        })
        .unwrap()
        .join()
        .unwrap()
}

fn frames_refused(node: &TestNode) -> u64 {
    node.cluster.channel().metrics().frames_refused.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_nested_past_the_depth_limit_is_refused_and_counted_and_the_rest_lands() {
    let target = TestNode::start(Some(secret()), PeerSettings::default()).await;
    let sender = TestNode::start(Some(secret()), PeerSettings::default()).await;
    sender.cluster.channel().set_peers(vec![target.peer()]);
    target.cluster.channel().set_peers(vec![sender.peer()]);
    let depth = Limits::MAP_DEPTH_MAX + 12; // decodes, but deeper than a write may nest
    let message = PeerMessage::Deltas {
        deltas: vec![
            ("deep".to_string(), nested_map_state(depth)),
            ("fine".to_string(), forged_delta("fine", 3)),
        ],
        ack: None,
    };
    assert!(sender.cluster.channel().send(target.node().id(), &message));
    eventually("the legal delta of the same frame lands", || target.counter("fine") == Some(3))
        .await;
    let metrics = target.cluster.channel().metrics();
    assert_eq!(metrics.states_refused.load(Ordering::Relaxed), 1);
    assert_eq!(target.node().read(&k("deep")).unwrap(), None, "the deep map was not stored");
    let exposed = metrics.exposition();
    let refused =
        exposed.iter().find(|(name, _, _)| *name == "calmkv_replication_states_refused_total");
    assert_eq!(refused.map(|(_, _, v)| *v), Some(1.0), "counted in /metrics");
    assert_eq!(frames_refused(&target), 0, "the frame itself was fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_505_level_nested_map_is_refused_without_harm() {
    // Too deep to decode at all: the frame is refused (before, decoding it
    // recursed 505 levels and could overflow the stack), the key is not
    // stored, and the peer reconnects and is heard again.
    let target = TestNode::start(Some(secret()), PeerSettings::default()).await;
    let sender = TestNode::start(Some(secret()), PeerSettings::default()).await;
    sender.cluster.channel().set_peers(vec![target.peer()]);
    target.cluster.channel().set_peers(vec![sender.peer()]);
    let message = PeerMessage::Deltas {
        deltas: vec![("deep".to_string(), nested_map_state(505))],
        ack: None,
    };
    assert!(sender.cluster.channel().send(target.node().id(), &message));
    eventually("the frame is refused", || frames_refused(&target) == 1).await;
    assert_eq!(target.node().read(&k("deep")).unwrap(), None);
    let connects = || sender.cluster.channel().metrics().connects.load(Ordering::Relaxed);
    eventually("the sender notices the closed connection and reconnects", || connects() == 2).await;
    sender.cluster.write(incr("after", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    assert_eq!(target.counter("after"), Some(1));
}
