//! Cluster benchmarks: whole calmkv nodes in one process on 127.0.0.1, bounded
//! in count and in time. Sections (`--only` picks some):
//!
//! 1. `propagation`: nodes joined by gossip, periodic anti-entropy off. Node 1
//!    takes a register write (`w=1`); the clock starts when the write is
//!    acknowledged and stops when a watcher thread, polling every other node's
//!    store in a tight loop, has seen the key on each of them. One write in
//!    flight at a time; p50/p99/p999/max for the first replica and for all.
//! 2. `bytes`: 3 nodes joined by gossip, default anti-entropy period. Windows of
//!    the same length alternate: quiet, then `--bytes-writes` writes on node 1
//!    (register puts of a 16-byte value on fresh keys; counter increments of one
//!    key). Replication bytes (peer channel `bytes_sent`, all nodes) and gossip
//!    bytes (membership `bytes_sent`, all nodes) per write, after subtracting the
//!    quiet window just before.
//! 3. `anti-entropy`: two nodes in process, no TCP: every message goes through
//!    the real frame encoder and decoder, then `anti_entropy::handle`. For 1k and
//!    100k keys with 0, 10 or 1,000 of them differing, rounds are run until both
//!    digests are equal: rounds, messages, bytes, keys repaired, time. The peer
//!    in the same run: shipping every key's state (frames of
//!    `STATES_PER_MESSAGE_MAX` deltas) and merging it.
//! 4. `coordination`: three nodes on disk (`sync`) with a three-voter quorum and
//!    `min = 0` on `account/*`: local increments against coordinated decrements
//!    over HTTP, and, when `etcd` is installed, puts to a three-member etcd on
//!    loopback through its HTTP gateway, same client, same run.
//!
//! Run: `cargo bench --bench cluster` (about 2 minutes; `-- --help` for the
//! options; docs/benchmarks.md for results). Without `--bench` (as `cargo test
//! --benches` runs it) it makes a smoke run of a few seconds.

use calmkv::invariants::Invariants;
use calmkv::quorum::Timings;
use calmkv::replication::anti_entropy::{self, STATES_PER_MESSAGE_MAX};
use calmkv::replication::digest::BUCKETS;
use calmkv::replication::frame::{decode_frame, encode_frame};
use calmkv::replication::message::PeerMessage;
use calmkv::server::{BoundListener, GossipOptions, QuorumOptions, Server, ServerConfig};
use calmkv::store::MemoryStore;
use calmkv::{Action, Config, CounterOp, CrdtOp, Key, Limits, Node, Op};
use calmkv_crdts::NodeId;
use clap::Parser;
use hdrhistogram::Histogram;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Longest wait for a write to reach every node before the run fails.
const PROPAGATION_WAIT_MAX: Duration = Duration::from_secs(10);
/// Longest wait for gossip to join a cluster.
const JOIN_WAIT_MAX: Duration = Duration::from_secs(60);
/// Most anti-entropy rounds one case may take before the run fails.
const ROUNDS_MAX: usize = 1_000;
/// Longest a load phase of the coordination section may run.
const LOAD_PHASE_MAX: Duration = Duration::from_secs(120);
/// Period of anti-entropy rounds in a running server (`server::ANTI_ENTROPY_PERIOD`).
const ANTI_ENTROPY_PERIOD: Duration = calmkv::server::ANTI_ENTROPY_PERIOD;
/// Anti-entropy "off": longer than any run.
const ANTI_ENTROPY_OFF: Duration = Duration::from_secs(24 * 3600);

/// calmkv clusters in one process on 127.0.0.1: propagation delay, bytes per
/// write, anti-entropy cost, local against coordinated operations.
#[derive(Parser, Debug)]
#[command(about, long_about = None)]
struct Args {
    /// Sections to run, in order (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "propagation,bytes,anti-entropy,coordination"
    )]
    only: Vec<Section>,
    /// Writes whose propagation is timed, per cluster size.
    #[arg(long, default_value_t = 500)]
    writes: usize,
    /// Cluster sizes for propagation (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "3,5")]
    nodes: Vec<usize>,
    /// Writes per write window of the bytes section.
    #[arg(long, default_value_t = 2_000)]
    bytes_writes: usize,
    /// Length of every window (quiet or writing) of the bytes section, seconds.
    #[arg(long, default_value_t = 5)]
    window_secs: u64,
    /// Key counts of the anti-entropy section (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,100000")]
    keys: Vec<usize>,
    /// Differing key counts of the anti-entropy section (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,10,1000")]
    differing: Vec<usize>,
    /// Requests per operation in the coordination section.
    #[arg(long, default_value_t = 2_000)]
    requests: usize,
    /// Concurrent HTTP requests in the coordination section.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Passed by `cargo bench`; without it a short smoke run is made.
    #[arg(long, hide = true)]
    bench: bool,
    /// A benchmark name filter from `cargo bench -- <filter>`: the run happens
    /// only when "cluster" contains it.
    #[arg(hide = true)]
    filter: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Propagation,
    Bytes,
    AntiEntropy,
    Coordination,
}

