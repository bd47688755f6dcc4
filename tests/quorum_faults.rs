//! The quorum under network faults, over real loopback TCP with a proxy in
//! front of every voter: a lost reply is reported as "may or may not be
//! applied" (and the operation applied once), a refusal before anything was
//! sent as "not applied", and a retry under the same idempotency key is
//! answered with the first outcome.

mod common;

use calmkv::error::AppliedStatus;
use calmkv::http::ApiError;
use calmkv::invariants::Invariants;
use calmkv::quorum::{IdempotencyKey, QuorumConfig, QuorumGroup, Timings};
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

const BANK: &str = "[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n\n[[invariant]]\nkeys = \"user/*\"\nunique = true\n";
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
    upstream: String,
    mode: Arc<AtomicU8>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let task = tokio::spawn({
            let (mode, upstream) = (mode.clone(), upstream.clone());
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
        Proxy { addr, upstream, mode, task }
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
    let members = start_behind(&proxies, listeners, root).await;
    (proxies, members)
}

/// Starts the three voters behind `proxies` on `listeners` (one each, the
/// proxies' upstreams), with their data in `root`.
async fn start_behind(proxies: &[Proxy], listeners: Vec<TcpListener>, root: &Path) -> Vec<Member> {
    let voters: Vec<String> = proxies.iter().map(|p| p.addr.clone()).collect();
    let mut members = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let listen = Some((voters[i].clone(), listener));
        members.push(start(&voters, listen, &root.join(format!("v{i}"))).await);
    }
    members
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_under_the_same_idempotency_key_after_an_unknown_answer_applies_once() {
    let root = tempfile::tempdir().unwrap();
    let (proxies, members) = three_behind_proxies(root.path()).await;
    let leader = leader_of(&members).await;
    fund(&members, "account/r", 100);
    let follower = (0..3).find(|i| *i as u64 + 1 != leader).unwrap();
    let key = IdempotencyKey::new("transfer-0001").unwrap();
    let debit = || counter("account/r", CounterOp::Decr(10));
    let within = |d: Duration| Instant::now() + d;

    proxies[(leader - 1) as usize].set(Mode::DropReplies);
    let first = members[follower]
        .group
        .propose_idempotent(debit(), within(Duration::from_millis(1500)), Some(key.clone()))
        .await;
    let error = first.expect_err("the reply is lost");
    assert_eq!(error.applied(), Some(AppliedStatus::Unknown), "{error:?}");
    admitted_everywhere(&members, "account/r", 90).await;

    // The client retries with the same key, from another node even: the
    // answer is the first commit, and the balance moved once.
    proxies[(leader - 1) as usize].set(Mode::Pass);
    let retry_from = (0..3).find(|i| *i != follower).unwrap();
    for at in [follower, retry_from] {
        let retried = members[at]
            .group
            .propose_idempotent(debit(), within(DEADLINE), Some(key.clone()))
            .await
            .unwrap();
        assert!(retried.coordinated);
        assert_eq!(retried.state.value.counter().value(), 90, "the first outcome");
    }
    admitted_everywhere(&members, "account/r", 90).await;
    // Another key is another operation.
    let other = IdempotencyKey::new("transfer-0002").unwrap();
    members[follower]
        .group
        .propose_idempotent(debit(), within(DEADLINE), Some(other))
        .await
        .unwrap();
    admitted_everywhere(&members, "account/r", 80).await;
    // The same key for another operation is refused, and changes nothing.
    let reused = members[follower]
        .group
        .propose_idempotent(counter("account/r", CounterOp::Decr(1)), within(DEADLINE), Some(key))
        .await;
    assert!(matches!(reused, Err(NodeError::IdempotencyKeyReused { .. })), "{reused:?}");
    admitted_everywhere(&members, "account/r", 80).await;
    for member in &members {
        member.group.shutdown().await;
    }
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_refused_with_400_and_changes_nothing() {
    let server = common::TestServer::builder().invariants(BANK).start().await;
    let funded =
        common::send(server.post_op("account/h", serde_json::json!({"counter": {"incr": 5}})))
            .await;
    assert_eq!(funded.status(), 200);
    let before = server.store_snapshot();
    let long = "k".repeat(calmkv::quorum::idempotency::IDEMPOTENCY_KEY_BYTES_MAX + 1);
    for bad in ["", "has space", long.as_str()] {
        let request = server
            .post_op("account/h", serde_json::json!({"counter": {"decr": 1}}))
            .header("Idempotency-Key", bad);
        let (status, code) = common::error_of(common::send(request).await).await;
        assert_eq!((status.as_u16(), code.as_str()), (400, "bad_request"), "{bad:?}");
    }
    let latin1 = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap();
    let request = server.delete("/v1/kv/account/h").header("Idempotency-Key", latin1);
    let (status, _) = common::error_of(common::send(request).await).await;
    assert_eq!(status.as_u16(), 400);
    assert_eq!(server.store_snapshot(), before, "a refused request changes nothing");
    // A well-formed key is accepted.
    let request = server
        .post_op("account/h", serde_json::json!({"counter": {"decr": 1}}))
        .header("Idempotency-Key", "0123-abcd");
    assert_eq!(common::send(request).await.status(), 200);
    server.stop().await;
}

/// A fake node that answers the first write `503 coordination_unavailable`
/// (applied: unknown) and the second `200`, recording each request's
/// `Idempotency-Key`.
async fn flaky_node() -> (String, JoinHandle<Vec<Option<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut keys = Vec::new();
        for attempt in 0..2 {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            let head_end = loop {
                let n = stream.read(&mut buffer).await.unwrap();
                assert!(n > 0, "the client closed before a whole request");
                request.extend_from_slice(&buffer[..n]);
                if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at;
                }
            };
            let head = String::from_utf8_lossy(&request[..head_end]).to_string();
            let header = |name: &str| {
                head.lines().find_map(|line| {
                    let (n, v) = line.split_once(':')?;
                    n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
            };
            keys.push(header("idempotency-key"));
            let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            while request.len() < head_end + 4 + length {
                let n = stream.read(&mut buffer).await.unwrap();
                request.extend_from_slice(&buffer[..n]);
            }
            let (status, body) = if attempt == 0 {
                (
                    "503 Service Unavailable\r\nRetry-After: 0",
                    r#"{"error":{"code":"coordination_unavailable","message":"m","applied":"unknown"}}"#,
                )
            } else {
                ("200 OK", r#"{"type":"counter","value":9,"context":""}"#)
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
        }
        keys
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_an_idempotency_key_and_resends_it_after_coordination_unavailable() {
    let (url, node) = flaky_node().await;
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_calmkv"))
            .args(["decr", "account/a", "1", "--url", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "9");
    assert!(stderr.contains("applied: unknown"), "{stderr}");
    let keys = node.await.unwrap();
    assert_eq!(keys.len(), 2);
    let first = keys[0].clone().expect("the first request carries a key");
    assert!(IdempotencyKey::new(first.as_str()).is_ok(), "{first:?}");
    assert_eq!(keys[1].as_deref(), Some(first.as_str()), "the retry reuses the key");
}

/// Applies `op` as the HTTP API would: through the quorum when a declared
/// invariant routes it there, locally otherwise.
async fn write(member: &Member, op: Op) -> Result<Applied, NodeError> {
    match member.node.invariants().route(&op)? {
        calmkv::invariants::Route::Quorum { .. } => {
            member.group.propose(op, Instant::now() + DEADLINE).await
        }
        calmkv::invariants::Route::Local => member.node.apply(&op),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_naming_the_quorum_actor_cannot_kill_the_quorum_and_the_voters_restart() {
    use calmkv_crdts::{CausalContext, Dot};
    let root = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        proxies.push(Proxy::start(listener.local_addr().unwrap().to_string()).await);
        listeners.push(listener);
    }
    let members = start_behind(&proxies, listeners, root.path()).await;
    leader_of(&members).await;
    fund(&members, "account/alice", 10);
    fund(&members, "account/bob", 10);

    // DELETE with an X-Context naming the quorum's actor at its last dot.
    let forged = CausalContext::from_dots([Dot {
        node: calmkv::quorum::store::QUORUM_ACTOR,
        counter: u64::MAX,
    }]);
    let delete = Op { key: key("account/alice"), action: Action::Delete { context: Some(forged) } };
    // A coordinated delete: the quorum refuses the forged context, typed.
    let deleted = write(&members[0], delete.clone()).await;
    assert!(matches!(deleted, Err(NodeError::LimitExceeded { .. })), "{deleted:?}");
    // Applied locally, the forged context is restricted to what the replica
    // has seen, so it claims nothing of the quorum's actor and the next
    // decrement is decided as usual. (A replica holding such a state from a
    // forged peer is refused at admission; `quorum::store` tests that the
    // state machine refuses it too.)
    members[0].node.apply(&delete).unwrap();
    let state = members[0].node.envelope(&key("account/alice")).unwrap();
    let claimed = state.value.context().highest(calmkv::quorum::store::QUORUM_ACTOR);
    assert!(claimed < 1 << 62, "the forged claim reached the key: {claimed}");
    decr(&members[0], "account/alice", 1, DEADLINE).await.unwrap();
    // And the quorum goes on with the other keys.
    decr(&members[1], "account/bob", 1, DEADLINE).await.unwrap();
    admitted_everywhere(&members, "account/bob", 9).await;

    // Every voter restarts from its log (the poisoned entries replay as
    // refusals) and the group works again.
    for member in &members {
        member.group.shutdown().await;
    }
    drop(members);
    let mut listeners = Vec::new();
    for proxy in &proxies {
        listeners.push(TcpListener::bind(&proxy.upstream).await.unwrap());
    }
    let members = start_behind(&proxies, listeners, root.path()).await;
    leader_of(&members).await;
    admitted_everywhere(&members, "account/bob", 9).await;
    // The replayed log gave each fresh replica the committed state again.
    decr(&members[2], "account/bob", 9, DEADLINE).await.unwrap();
    let refused = decr(&members[2], "account/bob", 1, DEADLINE).await;
    assert!(matches!(refused, Err(NodeError::InvariantViolation { .. })), "{refused:?}");
    fund(&members, "account/bob", 5);
    decr(&members[2], "account/bob", 1, DEADLINE).await.unwrap();
    admitted_everywhere(&members, "account/bob", 4).await;
    for member in &members {
        member.group.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_with_an_absurd_term_are_refused_before_raft_sees_them() {
    use calmkv::quorum::network::{Request, Response, TERM_MAX};
    use calmkv::replication::frame::{decode_frame, encode_frame};
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    let root = tempfile::tempdir().unwrap();
    let (proxies, members) = three_behind_proxies(root.path()).await;
    let leader = leader_of(&members).await;
    let terms: Vec<Option<u64>> = members.iter().map(|m| m.group.status().term).collect();
    let absurd = openraft::Vote::new(TERM_MAX + 1, 9);
    let requests = [
        Request::Vote(VoteRequest { vote: absurd, last_log_id: None }),
        Request::AppendEntries(AppendEntriesRequest {
            vote: openraft::Vote::new_committed(u64::MAX, 9),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }),
    ];
    for (i, member) in members.iter().enumerate() {
        for request in &requests {
            let mut stream = TcpStream::connect(&proxies[i].upstream).await.unwrap();
            stream.write_all(&encode_frame(request, None).unwrap()).await.unwrap();
            let mut prefix = [0u8; 4];
            stream.read_exact(&mut prefix).await.unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
            stream.read_exact(&mut body).await.unwrap();
            let response: Response = decode_frame(&body, None).unwrap();
            assert!(matches!(response, Response::Refused { .. }), "{response:?}");
        }
        assert_eq!(member.group.metrics().terms_refused.load(Ordering::Relaxed), 2);
    }
    assert_eq!(leader_of(&members).await, leader, "the leader is unmoved");
    let after: Vec<Option<u64>> = members.iter().map(|m| m.group.status().term).collect();
    assert_eq!(after, terms, "no voter's term moved");
    fund(&members, "account/t", 1);
    decr(&members[0], "account/t", 1, DEADLINE).await.unwrap();
    for member in &members {
        member.group.shutdown().await;
    }
}

/// One voter alone (its own leader) whose listener has `limits`.
async fn lone_voter(
    root: &Path,
    limits: calmkv::quorum::network::ListenerLimits,
) -> (String, Member) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let node = node();
    let config = QuorumConfig {
        voters: vec![addr.clone()],
        listen: Some(addr.clone()),
        id: None,
        secret: None,
        timings: timings(),
    };
    let store = Arc::new(SledStore::open(&root.join("lone"), Durability::Sync).unwrap());
    let group =
        QuorumGroup::start_with(config, limits, Some(listener), node.clone(), store).await.unwrap();
    (addr, Member { node, group })
}

fn small_limits() -> calmkv::quorum::network::ListenerLimits {
    calmkv::quorum::network::ListenerLimits {
        connections_max: 2,
        frame_bytes_max: 64 * 1024,
        handshake_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        frame_timeout: Duration::from_millis(300),
    }
}

/// Sends one request frame and reads the response frame.
async fn exchange(
    stream: &mut TcpStream,
    request: &calmkv::quorum::network::Request,
) -> std::io::Result<calmkv::quorum::network::Response> {
    use calmkv::replication::frame::{decode_frame, encode_frame};
    stream.write_all(&encode_frame(request, None).unwrap()).await?;
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    stream.read_exact(&mut body).await?;
    Ok(decode_frame(&body, None).unwrap())
}

fn sane_vote() -> calmkv::quorum::network::Request {
    calmkv::quorum::network::Request::Vote(openraft::raft::VoteRequest {
        vote: openraft::Vote::new(1, 9),
        last_log_id: None,
    })
}

/// Waits until `stream` is closed by the other end; how long that took.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut byte = [0u8; 1];
    match tokio::time::timeout(within, stream.read(&mut byte)).await {
        Ok(Ok(0)) | Ok(Err(_)) => start.elapsed(),
        Ok(Ok(_)) => panic!("the listener sent bytes instead of closing"),
        Err(_) => panic!("the listener kept the connection open past {within:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quorum_listener_caps_its_connections_and_answers_the_next_one_refused() {
    use calmkv::quorum::network::Response;
    let root = tempfile::tempdir().unwrap();
    let limits = calmkv::quorum::network::ListenerLimits {
        handshake_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        ..small_limits()
    };
    let (addr, voter) = lone_voter(root.path(), limits).await;
    let metrics = voter.group.metrics().clone();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let answer = exchange(&mut stream, &sane_vote()).await.unwrap();
        assert!(matches!(answer, Response::Vote(_)), "{answer:?}");
        held.push(stream);
    }
    // One past the cap: answered Refused (so a proposer knows nothing was
    // done) and closed.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    let answer = exchange(&mut third, &sane_vote()).await.unwrap();
    assert!(matches!(answer, Response::Refused { .. }), "{answer:?}");
    closed_within(&mut third, Duration::from_secs(5)).await;
    assert_eq!(metrics.connections_refused.load(Ordering::Relaxed), 1);
    // Once one closes, a new connection is served again.
    drop(held.pop());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        match exchange(&mut stream, &sane_vote()).await.unwrap() {
            Response::Vote(_) => break,
            Response::Refused { .. } => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    voter.group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quorum_listener_refuses_an_oversized_frame_unread_and_times_out_silent_peers() {
    let root = tempfile::tempdir().unwrap();
    let limits = small_limits();
    let (addr, voter) = lone_voter(root.path(), limits).await;
    let metrics = voter.group.metrics().clone();

    // A prefix past the bound: closed at once, without waiting for a body.
    let mut oversized = TcpStream::connect(&addr).await.unwrap();
    let announced = (limits.frame_bytes_max as u32 + 1).to_be_bytes();
    oversized.write_all(&announced).await.unwrap();
    let took = closed_within(&mut oversized, Duration::from_secs(5)).await;
    assert!(took < limits.frame_timeout, "it waited for the body: {took:?}");
    assert_eq!(metrics.frames_refused.load(Ordering::Relaxed), 1);

    // A connection that sends nothing: closed after the handshake timeout.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(took >= limits.handshake_timeout - Duration::from_millis(50), "{took:?}");
    // A frame announced within the bound that never arrives: closed after
    // the frame timeout.
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled.write_all(&1000u32.to_be_bytes()).await.unwrap();
    stalled.write_all(&[1, 2, 3]).await.unwrap();
    closed_within(&mut stalled, Duration::from_secs(5)).await;
    // A served connection that falls silent: closed after the idle timeout.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    exchange(&mut idle, &sane_vote()).await.unwrap();
    closed_within(&mut idle, Duration::from_secs(5)).await;
    assert_eq!(metrics.connections_timed_out.load(Ordering::Relaxed), 3);
    assert_eq!(metrics.frames_refused.load(Ordering::Relaxed), 1);

    // The voter still serves, and commits.
    let mut fresh = TcpStream::connect(&addr).await.unwrap();
    exchange(&mut fresh, &sane_vote()).await.unwrap();
    voter.node.apply(&counter("account/l", CounterOp::Incr(2))).unwrap();
    decr(&voter, "account/l", 1, DEADLINE).await.unwrap();
    voter.group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_larger_than_a_log_entry_is_refused_before_it_is_proposed() {
    let root = tempfile::tempdir().unwrap();
    let (_, voter) = lone_voter(root.path(), small_limits()).await;
    let big = vec![b'x'; calmkv::quorum::network::QUORUM_ENTRY_BYTES_MAX + 1];
    let op = Op {
        key: key("user/big"),
        action: Action::Put { value: big.into(), context: None, if_absent: false },
    };
    let refused = voter.group.propose(op, Instant::now() + DEADLINE).await;
    assert!(matches!(refused, Err(NodeError::LimitExceeded { .. })), "{:?}", refused.map(|_| ()));
    assert!(voter.group.admitted("user/big").is_none(), "nothing was proposed");
    voter.group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_catching_up_on_more_than_a_frame_of_entries_gets_them_in_several_frames() {
    let root = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        proxies.push(Proxy::start(listener.local_addr().unwrap().to_string()).await);
        listeners.push(listener);
    }
    let mut members = start_behind(&proxies, listeners, root.path()).await;
    let leader = leader_of(&members).await;
    let behind = (0..3).find(|i| *i as u64 + 1 != leader).unwrap();
    members[behind].group.shutdown().await;

    // Six entries of about 1 MiB each: more than one frame holds.
    let value = vec![b'v'; 1024 * 1024];
    let proposer = (0..3).find(|i| *i != behind).unwrap();
    for i in 0..6 {
        let op = Op {
            key: key(&format!("user/u{i}")),
            action: Action::Put { value: value.clone().into(), context: None, if_absent: false },
        };
        members[proposer].group.propose(op, Instant::now() + DEADLINE).await.unwrap();
    }
    drop(members.remove(behind));
    let listener = TcpListener::bind(&proxies[behind].upstream).await.unwrap();
    let voters: Vec<String> = proxies.iter().map(|p| p.addr.clone()).collect();
    let listen = Some((voters[behind].clone(), listener));
    let restarted = start(&voters, listen, &root.path().join(format!("v{behind}"))).await;
    members.insert(behind, restarted);
    let deadline = Instant::now() + DEADLINE;
    while members[behind].group.admitted("user/u5").is_none() {
        assert!(Instant::now() < deadline, "the voter never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for member in &members {
        member.group.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_cut_off_for_many_election_timeouts_does_not_depose_the_leader_when_it_returns() {
    let root = tempfile::tempdir().unwrap();
    let (proxies, members) = three_behind_proxies(root.path()).await;
    let leader = leader_of(&members).await;
    fund(&members, "account/p", 10);
    decr(&members[0], "account/p", 1, DEADLINE).await.unwrap();
    let term = members[(leader - 1) as usize].group.status().term;
    let cut = (0..3).find(|i| *i as u64 + 1 != leader).unwrap();
    let steady = |members: &[Member]| {
        for (i, member) in members.iter().enumerate() {
            let status = member.group.status();
            assert_eq!(status.term, term, "voter {} changed term: {status:?}", i + 1);
            if i != cut {
                assert_eq!(status.leader, Some(leader), "voter {}: {status:?}", i + 1);
            }
        }
    };

    // Nothing reaches the cut voter for ten lease periods (4 s; the lease is
    // 400 ms here): it keeps asking for pre-votes, which the others refuse,
    // and its term does not move. The others keep their leader meanwhile.
    proxies[cut].set(Mode::Block);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        steady(&members);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    decr(&members[(leader - 1) as usize], "account/p", 1, DEADLINE).await.unwrap();

    // Healed: it catches up under the same leader, in the same term.
    proxies[cut].set(Mode::Pass);
    admitted_everywhere(&members, "account/p", 8).await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        steady(&members);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(members[cut].group.status().leader, Some(leader));
    decr(&members[cut], "account/p", 1, DEADLINE).await.unwrap();
    admitted_everywhere(&members, "account/p", 7).await;
    for member in &members {
        member.group.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_repeated_idempotency_key_is_answered_once_and_a_reused_one_is_422() {
    use calmkv::server::{BoundListener, QuorumOptions, Server, ServerConfig};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let quorum_addr = listener.local_addr().unwrap().to_string();
    let invariants = Arc::new(Invariants::parse(BANK).unwrap());
    let mut config = ServerConfig::new(Config { invariants, ..Config::in_memory() }, "127.0.0.1:0");
    config.peer_addr = Some("127.0.0.1:0".into());
    config.quorum = Some(QuorumOptions {
        voters: vec![quorum_addr.clone()],
        listen: Some(quorum_addr),
        id: None,
        timings: timings(),
        listener: Some(BoundListener::new(listener)),
    });
    let server = Server::start(config).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while server.quorum().unwrap().status().leader.is_none() {
        assert!(Instant::now() < deadline, "no quorum leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}/v1/kv/account/h", server.http_addr());
    let post = |body: &'static str, key: &'static str| {
        http.post(&url).header("Idempotency-Key", key).body(body).send()
    };
    let funded = post(r#"{"counter":{"incr":10}}"#, "fund-1").await.unwrap();
    assert_eq!(funded.status(), 200);
    for _ in 0..2 {
        let debit = post(r#"{"counter":{"decr":3}}"#, "debit-1").await.unwrap();
        assert_eq!(debit.status(), 200);
        assert_eq!(debit.headers()["x-coordination"], "quorum");
        let body: serde_json::Value = debit.json().await.unwrap();
        assert_eq!(body["value"], 7, "{body}");
    }
    let reused = post(r#"{"counter":{"decr":4}}"#, "debit-1").await.unwrap();
    assert_eq!(reused.status(), 422);
    let body: serde_json::Value = reused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_key_reused", "{body}");
    let read: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(read["value"], 7, "debited once: {read}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_cut_after_sending_is_retried_on_another_voter_and_applies_once() {
    // Every coordinated entry carries an idempotency key (a fresh one when the
    // client sent none), so a non-voter whose forward may have reached a voter
    // can still ask the next one: the quorum answers a repeat with the first
    // outcome instead of applying it twice.
    let root = tempfile::tempdir().unwrap();
    let (proxies, members) = three_behind_proxies(root.path()).await;
    let leader = (leader_of(&members).await - 1) as usize;
    let voters: Vec<String> = proxies.iter().map(|p| p.addr.clone()).collect();
    let outsider = start(&voters, None, &root.path().join("outsider")).await;
    fund(&members, "account/f", 10);
    let funded = members[0].node.envelope(&key("account/f")).unwrap();
    outsider.node.merge(&key("account/f"), &funded).unwrap();
    // The outsider tries voters in turn from the first; the one it tries next
    // must be a follower (cutting the leader off would stop every path).
    let mut expected = 10;
    if leader == 0 {
        decr(&outsider, "account/f", 1, DEADLINE).await.unwrap();
        expected -= 1;
    }
    let cut = if leader == 0 { 1 } else { 0 };
    // That voter's proxy takes the connection and drops it: the request may
    // have been sent, so that attempt alone is "unknown".
    proxies[cut].set(Mode::Block);
    let applied = decr(&outsider, "account/f", 3, DEADLINE).await.expect("another voter answers");
    expected -= 3;
    assert!(applied.coordinated);
    assert_eq!(applied.state.value.counter().value(), expected);
    proxies[cut].set(Mode::Pass);
    admitted_everywhere(&members, "account/f", expected).await;
    for member in members.iter().chain([&outsider]) {
        member.group.shutdown().await;
    }
}
