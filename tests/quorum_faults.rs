//! The quorum under network faults, over real loopback TCP with a proxy in
//! front of every voter: a lost reply is reported as "may or may not be
//! applied" (and the operation applied once), a refusal before anything was
//! sent as "not applied".

use calmkv::error::AppliedStatus;
use calmkv::http::ApiError;
use calmkv::invariants::Invariants;
use calmkv::quorum::{QuorumConfig, QuorumGroup, Timings};
use calmkv::store::{Durability, SledStore};
use calmkv::{Action, Applied, Config, CounterOp, CrdtOp, Key, Node, NodeError, Op};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const BANK: &str = "[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n";
const DEADLINE: Duration = Duration::from_secs(10);

/// What a [`Proxy`] does with the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Both directions pass.
    Pass = 0,
    /// Requests reach the voter; what it sends back is discarded.
    DropReplies = 1,
    /// Nothing reaches the voter: connections are closed.
    Block = 2,
}

/// A loopback TCP proxy in front of one voter; its mode applies at once to
/// new and open connections.
struct Proxy {
    addr: String,
    mode: Arc<AtomicU8>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let task = tokio::spawn({
            let mode = mode.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else { continue };
                    if mode.load(Ordering::SeqCst) == Mode::Block as u8 {
                        continue; // dropped: closed at once
                    }
                    let Ok(outbound) = TcpStream::connect(&upstream).await else { continue };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::spawn(pump(in_read, out_write, mode.clone(), Mode::Block));
                    tokio::spawn(pump(out_read, in_write, mode.clone(), Mode::DropReplies));
                }
            }
        });
        Proxy { addr, mode, task }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while the mode is below `stop_at`; at or past it,
/// bytes are discarded, and in [`Mode::Block`] the connection is closed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    stop_at: Mode,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = mode.load(Ordering::SeqCst);
        if now == Mode::Block as u8 {
            return;
        }
        if now >= stop_at as u8 {
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

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

async fn start(voters: &[String], listen: Option<(String, TcpListener)>, dir: &Path) -> Member {
    let node = node();
    let (listen, listener) = match listen {
        Some((advertised, listener)) => (Some(advertised), Some(listener)),
        None => (None, None),
    };
    let config = QuorumConfig {
        voters: voters.to_vec(),
        listen,
        id: None,
        secret: None,
        timings: timings(),
    };
    let store = Arc::new(SledStore::open(dir, Durability::Sync).unwrap());
    let group = QuorumGroup::start_on(config, listener, node.clone(), store).await.unwrap();
    Member { node, group }
}

/// Three voters, each reached through its own proxy: the voters' addresses
/// (as every member dials them) are the proxies'.
async fn three_behind_proxies(root: &Path) -> (Vec<Proxy>, Vec<Member>) {
    let mut listeners = Vec::new();
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        proxies.push(Proxy::start(listener.local_addr().unwrap().to_string()).await);
        listeners.push(listener);
    }
    let voters: Vec<String> = proxies.iter().map(|p| p.addr.clone()).collect();
    let mut members = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let listen = Some((voters[i].clone(), listener));
        members.push(start(&voters, listen, &root.join(format!("v{i}"))).await);
    }
    (proxies, members)
}

/// The leader every member agrees on.
async fn leader_of(members: &[Member]) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let leaders: Vec<Option<u64>> = members.iter().map(|m| m.group.status().leader).collect();
        if let Some(Some(leader)) = leaders.first() {
            if leaders.iter().all(|l| *l == Some(*leader)) {
                return *leader;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn key(name: &str) -> Key {
    Key::new(name, &Default::default()).unwrap()
}

fn counter(name: &str, op: CounterOp) -> Op {
    Op { key: key(name), action: Action::Crdt(CrdtOp::Counter(op)) }
}

/// Funds `account` with `amount` on every member.
fn fund(members: &[Member], account: &str, amount: u64) {
    let funded = members[0].node.apply(&counter(account, CounterOp::Incr(amount))).unwrap();
    for member in &members[1..] {
        member.node.merge(&key(account), &funded.state).unwrap();
    }
}

async fn decr(
    member: &Member,
    account: &str,
    n: u64,
    within: Duration,
) -> Result<Applied, NodeError> {
    member.group.propose(counter(account, CounterOp::Decr(n)), Instant::now() + within).await
}

/// Waits until every voter's state machine holds `value` for `account`.
async fn admitted_everywhere(members: &[Member], account: &str, value: i128) {
    let deadline = Instant::now() + DEADLINE;
    let read = |m: &Member| m.group.admitted(account).map(|s| s.value.counter().value());
    while !members.iter().all(|m| read(m) == Some(value)) {
        let seen: Vec<Option<i128>> = members.iter().map(read).collect();
        assert!(Instant::now() < deadline, "state machines never reached {value}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The JSON body of an error answer.
async fn body_of(error: NodeError) -> serde_json::Value {
    use axum::response::IntoResponse;
    let response = ApiError::Node(error).into_response();
    assert_eq!(response.status(), 503);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_whose_reply_is_lost_is_reported_unknown_and_applies_once() {
    let root = tempfile::tempdir().unwrap();
    let (proxies, members) = three_behind_proxies(root.path()).await;
    let leader = leader_of(&members).await;
    fund(&members, "account/a", 100);
    decr(&members[0], "account/a", 1, DEADLINE).await.unwrap();
    admitted_everywhere(&members, "account/a", 99).await;

    // What the leader sends back on connections to it is lost; a follower's
    // forwarded proposal still reaches it and commits.
    let follower = (0..3).find(|i| *i as u64 + 1 != leader).unwrap();
    proxies[(leader - 1) as usize].set(Mode::DropReplies);
    // A deadline past the transport's own 5 s RPC bound: the answer must come
    // from the deadline, as unknown, not from that bound as "not applied".
    let answer = decr(&members[follower], "account/a", 1, Duration::from_millis(5500)).await;
    let error = answer.expect_err("no reply can arrive");
    assert!(matches!(error, NodeError::CoordinationIndeterminate { .. }), "{error:?}");
    assert_eq!(error.applied(), Some(AppliedStatus::Unknown));
    let body = body_of(error).await;
    assert_eq!(body["error"]["code"], "coordination_unavailable");
    assert_eq!(body["error"]["applied"], "unknown", "{body}");

    // It was applied, once: every state machine holds 98.
    admitted_everywhere(&members, "account/a", 98).await;
    proxies[(leader - 1) as usize].set(Mode::Pass);
    decr(&members[follower], "account/a", 1, DEADLINE).await.unwrap();
    admitted_everywhere(&members, "account/a", 97).await;
    for member in &members {
        member.group.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_that_never_left_the_node_is_reported_not_applied() {
    let root = tempfile::tempdir().unwrap();
    // Voters whose ports refuse connections: nothing is ever sent.
    let mut voters = Vec::new();
    for _ in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        voters.push(listener.local_addr().unwrap().to_string());
    }
    let client = start(&voters, None, &root.path().join("client")).await;
    client.node.apply(&counter("account/b", CounterOp::Incr(5))).unwrap();
    let error = decr(&client, "account/b", 1, Duration::from_secs(2)).await.unwrap_err();
    assert!(matches!(error, NodeError::CoordinationUnavailable { .. }), "{error:?}");
    assert_eq!(error.applied(), Some(AppliedStatus::No));
    let body = body_of(error).await;
    assert_eq!(body["error"]["applied"], "no", "{body}");
    let balance = client.node.envelope(&key("account/b")).unwrap().value.counter().value();
    assert_eq!(balance, 5, "nothing changed");
}