impl Args {
    /// Checks the bounds, and shrinks everything for the smoke run.
    fn bounded(mut self) -> Args {
        self.writes = self.writes.clamp(1, 100_000);
        self.nodes.retain(|n| (2..=16).contains(n));
        self.bytes_writes = self.bytes_writes.clamp(1, 1_000_000);
        self.window_secs = self.window_secs.clamp(1, 600);
        self.keys.retain(|k| (1..=1_000_000).contains(k));
        self.requests = self.requests.clamp(1, 1_000_000);
        self.concurrency = self.concurrency.clamp(1, 256);
        if !self.bench {
            self.writes = self.writes.min(20);
            self.nodes = vec![3];
            self.bytes_writes = self.bytes_writes.min(50);
            self.window_secs = 1;
            self.keys = vec![1_000];
            self.differing = vec![0, 10];
            self.only.retain(|s| *s != Section::Coordination);
        }
        for (k, d) in self.keys.iter().flat_map(|k| self.differing.iter().map(move |d| (k, d))) {
            assert!(d <= k, "--differing {d} is more than --keys {k}");
        }
        self
    }
}

fn key(name: &str) -> Key {
    Key::new(name, &Limits::default()).unwrap()
}

fn put(name: &str, value: &str) -> Op {
    Op {
        key: key(name),
        action: Action::Put { value: value.to_string().into(), context: None, if_absent: false },
    }
}

fn incr(name: &str) -> Op {
    Op { key: key(name), action: Action::Crdt(CrdtOp::Counter(CounterOp::Incr(1))) }
}

fn ms(h: &Histogram<u64>, q: f64) -> String {
    format!("{:.3}", h.value_at_quantile(q) as f64 / 1000.0)
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).unwrap()
}

