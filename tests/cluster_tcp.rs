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
use calmkv::replication::peer::{Peer, PeerChannel, PeerSettings};
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
        TestNode::start_with(secret, PeerSettings::default()).await
    }

    async fn start_with(secret: Option<ClusterSecret>, settings: PeerSettings) -> TestNode {
        let node = Arc::new(Config::in_memory().open_node().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let channel = PeerChannel::with_settings(node, secret, OUTBOX_BYTES_MAX, settings);
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
    let all = nodes[1].cluster.read(&k("h"), Consistency::All, DEADLINE, Some(1.0)).await.unwrap();
    assert_eq!((all.harvest.answered, all.harvest.replicas), (3, 3));
    nodes[2].stop_listening();
    // Node 2 no longer answers: a quorum read still succeeds with harvest 2/3.
    let short = Duration::from_millis(300);
    let quorum = nodes[1].cluster.read(&k("h"), Consistency::Quorum, short, None).await.unwrap();
    assert_eq!(quorum.harvest.header(), "0.67");
    assert_eq!(quorum.harvest.replicas_header(), "2/3");
    let refused = nodes[1].cluster.read(&k("h"), Consistency::Quorum, short, Some(0.9)).await;
    assert!(matches!(refused, Err(ClusterError::InsufficientHarvest { .. })), "{refused:?}");
    let refused = nodes[1].cluster.read(&k("h"), Consistency::All, short, None).await;
    assert!(matches!(refused, Err(ClusterError::InsufficientHarvest { .. })), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_read_repairs_a_stale_replica() {
    let nodes = cluster(3, None).await;
    // A write applied on node 0 alone, as if its deltas had been lost.
    nodes[0].node().apply(&incr("r", 4)).unwrap();
    let read = nodes[1].cluster.read(&k("r"), Consistency::All, DEADLINE, None).await.unwrap();
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
        ("truncated hello", b"CKVP\x05".to_vec()),
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

/// A TCP proxy on loopback whose open connections can be frozen: they stop
/// forwarding in both directions but stay open, as a connection does whose
/// path went away (a cut, a dead switch) without either end closing it.
/// Connections opened after a freeze are forwarded normally.
struct StallingProxy {
    addr: SocketAddr,
    frozen: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
    task: JoinHandle<()>,
}

impl StallingProxy {
    async fn start(target: SocketAddr) -> StallingProxy {
        use std::sync::atomic::AtomicBool;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let task = tokio::spawn({
            let frozen = frozen.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else { return };
                    let Ok(server) = TcpStream::connect(target).await else { continue };
                    let flag = Arc::new(AtomicBool::new(false));
                    frozen.lock().unwrap().push(flag.clone());
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, flag.clone()));
                    tokio::spawn(pump(server_read, client_write, flag));
                }
            }
        });
        StallingProxy { addr, frozen, task }
    }

    /// Freezes every connection open now.
    fn freeze(&self) -> usize {
        let frozen = self.frozen.lock().unwrap();
        for flag in frozen.iter() {
            flag.store(true, Ordering::SeqCst);
        }
        frozen.len()
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes until `frozen`, then holds both ends open forever.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::AsyncReadExt;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            () = wait_until_frozen(&frozen) => break,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) || to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    // Frozen: neither forward nor close, until the test ends.
    std::future::pending::<()>().await;
    drop((from, to));
}

