//! Cluster benchmarks, in one process on loopback (bounded in count and time):
//!
//! 1. `propagation`: time from a write acknowledged on node 1 until every other
//!    node can read it, for 3 and 5 nodes (p50/p99/max).
//! 2. `bytes`: replication bytes per write (register put, counter increment)
//!    over the peer channel, and gossip's background bytes per second.
//! 3. `anti-entropy`: one exchange between two nodes with 1k and 100k keys of
//!    which 0, 10 or 1,000 differ: messages, bytes, keys repaired, time;
//!    beside it, the bytes of shipping every key's full state.
//! 4. `coordination`: on a three-node cluster with a three-voter quorum and
//!    `min = 0` on `account/*`, local increments against coordinated
//!    decrements over HTTP at a fixed concurrency (throughput, p50/p99), and,
//!    when `etcd` is installed, puts to a three-member etcd on loopback
//!    through its HTTP gateway in the same run.
//!
//! `cargo bench --bench cluster -- --help` lists the options.

use calmkv::invariants::Invariants;
use calmkv::quorum::Timings;
use calmkv::replication::anti_entropy::{self, AntiEntropy};
use calmkv::server::{connect_all, GossipOptions, QuorumOptions, Server, ServerConfig};
use calmkv::store::MemoryStore;
use calmkv::{Action, Config, CounterOp, CrdtOp, Envelope, Key, Limits, Node, Op};
use calmkv_crdts::{Crdt, NodeId};
use hdrhistogram::Histogram;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    writes: usize,
    requests: usize,
    concurrency: usize,
    only: Option<String>,
}