/// `n` in-memory nodes that find each other through gossip (node 1 is the seed),
/// returned once every node's peer channel is connected to every other.
async fn gossip_cluster(n: usize, anti_entropy_period: Duration) -> Vec<Server> {
    let mut servers: Vec<Server> = Vec::new();
    for _ in 0..n {
        let mut config = ServerConfig::new(Config::in_memory(), "127.0.0.1:0");
        config.peer_addr = Some("127.0.0.1:0".into());
        config.anti_entropy_period = anti_entropy_period;
        let seeds = servers.first().and_then(Server::gossip_addr).into_iter().collect();
        config.gossip = Some(GossipOptions::new("127.0.0.1:0", seeds));
        servers.push(Server::start(config).await.unwrap());
    }
    let started = Instant::now();
    let joined = |s: &Server| {
        let channel = s.cluster().channel();
        channel.peers().len() == n - 1
            && channel.metrics().connects.load(Ordering::Relaxed) >= n as u64 - 1
    };
    while !servers.iter().all(joined) {
        assert!(started.elapsed() < JOIN_WAIT_MAX, "gossip did not join {n} nodes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the anti-entropy rounds started by members coming up finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    servers
}

async fn shutdown(servers: Vec<Server>) {
    for server in servers {
        server.shutdown().await.unwrap();
    }
}

/// A request to the watcher thread: the key, when its write was acknowledged,
/// and where to send the delay until each watched node could read it.
type Watch = (Key, Instant, tokio::sync::oneshot::Sender<Result<Vec<Duration>, String>>);

/// Polls the watched nodes' stores for each requested key, in a tight loop
/// (`yield_now` between passes so the nodes' own threads get the cores), until
/// every node returns it. Also counts passes, for the resolution.
fn watcher(nodes: Vec<Arc<Node>>, requests: mpsc::Receiver<Watch>) -> (u64, Duration) {
    let (mut passes, mut polling) = (0u64, Duration::ZERO);
    for (key, acked, answer) in requests {
        let mut seen: Vec<Option<Duration>> = vec![None; nodes.len()];
        let started = Instant::now();
        let result = loop {
            for (node, seen) in nodes.iter().zip(seen.iter_mut()) {
                if seen.is_none() && node.read(&key).unwrap().is_some() {
                    *seen = Some(acked.elapsed());
                }
            }
            passes += 1;
            if seen.iter().all(Option::is_some) {
                break Ok(seen.into_iter().map(Option::unwrap).collect());
            }
            if started.elapsed() > PROPAGATION_WAIT_MAX {
                break Err(format!("{key} not on every node after {PROPAGATION_WAIT_MAX:?}"));
            }
            std::thread::yield_now();
        };
        polling += started.elapsed();
        let _ = answer.send(result);
    }
    (passes, polling)
}

async fn propagation(args: &Args) {
    println!("\n## propagation: register write acknowledged on node 1 → readable on other nodes");
    println!(
        "(gossip membership, delta push only: periodic anti-entropy off; one write in flight)"
    );
    println!(
        "| nodes | writes | first replica p50 ms | p99 ms | all replicas p50 ms | p90 ms | p99 ms | p999 ms | max ms | write ack p50 ms | poll pass µs |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for &n in &args.nodes {
        let servers = gossip_cluster(n, ANTI_ENTROPY_OFF).await;
        let (watch, requests) = mpsc::channel::<Watch>();
        let nodes: Vec<Arc<Node>> = servers[1..].iter().map(|s| s.node().clone()).collect();
        let watching = std::thread::spawn(move || watcher(nodes, requests));
        let (mut first, mut all, mut ack) = (histogram(), histogram(), histogram());
        for i in 0..args.writes {
            let name = format!("p/{n}/{i}");
            let sent = Instant::now();
            servers[0]
                .cluster()
                .write(put(&name, "v"), Default::default(), Duration::from_secs(5))
                .await
                .unwrap();
            let acked = Instant::now();
            ack.record((acked - sent).as_micros() as u64).unwrap();
            let (answer, delays) = tokio::sync::oneshot::channel();
            watch.send((key(&name), acked, answer)).unwrap();
            let delays = delays.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
            first.record(delays.iter().min().unwrap().as_micros() as u64).unwrap();
            all.record(delays.iter().max().unwrap().as_micros() as u64).unwrap();
        }
        drop(watch);
        let (passes, polling) = watching.join().unwrap();
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            args.writes,
            ms(&first, 0.5),
            ms(&first, 0.99),
            ms(&all, 0.5),
            ms(&all, 0.9),
            ms(&all, 0.99),
            ms(&all, 0.999),
            ms(&all, 1.0),
            ms(&ack, 0.5),
            polling.as_secs_f64() * 1e6 / passes.max(1) as f64,
        );
        shutdown(servers).await;
    }
}

/// Byte counters summed over every node: (replication bytes, replication
/// frames, gossip bytes, keys repaired by anti-entropy).
fn counters(servers: &[Server]) -> [u64; 4] {
    let mut sum = [0u64; 4];
    for s in servers {
        let peer = s.cluster().channel().metrics();
        sum[0] += peer.bytes_sent.load(Ordering::Relaxed);
        sum[1] += peer.frames_queued.load(Ordering::Relaxed);
        sum[2] += s.membership().unwrap().metrics().bytes_sent;
        sum[3] += peer.keys_repaired.load(Ordering::Relaxed);
    }
    sum
}

/// Runs `work` (bounded by its own count) at the start of a window of length
/// `window`, waits out the rest of it, and returns the counters' growth and
/// the writes made.
async fn window<F, Fut>(servers: &[Server], window: Duration, work: F) -> ([u64; 4], usize)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let before = counters(servers);
    let started = tokio::time::Instant::now();
    let writes = work().await;
    assert!(
        started.elapsed() < window,
        "the writes took longer than the window; lower --bytes-writes"
    );
    tokio::time::sleep_until(started + window).await;
    let after = counters(servers);
    (std::array::from_fn(|i| after[i] - before[i]), writes)
}