async fn wait_until_frozen(frozen: &std::sync::atomic::AtomicBool) {
    while !frozen.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A connection that stops carrying bytes without closing is noticed by its
/// heartbeat, dropped and dialed again; the new connection opens with an
/// anti-entropy round, so a write that went into the stalled connection
/// reaches the peer soon after — with no periodic anti-entropy running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_is_detected_redialed_and_repaired() {
    let settings = PeerSettings {
        heartbeat_interval: Duration::from_millis(50),
        heartbeat_timeout: Duration::from_millis(300),
        ..PeerSettings::default()
    };
    let a = TestNode::start_with(None, settings).await;
    let b = TestNode::start_with(None, settings).await;
    let proxy = StallingProxy::start(b.addr).await;
    // a reaches b only through the proxy; b reaches a directly.
    a.cluster.channel().set_peers(vec![Peer { id: b.node().id(), addr: proxy.addr }]);
    b.cluster.channel().set_peers(vec![a.peer()]);
    a.cluster.write(incr("s", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    assert_eq!(b.counter("s"), Some(1));
    let connects = a.cluster.channel().metrics().connects.load(Ordering::Relaxed);

    assert_eq!(proxy.freeze(), 1, "one connection from a to b through the proxy");
    let started = tokio::time::Instant::now();
    // Sent into the frozen connection: lost with it.
    a.cluster.write(incr("s", 1), WriteQuorum::One, DEADLINE).await.unwrap();
    eventually("b sees the write made while the connection was stalled", || {
        b.counter("s") == Some(2)
    })
    .await;
    let took = started.elapsed();
    let metrics = a.cluster.channel().metrics();
    assert!(metrics.connections_stalled.load(Ordering::Relaxed) >= 1);
    assert!(metrics.connects.load(Ordering::Relaxed) > connects, "a dialed b again");
    assert!(took < Duration::from_secs(3), "noticed and repaired in {took:?}");
    // And the new connection carries deltas again, without anti-entropy.
    a.cluster.write(incr("s", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    assert_eq!(b.counter("s"), Some(3));
}

/// Without heartbeats from the dialer, an accepted connection is closed after
/// the heartbeat timeout; the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_connection_that_falls_silent_is_closed() {
    let settings = PeerSettings {
        heartbeat_interval: Duration::from_millis(50),
        heartbeat_timeout: Duration::from_millis(300),
        ..PeerSettings::default()
    };
    let target = TestNode::start_with(None, settings).await;
    let mut stream = TcpStream::connect(target.addr).await.unwrap();
    let own = calmkv_crdts::NodeId(77);
    calmkv::replication::handshake::dial(&mut stream, None, own, None, DEADLINE).await.unwrap();
    let metrics = target.cluster.channel().metrics();
    eventually("the silent connection is counted and closed", || {
        metrics.connections_stalled.load(Ordering::Relaxed) == 1
            && metrics.inbound_connections.load(Ordering::Relaxed) == 0
    })
    .await;
    let mut byte = [0u8; 1];
    let read =
        tokio::time::timeout(DEADLINE, tokio::io::AsyncReadExt::read(&mut stream, &mut byte));
    assert_eq!(read.await.unwrap().unwrap(), 0, "closed by the acceptor");
}

/// With one replica unreachable, `one` and `quorum` answer as soon as their
/// level is met instead of waiting out the deadline; `all` waits it out and
/// refuses, saying what it gathered; `all&min_harvest=0.5` answers with the
/// two replicas that arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answer_as_soon_as_their_level_is_met_with_a_replica_unreachable() {
    let mut nodes = cluster(3, None).await;
    nodes[0].cluster.write(incr("f", 3), WriteQuorum::All, DEADLINE).await.unwrap();
    nodes[2].stop_listening();
    let long = Duration::from_secs(5);
    for (consistency, answered) in [(Consistency::One, 1), (Consistency::Quorum, 2)] {
        let started = tokio::time::Instant::now();
        let read = nodes[1].cluster.read(&k("f"), consistency, long, None).await.unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{consistency:?} took {took:?} of {long:?}");
        assert_eq!(read.harvest.answered, answered, "{consistency:?}");
        assert_eq!(read.state.value.counter().value(), 3);
    }
    let short = Duration::from_millis(300);
    let started = tokio::time::Instant::now();
    let refused = nodes[1].cluster.read(&k("f"), Consistency::All, short, None).await;
    assert!(started.elapsed() >= short, "all waits for every replica or the deadline");
    match refused {
        Err(ClusterError::InsufficientHarvest { harvest }) => {
            assert_eq!(harvest.replicas_header(), "2/3")
        }
        other => panic!("{other:?}"),
    }
    let half = nodes[1].cluster.read(&k("f"), Consistency::All, short, Some(0.5)).await.unwrap();
    assert_eq!(half.harvest.replicas_header(), "2/3");
    let refused = nodes[1].cluster.read(&k("f"), Consistency::All, short, Some(0.9)).await;
    assert!(matches!(refused, Err(ClusterError::InsufficientHarvest { .. })), "{refused:?}");
}

/// `w=quorum` is acknowledged as soon as a majority stored the write, not at
/// the deadline, when one replica is unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_write_is_acknowledged_at_the_majority_with_a_replica_unreachable() {
    let mut nodes = cluster(3, None).await;
    nodes[2].stop_listening();
    let long = Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    nodes[0].cluster.write(incr("q", 1), WriteQuorum::Quorum, long).await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?} of {long:?}");
    assert_eq!(nodes[1].counter("q"), Some(1), "acknowledged means stored");
}

fn put(key: &str, value: Vec<u8>) -> Op {
    Op { key: k(key), action: Action::Put { value: value.into(), context: None, if_absent: false } }
}