fn args() -> Args {
    let mut args = Args { writes: 300, requests: 2000, concurrency: 16, only: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match arg.as_str() {
            "--writes" => args.writes = value("--writes").clamp(1, 100_000),
            "--requests" => args.requests = value("--requests").clamp(1, 1_000_000),
            "--concurrency" => args.concurrency = value("--concurrency").clamp(1, 256),
            "--only" => args.only = it.next(),
            "--bench" => {}
            "--help" | "-h" => {
                println!(
                    "cargo bench --bench cluster -- [--writes N (300)] [--requests N (2000)] \
                     [--concurrency N (16)] [--only propagation|bytes|anti-entropy|coordination]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?}; see --help"),
        }
    }
    args
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

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn mesh(n: usize) -> Vec<Server> {
    let mut servers = Vec::new();
    for _ in 0..n {
        let mut config = ServerConfig::new(Config::in_memory(), "127.0.0.1:0");
        config.peer_addr = Some("127.0.0.1:0".into());
        // Anti-entropy out of the way: propagation measures the delta push.
        config.anti_entropy_period = Duration::from_secs(3600);
        servers.push(Server::start(config).await.unwrap());
    }
    connect_all(&servers);
    // Let every link connect before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    servers
}

async fn propagation(args: &Args) {
    println!("\n## propagation: write acknowledged on node 1 → readable on every node");
    println!("| nodes | writes | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    for n in [3, 5] {
        let servers = mesh(n).await;
        let mut h = Histogram::<u64>::new(3).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..args.writes {
            let name = format!("p/{i}");
            servers[0]
                .cluster()
                .write(put(&name, "v"), Default::default(), Duration::from_secs(5))
                .await
                .unwrap();
            let started = Instant::now();
            let k = key(&name);
            // Polls every node's store (a read is a few microseconds): the
            // resolution is one poll loop over the nodes, well under 0.1 ms.
            while !servers[1..].iter().all(|s| s.node().read(&k).unwrap().is_some()) {
                assert!(Instant::now() < deadline, "propagation stalled");
                tokio::task::yield_now().await;
            }
            h.record(started.elapsed().as_micros() as u64).unwrap();
        }
        println!(
            "| {n} | {} | {:.2} | {:.2} | {:.2} |",
            args.writes,
            ms(&h, 0.5),
            ms(&h, 0.99),
            h.max() as f64 / 1000.0
        );
        for server in servers {
            server.shutdown().await.unwrap();
        }
    }
}

async fn bytes(args: &Args) {
    println!("\n## bytes per write (3 nodes, peer channel, all links)");
    let servers = mesh(3).await;
    let sent = |servers: &[Server]| -> u64 {
        servers
            .iter()
            .map(|s| s.cluster().channel().metrics().bytes_sent.load(Ordering::Relaxed))
            .sum()
    };
    println!("| write | writes | replication bytes per write |\n|---|---|---|");
    for (what, make) in [
        (
            "register put, 16-byte value",
            Box::new(|i: usize| put(&format!("b/{i}"), "0123456789abcdef"))
                as Box<dyn Fn(usize) -> Op>,
        ),
        ("counter incr, one key", Box::new(|_| incr("b/counter"))),
    ] {
        let before = sent(&servers);
        for i in 0..args.writes {
            servers[0]
                .cluster()
                .write(make(i), Default::default(), Duration::from_secs(5))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let per = (sent(&servers) - before) as f64 / args.writes as f64;
        println!("| {what} | {} | {per:.0} |", args.writes);
    }
    for server in servers {
        server.shutdown().await.unwrap();
    }

    let mut gossiping = Vec::new();
    for _ in 0..3 {
        let mut config = ServerConfig::new(Config::in_memory(), "127.0.0.1:0");
        config.peer_addr = Some("127.0.0.1:0".into());
        let seeds = gossiping.first().and_then(Server::gossip_addr).into_iter().collect();
        config.gossip = Some(GossipOptions::new("127.0.0.1:0", seeds));
        gossiping.push(Server::start(config).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gossip = |servers: &[Server]| -> u64 {
        servers.iter().map(|s| s.membership().unwrap().metrics().bytes_sent).sum()
    };
    let before = gossip(&gossiping);
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await;
    let idle = (gossip(&gossiping) - before) as f64 / window.as_secs_f64();
    let before = gossip(&gossiping);
    let started = Instant::now();
    let mut written = 0usize;
    while started.elapsed() < window && written < 1_000_000 {
        let op = put(&format!("g/{written}"), "v");
        gossiping[0].cluster().write(op, Default::default(), Duration::from_secs(5)).await.unwrap();
        written += 1;
    }
    let busy = (gossip(&gossiping) - before) as f64 / started.elapsed().as_secs_f64();
    println!(
        "\ngossip, 3 nodes, LAN timings: {idle:.0} bytes/s idle; {busy:.0} bytes/s over the same \
         window while node 1 took {written} writes (writes never travel by gossip)"
    );
    for server in gossiping {
        server.shutdown().await.unwrap();
    }
}

fn node() -> Node {
    Node::open(NodeId(rand::random()), Arc::new(MemoryStore::new()), Limits::default()).unwrap()
}

/// Runs one anti-entropy round from `a` to `b` to completion; returns
/// (messages, bytes, keys repaired).
fn exchange(a: &Node, b: &Node) -> (usize, usize, usize) {
    let (mut messages, mut bytes, mut repaired) = (0, 0, 0);
    let mut next: Option<(bool, AntiEntropy)> = Some((true, anti_entropy::start(a)));
    while let Some((to_b, message)) = next.take() {
        messages += 1;
        bytes += rmp_serde::to_vec_named(&message).unwrap().len();
        let receiver = if to_b { b } else { a };
        let (reply, handled) = anti_entropy::handle(receiver, &message).unwrap();
        repaired += handled.keys_repaired;
        next = reply.map(|r| (!to_b, r));
    }
    (messages, bytes, repaired)
}

fn anti_entropy_cost() {
    println!("\n## anti-entropy: one exchange between two nodes (in process, no TCP)");
    println!("| keys | differing | rounds to converge | messages | bytes | keys repaired | time ms | full-state bytes |\n|---|---|---|---|---|---|---|---|");
    for keys in [1_000usize, 100_000] {
        for differing in [0usize, 10, 1_000] {
            let (a, b) = (node(), node());
            let mut full_bytes = 0;
            for i in 0..keys {
                let applied = a.apply(&put(&format!("k/{i}"), "value")).unwrap();
                b.merge(&key(&format!("k/{i}")), &applied.state).unwrap();
                full_bytes += calmkv_crdts::encode(&applied.state).unwrap().len() + 8;
            }
            for i in 0..differing {
                b.apply(&put(&format!("k/{}", i * (keys / differing.max(1))), "changed")).unwrap();
            }
            let started = Instant::now();
            let (mut messages, mut bytes, mut repaired, mut rounds) = (0, 0, 0, 0);
            while a.digest().top() != b.digest().top() || rounds == 0 {
                let (m, by, r) = exchange(&a, &b);
                messages += m;
                bytes += by;
                repaired += r;
                rounds += 1;
                assert!(rounds < 1_000, "anti-entropy did not converge");
            }
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            println!("| {keys} | {differing} | {rounds} | {messages} | {bytes} | {repaired} | {elapsed:.1} | {full_bytes} |");
            let _ = Envelope::default().merged(&Envelope::default());
        }
    }
}

/// Closed-loop HTTP load: `requests` requests over `concurrency` workers;
/// returns (requests per second, latency histogram in µs, errors).
async fn load(
    client: &reqwest::Client,
    requests: usize,
    concurrency: usize,
    make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync>,
    client_ok: fn(u16) -> bool,
) -> (f64, Histogram<u64>, usize) {
    let _ = client;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, make) = (next.clone(), make.clone());
        workers.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests || Instant::now() > deadline {
                    return (h, errors);
                }
                let t = Instant::now();
                match make(i).send().await {
                    Ok(r) if client_ok(r.status().as_u16()) => {
                        let _ = r.bytes().await;
                        h.record(t.elapsed().as_micros() as u64).unwrap();
                    }
                    _ => errors += 1,
                }
            }
        }));
    }
    let mut total = Histogram::<u64>::new(3).unwrap();
    let mut errors = 0;
    for w in workers {
        let (h, e) = w.await.unwrap();
        total.add(h).unwrap();
        errors += e;
    }
    (total.len() as f64 / started.elapsed().as_secs_f64(), total, errors)
}