async fn bytes(args: &Args) {
    let length = Duration::from_secs(args.window_secs);
    println!(
        "\n## bytes per write: 3 nodes (gossip, anti-entropy every {ANTI_ENTROPY_PERIOD:?}), \
         writes on node 1, windows of {length:?}, sums over all nodes"
    );
    let servers = gossip_cluster(3, ANTI_ENTROPY_PERIOD).await;
    println!("| window | writes | replication bytes | frames | gossip bytes | AE keys repaired | replication bytes/write (net) | frames/write (net) | gossip bytes/write (net) |");
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    type MakeOp = Box<dyn Fn(usize) -> Op>;
    let kinds: [(&str, MakeOp); 2] = [
        (
            "register put, 16-byte value, fresh key",
            Box::new(|i| put(&format!("b/{i}"), "0123456789abcdef")),
        ),
        ("counter incr, one key", Box::new(|_| incr("b/counter"))),
    ];
    for (what, make) in &kinds {
        let (quiet, _) = window(&servers, length, || async { 0 }).await;
        println!("| quiet | 0 | {} | {} | {} | {} | | | |", quiet[0], quiet[1], quiet[2], quiet[3]);
        let (busy, writes) = window(&servers, length, || async {
            for i in 0..args.bytes_writes {
                servers[0]
                    .cluster()
                    .write(make(i), Default::default(), Duration::from_secs(5))
                    .await
                    .unwrap();
            }
            args.bytes_writes
        })
        .await;
        let net = |i: usize| (busy[i] as f64 - quiet[i] as f64) / writes as f64;
        println!(
            "| {what} | {writes} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} |",
            busy[0],
            busy[1],
            busy[2],
            busy[3],
            net(0),
            net(1),
            net(2)
        );
    }
    shutdown(servers).await;
}

fn memory_node() -> Node {
    Node::open(NodeId(rand::random()), Arc::new(MemoryStore::new()), Limits::default()).unwrap()
}

/// Encodes a message as a peer frame and decodes it again, as the wire would;
/// returns the decoded message and the frame's size.
fn over_the_wire(message: PeerMessage) -> (PeerMessage, usize) {
    let frame = encode_frame(&message, None).unwrap();
    (decode_frame(&frame[4..], None).unwrap(), frame.len())
}

#[derive(Default)]
struct Cost {
    rounds: usize,
    messages: usize,
    bytes: usize,
    repaired: usize,
}

/// One anti-entropy round from `a` to `b`, message by message until one side
/// has nothing to answer.
fn round(a: &Node, b: &Node, cost: &mut Cost) {
    cost.rounds += 1;
    let mut next = Some((true, anti_entropy::start(a)));
    while let Some((to_b, message)) = next.take() {
        let (decoded, bytes) = over_the_wire(PeerMessage::AntiEntropy(message));
        let PeerMessage::AntiEntropy(message) = decoded else { unreachable!("sent AntiEntropy") };
        cost.messages += 1;
        cost.bytes += bytes;
        let (reply, handled) = anti_entropy::handle(if to_b { b } else { a }, &message).unwrap();
        cost.repaired += handled.keys_repaired;
        next = reply.map(|r| (!to_b, r));
    }
}

/// The peer: `from` ships every key's state to `to`, `STATES_PER_MESSAGE_MAX`
/// per frame, and `to` merges them all.
fn full_transfer(from: &Node, to: &Node) -> Cost {
    let mut cost = Cost { rounds: 1, ..Cost::default() };
    let ship = |deltas: Vec<(String, calmkv::Envelope)>, cost: &mut Cost| {
        let (decoded, bytes) = over_the_wire(PeerMessage::Deltas { deltas, ack: None });
        let PeerMessage::Deltas { deltas, .. } = decoded else { unreachable!("sent Deltas") };
        cost.messages += 1;
        cost.bytes += bytes;
        for (k, state) in deltas {
            cost.repaired += usize::from(to.merge(&key(&k), &state).unwrap());
        }
    };
    let mut batch = Vec::new();
    for bucket in 0..BUCKETS as u16 {
        for (k, _) in from.bucket_entries(bucket).unwrap() {
            let state = from.envelope(&key(&k)).unwrap();
            batch.push((k, state));
            if batch.len() == STATES_PER_MESSAGE_MAX {
                ship(std::mem::take(&mut batch), &mut cost);
            }
        }
    }
    if !batch.is_empty() {
        ship(batch, &mut cost);
    }
    cost
}

/// Two nodes holding the same `keys` keys, then `differing` of them (spread over
/// the key space) overwritten on `b` only.
fn diverged_pair(keys: usize, differing: usize) -> (Node, Node) {
    let (a, b) = (memory_node(), memory_node());
    for i in 0..keys {
        let applied = a.apply(&put(&format!("k/{i}"), "value-0123456789")).unwrap();
        b.merge(&key(&format!("k/{i}")), &applied.state).unwrap();
    }
    for i in 0..differing {
        b.apply(&put(&format!("k/{}", i * (keys / differing)), "changed")).unwrap();
    }
    (a, b)
}