/// A key whose state is twice a frame (8 siblings of 1 MiB) replicates to a
/// node that joins later, in parts, without holding up the 300 small keys
/// beside it, and reads at `consistency=all`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_larger_than_a_frame_replicates_to_a_new_node_without_holding_up_the_others() {
    a_large_key_replicates_to_a_new_node(8).await;
}

/// The same with 64 siblings of 1 MiB, the largest register the limits allow
/// (sixteen frames). Building that state takes most of a minute in a debug
/// build, so it runs on demand: `cargo test --test cluster_tcp -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about a minute in a debug build; run with --ignored"]
async fn a_64_mib_key_replicates_to_a_new_node_without_holding_up_the_others() {
    a_large_key_replicates_to_a_new_node(64).await;
}

async fn a_large_key_replicates_to_a_new_node(siblings_wanted: usize) {
    let old = TestNode::start(None).await;
    for i in 0..siblings_wanted as u8 {
        old.node().apply(&put("big", vec![i; 1 << 20])).unwrap(); // no context: a sibling
    }
    for i in 0..300 {
        old.node().apply(&incr(&format!("small/{i}"), 1)).unwrap();
    }
    let siblings = |node: &Node| match node.read(&k("big")).unwrap() {
        Some(read) => match read.values.as_slice() {
            [TypedValue::Register(values)] => values.len(),
            _ => 0,
        },
        None => 0,
    };
    assert_eq!(siblings(old.node()), siblings_wanted);
    let new = TestNode::start(None).await;
    new.cluster.channel().set_peers(vec![old.peer()]);
    old.cluster.channel().set_peers(vec![new.peer()]);
    let small_held = |node: &TestNode| {
        (0..300).filter(|i| node.counter(&format!("small/{i}")) == Some(1)).count()
    };
    // Rounds at a modest pace: each may carry the large state again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while old.node().digest().top() != new.node().digest().top() {
        assert!(tokio::time::Instant::now() < deadline, "the new node never caught up");
        new.cluster.anti_entropy_round();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(small_held(&new), 300);
    assert_eq!(siblings(new.node()), siblings_wanted);
    // The old node's reply is larger than a frame too.
    let read = new.cluster.read(&k("big"), Consistency::All, DEADLINE, None).await.unwrap();
    assert_eq!(read.harvest.replicas_header(), "2/2");
    assert_eq!(read.state.value.register().values().count(), siblings_wanted);
    let metrics = new.cluster.channel().metrics();
    assert_eq!(metrics.frames_refused.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.assembly_bytes.load(Ordering::Relaxed), 0, "nothing left half-joined");
}

/// While a peer cannot be reached, a hundred writes of one key wait in its
/// outbox as one delta; once it is back, it converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_one_key_wait_for_an_unreachable_peer_as_one_delta() {
    let mut nodes = cluster(2, None).await;
    nodes[0].cluster.write(incr("hot", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    nodes[1].stop_listening();
    let channel = nodes[0].cluster.channel();
    let outbox = |channel: &Arc<PeerChannel>| channel.outbox_bytes()[0].1;
    // Anything already in flight drains into the closing connection first.
    eventually("the outbox is empty", || outbox(channel) == 0).await;
    let before = channel.metrics().deltas_coalesced.load(Ordering::Relaxed);
    for _ in 0..100 {
        nodes[0].cluster.write(incr("hot", 1), WriteQuorum::One, DEADLINE).await.unwrap();
    }
    let coalesced = channel.metrics().deltas_coalesced.load(Ordering::Relaxed) - before;
    assert!(coalesced >= 90, "{coalesced} of 100 writes joined a waiting delta");
    // One counter delta, perhaps beside an anti-entropy reply that was on its
    // way when the peer went: far less than a hundred deltas (~15 KB).
    assert!(outbox(channel) < 4096, "one small delta waits: {} bytes", outbox(channel));
    nodes[1].listen_again().await;
    eventually("the peer counts every write", || nodes[1].counter("hot") == Some(101)).await;
}

/// A node that joins empty beside 3,000 keys is repaired by rounds that follow
/// each other while they repair something — no periodic round runs here, only
/// the one each new connection opens with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_behind_node_is_repaired_by_chained_rounds_without_the_periodic_one() {
    let old = TestNode::start(None).await;
    for i in 0..3000 {
        old.node().apply(&incr(&format!("many/{i}"), 1)).unwrap();
    }
    let new = TestNode::start(None).await;
    let started = tokio::time::Instant::now();
    new.cluster.channel().set_peers(vec![old.peer()]);
    old.cluster.channel().set_peers(vec![new.peer()]);
    let deadline = started + Duration::from_secs(30);
    while old.node().digest().top() != new.node().digest().top() {
        assert!(tokio::time::Instant::now() < deadline, "the new node never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let repaired = new.cluster.channel().metrics().keys_repaired.load(Ordering::Relaxed);
    assert_eq!(repaired, 3000);
    eprintln!("3000 keys repaired in {took:?} ({:.0} keys/s)", 3000.0 / took.as_secs_f64());
}

/// A store whose writes can be made slow, as a disk that takes its time.
struct SlowStore {
    inner: calmkv::store::MemoryStore,
    apply_delay_ms: std::sync::atomic::AtomicU64,
}

impl calmkv::store::Store for SlowStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, calmkv::store::StoreError> {
        self.inner.get(key)
    }
    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<calmkv::store::Entry>, calmkv::store::StoreError> {
        self.inner.scan_prefix(prefix, start_after, limit)
    }
    fn apply(&self, batch: calmkv::store::Batch) -> Result<(), calmkv::store::StoreError> {
        let delay = self.apply_delay_ms.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(delay));
        self.inner.apply(batch)
    }
    fn flush(&self) -> Result<(), calmkv::store::StoreError> {
        self.inner.flush()
    }
    fn stats(&self) -> Result<calmkv::store::StoreStats, calmkv::store::StoreError> {
        self.inner.stats()
    }
}