async fn coordination(args: &Args) {
    println!("\n## coordination: 3 nodes, 3 voters, `account/*` min = 0, HTTP, {} requests at concurrency {}", args.requests, args.concurrency);
    let invariants = Arc::new(
        Invariants::parse("[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n")
            .unwrap(),
    );
    let probes: Vec<std::net::TcpListener> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let voters: Vec<String> = probes.iter().map(|p| p.local_addr().unwrap().to_string()).collect();
    drop(probes);
    let dir = tempfile::tempdir().unwrap();
    let mut servers: Vec<Server> = Vec::new();
    for (i, voter) in voters.iter().enumerate() {
        // On disk with the default `sync` durability, as a deployment runs.
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
        });
        servers.push(Server::start(config).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while servers.iter().any(|s| s.quorum().unwrap().status().leader.is_none()) {
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build().unwrap();
    let urls: Arc<Vec<String>> =
        Arc::new(servers.iter().map(|s| format!("http://{}", s.http_addr())).collect());
    let accounts = 64;
    // Fund every account generously on every node first.
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
    let ok = |s: u16| (200..300).contains(&s);
    let mut rows = Vec::new();
    for (what, body) in [
        ("incr (local)", r#"{"counter":{"incr":1}}"#),
        ("decr (quorum)", r#"{"counter":{"decr":1}}"#),
    ] {
        let (c, urls) = (client.clone(), urls.clone());
        let make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync> =
            Arc::new(move |i| {
                c.post(format!("{}/v1/kv/account/{}", urls[i % urls.len()], i % accounts))
                    .body(body)
            });
        rows.push((what, load(&client, args.requests, args.concurrency, make, ok).await));
    }
    if let Some(etcd) = start_etcd(dir.path()) {
        let (c, urls) = (client.clone(), Arc::new(etcd.urls.clone()));
        let make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync> =
            Arc::new(move |i| {
                // PUT key "a<i % 64>" = "1" (base64) through the v3 HTTP gateway.
                let body = format!(r#"{{"key":"{}","value":"MQ=="}}"#, base64_key(i % 64));
                c.post(format!("{}/v3/kv/put", urls[i % urls.len()])).body(body)
            });
        rows.push((
            "etcd put (3 members)",
            load(&client, args.requests, args.concurrency, make, ok).await,
        ));
        drop(etcd);
    } else {
        println!("(etcd not installed: `apt-get install etcd-server` adds it to this table)");
    }
    let base = rows[0].1 .0;
    println!("| operation | req/s | p50 ms | p99 ms | errors | throughput vs local incr |\n|---|---|---|---|---|---|");
    for (what, (rps, h, errors)) in &rows {
        println!(
            "| {what} | {rps:.0} | {:.2} | {:.2} | {errors} | {:.2} |",
            ms(h, 0.5),
            ms(h, 0.99),
            rps / base
        );
    }
    for server in servers {
        server.shutdown().await.unwrap();
    }
}

fn base64_key(i: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("a{i}"))
}

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

/// Three etcd members on loopback (ports 23791.., 23801..), if `etcd` exists.
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
            .args([
                "-sf",
                "-X",
                "POST",
                &format!("{}/v3/kv/put", etcd.urls[0]),
                "-d",
                r#"{"key":"cmVhZHk=","value":"MQ=="}"#,
            ])
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
    let args = args();
    let wants = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    println!("calmkv cluster benchmarks (loopback, one process; see docs/benchmarks.md)");
    if wants("propagation") {
        propagation(&args).await;
    }
    if wants("bytes") {
        bytes(&args).await;
    }
    if wants("anti-entropy") {
        anti_entropy_cost();
    }
    if wants("coordination") {
        coordination(&args).await;
    }
}