fn anti_entropy_cost(args: &Args) {
    println!("\n## anti-entropy: two nodes in one process, no TCP (frames encoded and decoded)");
    println!("| keys | differing | rounds | messages | bytes | keys repaired | time ms | full transfer: messages | bytes | time ms | **bytes vs full** | **time vs full** |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for &keys in &args.keys {
        for &differing in &args.differing {
            let (a, b) = diverged_pair(keys, differing);
            let started = Instant::now();
            let mut cost = Cost::default();
            while cost.rounds == 0 || a.digest().top() != b.digest().top() {
                assert!(cost.rounds < ROUNDS_MAX, "anti-entropy did not converge");
                round(&a, &b, &mut cost);
            }
            let took = started.elapsed();
            assert_eq!(cost.repaired, differing, "keys repaired");

            // The peer, on a fresh pair diverged the same way.
            let (a, b) = diverged_pair(keys, differing);
            let started = Instant::now();
            let full = full_transfer(&b, &a);
            let full_took = started.elapsed();
            assert_eq!(a.digest().top(), b.digest().top(), "full transfer converged");
            println!(
                "| {keys} | {differing} | {} | {} | {} | {} | {:.2} | {} | {} | {:.2} | {:.4} | {:.4} |",
                cost.rounds,
                cost.messages,
                cost.bytes,
                cost.repaired,
                took.as_secs_f64() * 1e3,
                full.messages,
                full.bytes,
                full_took.as_secs_f64() * 1e3,
                cost.bytes as f64 / full.bytes as f64,
                took.as_secs_f64() / full_took.as_secs_f64(),
            );
        }
    }
}

/// Closed-loop HTTP load: `requests` requests over `concurrency` workers, for
/// at most [`LOAD_PHASE_MAX`]; returns (requests per second, latency
/// histogram in µs, errors).
async fn load(
    requests: usize,
    concurrency: usize,
    make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync>,
) -> (f64, Histogram<u64>, usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + LOAD_PHASE_MAX;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, make) = (next.clone(), make.clone());
        workers.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests || Instant::now() > deadline {
                    return (h, errors);
                }
                let t = Instant::now();
                match make(i).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        h.record(t.elapsed().as_micros() as u64).unwrap();
                    }
                    _ => errors += 1,
                }
            }
        }));
    }
    let mut total = histogram();
    let mut errors = 0;
    for w in workers {
        let (h, e) = w.await.unwrap();
        total.add(h).unwrap();
        errors += e;
    }
    (total.len() as f64 / started.elapsed().as_secs_f64(), total, errors)
}