/// A replica whose merge takes longer than the heartbeat timeout keeps its
/// connection: while busy with a frame it still answers once per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_slow_to_merge_is_not_taken_for_dead() {
    let settings = PeerSettings {
        heartbeat_interval: Duration::from_millis(50),
        heartbeat_timeout: Duration::from_millis(300),
        ..PeerSettings::default()
    };
    let a = TestNode::start_with(None, settings).await;
    let store = Arc::new(SlowStore {
        inner: calmkv::store::MemoryStore::new(),
        apply_delay_ms: std::sync::atomic::AtomicU64::new(0),
    });
    let node = Node::open(calmkv_crdts::NodeId(0xb), store.clone(), Limits::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = listener.local_addr().unwrap();
    let b = PeerChannel::with_settings(Arc::new(node), None, OUTBOX_BYTES_MAX, settings);
    let _serve = tokio::spawn(b.clone().serve(listener));
    a.cluster.channel().set_peers(vec![Peer { id: b.node().id(), addr: b_addr }]);
    b.set_peers(vec![a.peer()]);
    a.cluster.write(incr("slow", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    let metrics = a.cluster.channel().metrics();
    let connects = metrics.connects.load(Ordering::Relaxed);

    store.apply_delay_ms.store(1000, Ordering::SeqCst); // over three heartbeat timeouts
    a.cluster.write(incr("slow", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    assert_eq!(metrics.connections_stalled.load(Ordering::Relaxed), 0, "not taken for dead");
    assert_eq!(metrics.connects.load(Ordering::Relaxed), connects, "the same connection");
}

/// What membership does for a member that comes back: `redial` drops the
/// connection at once — here a frozen one that heartbeats would only notice
/// after a minute — dials again, and the new connection's anti-entropy round
/// brings the member the write it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redialed_peer_gets_a_fresh_connection_and_a_repair_round() {
    let settings = PeerSettings {
        heartbeat_interval: Duration::from_secs(20),
        heartbeat_timeout: Duration::from_secs(60),
        ..PeerSettings::default()
    };
    let a = TestNode::start_with(None, settings).await;
    let b = TestNode::start_with(None, settings).await;
    let proxy = StallingProxy::start(b.addr).await;
    a.cluster.channel().set_peers(vec![Peer { id: b.node().id(), addr: proxy.addr }]);
    b.cluster.channel().set_peers(vec![a.peer()]);
    a.cluster.write(incr("back", 1), WriteQuorum::All, DEADLINE).await.unwrap();
    assert_eq!(proxy.freeze(), 1);
    a.cluster.write(incr("back", 1), WriteQuorum::One, DEADLINE).await.unwrap();
    let connects = a.cluster.channel().metrics().connects.load(Ordering::Relaxed);
    assert!(a.cluster.channel().redial(b.node().id()));
    assert!(!a.cluster.channel().redial(calmkv_crdts::NodeId(12345)), "an unknown peer");
    eventually("b has the write that went into the frozen connection", || {
        b.counter("back") == Some(2)
    })
    .await;
    assert_eq!(a.cluster.channel().metrics().connects.load(Ordering::Relaxed), connects + 1);
    assert_eq!(a.cluster.channel().metrics().connections_stalled.load(Ordering::Relaxed), 0);
}