async fn coordination(args: &Args) {
    println!(
        "\n## coordination: 3 nodes (sync, on disk), 3 voters, `account/*` min = 0, HTTP, \
         {} requests at concurrency {}",
        args.requests, args.concurrency
    );
    let invariants = Arc::new(
        Invariants::parse("[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n")
            .unwrap(),
    );
    // The voters' ports stay bound until each voter serves on its own.
    let probes: Vec<std::net::TcpListener> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let voters: Vec<String> = probes.iter().map(|p| p.local_addr().unwrap().to_string()).collect();
    let mut probes = probes.into_iter().map(BoundListener::new);
    let dir = tempfile::tempdir().unwrap();
    let mut servers: Vec<Server> = Vec::new();
    for (i, voter) in voters.iter().enumerate() {
        let node = Config {
            invariants: invariants.clone(),
            ..Config::new(dir.path().join(format!("n{i}")))
        };
        let mut config = ServerConfig::new(node, "127.0.0.1:0");
        config.peer_addr = Some("127.0.0.1:0".into());
        let seeds = servers.first().and_then(Server::gossip_addr).into_iter().collect();
        config.gossip = Some(GossipOptions::new("127.0.0.1:0", seeds));
        config.quorum = Some(QuorumOptions {
            voters: voters.clone(),
            listen: Some(voter.clone()),
            id: None,
            timings: Timings::default(),
            listener: probes.next(),
        });
        servers.push(Server::start(config).await.unwrap());
    }
    let deadline = Instant::now() + JOIN_WAIT_MAX;
    while servers.iter().any(|s| s.quorum().unwrap().status().leader.is_none()) {
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build().unwrap();
    let urls: Arc<Vec<String>> =
        Arc::new(servers.iter().map(|s| format!("http://{}", s.http_addr())).collect());
    let accounts = 64;
    // Fund every account generously first.
    for a in 0..accounts {
        let r = client
            .post(format!("{}/v1/kv/account/{a}", urls[0]))
            .body(r#"{"counter":{"incr":1000000}}"#)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut rows = Vec::new();
    for (what, body) in [
        ("incr (local, `X-Coordination: none`)", r#"{"counter":{"incr":1}}"#),
        ("decr (quorum, `X-Coordination: quorum`)", r#"{"counter":{"decr":1}}"#),
    ] {
        let (c, urls) = (client.clone(), urls.clone());
        let make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync> =
            Arc::new(move |i| {
                c.post(format!("{}/v1/kv/account/{}", urls[i % urls.len()], i % accounts))
                    .body(body)
            });
        rows.push((what, load(args.requests, args.concurrency, make).await));
    }
    if let Some(etcd) = start_etcd(dir.path()) {
        let (c, urls) = (client.clone(), Arc::new(etcd.urls.clone()));
        let make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync> =
            Arc::new(move |i| {
                // PUT key "a<i % 64>" = "1" (base64) through the v3 HTTP gateway.
                let body = format!(r#"{{"key":"{}","value":"MQ=="}}"#, base64_key(i % 64));
                c.post(format!("{}/v3/kv/put", urls[i % urls.len()])).body(body)
            });
        rows.push(("etcd put (3 members)", load(args.requests, args.concurrency, make).await));
        drop(etcd);
    } else {
        println!("(etcd not installed: `apt-get install etcd-server` adds it to this table)");
    }
    let base = rows[0].1 .0;
    println!("| operation | req/s | p50 ms | p99 ms | errors | **throughput vs local incr** |");
    println!("|---|--:|--:|--:|--:|--:|");
    for (what, (rps, h, errors)) in &rows {
        println!(
            "| {what} | {rps:.0} | {} | {} | {errors} | {:.2} |",
            ms(h, 0.5),
            ms(h, 0.99),
            rps / base
        );
    }
    shutdown(servers).await;
}

fn base64_key(i: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("a{i}"))
}

/// Three etcd members, killed when dropped.
struct Etcd {
    children: Vec<std::process::Child>,
    urls: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Three etcd members on 127.0.0.1 (ports 23791.., 23801..), if `etcd` exists.
fn start_etcd(dir: &std::path::Path) -> Option<Etcd> {
    let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let cluster: Vec<String> =
        (0..3).map(|i| format!("e{i}=http://127.0.0.1:{}", 23801 + i)).collect();
    let mut etcd = Etcd { children: Vec::new(), urls: Vec::new() };
    for i in 0..3 {
        let client = format!("http://127.0.0.1:{}", 23791 + i);
        let peer = format!("http://127.0.0.1:{}", 23801 + i);
        let child = std::process::Command::new(bin)
            .args(["--name", &format!("e{i}"), "--data-dir"])
            .arg(dir.join(format!("etcd{i}")))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        etcd.children.push(child);
        etcd.urls.push(client);
    }
    // Ready when a put through the gateway answers 200.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = std::process::Command::new("curl")
            .args(["-sf", "-X", "POST", &format!("{}/v3/kv/put", etcd.urls[0])])
            .args(["-d", r#"{"key":"cmVhZHk=","value":"MQ=="}"#])
            .stdout(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(etcd);
        }
        if Instant::now() > deadline {
            eprintln!("etcd did not become ready");
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse().bounded();
    if args.filter.as_deref().is_some_and(|f| !"cluster".contains(f)) {
        return;
    }
    if args.bench {
        println!("calmkv cluster benchmarks (127.0.0.1, one process; see docs/benchmarks.md)");
    } else {
        println!("smoke run (no --bench): use `cargo bench --bench cluster` to measure");
    }
    for section in &args.only {
        let started = Instant::now();
        match section {
            Section::Propagation => propagation(&args).await,
            Section::Bytes => bytes(&args).await,
            Section::AntiEntropy => anti_entropy_cost(&args),
            Section::Coordination => coordination(&args).await,
        }
        println!("({section:?}: {:.0} s)", started.elapsed().as_secs_f64());
    }
}
