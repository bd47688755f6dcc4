//! Contexts a client sends back cannot hurt a key (issue: trust boundaries,
//! findings 2 and 5). A context is restricted to what the replica has seen
//! before it is used, so a forged one can neither exhaust a node's dots,
//! poison a key for later writers, nor grow the key's stored context.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use calmkv::Key;
use calmkv_crdts::{CausalContext, Dot, NodeId, VersionVector};
use common::{send, TestServer};
use rand::Rng;
use serde_json::json;

/// The `X-Context` token of a context, as the server writes it.
fn context_token(ctx: &CausalContext) -> String {
    URL_SAFE_NO_PAD.encode(calmkv_crdts::encode(ctx).unwrap())
}

/// A context claiming `claims` (node, counter) pairs as seen.
fn forged(claims: &[(u64, u64)]) -> String {
    let mut vv = VersionVector::new();
    for &(node, counter) in claims {
        vv.observe(NodeId(node), counter);
    }
    context_token(&CausalContext::from(vv))
}

async fn stored_context(server: &TestServer, key: &str) -> CausalContext {
    let key = Key::new(key.to_string(), server.node().limits()).unwrap();
    server.node().envelope(&key).unwrap().value.context().clone()
}

#[tokio::test]
async fn a_context_claiming_a_nodes_last_dot_poisons_nothing() {
    let server = TestServer::start().await;
    let me = server.node().id().0;
    for claim in [u64::MAX, u64::MAX - 1] {
        let token = forged(&[(me, claim), (u64::MAX, u64::MAX), (7, claim)]);
        // Every kind of write, before and after the forged context was used.
        let put = send(server.put("/v1/kv/reg").header("X-Context", &token).body("a")).await;
        assert!(put.status().is_success(), "put with a forged context: {}", put.status());
        let del = send(server.delete("/v1/kv/reg").header("X-Context", &token)).await;
        assert!(del.status().is_success(), "delete with a forged context: {}", del.status());
        for _ in 0..2 {
            let put = send(server.put("/v1/kv/reg").body("b")).await;
            assert!(put.status().is_success(), "a later put: {}", put.status());
            for (key, op) in [
                ("cnt", json!({"counter": {"incr": 1}})),
                ("set", json!({"set": {"add": ["x"]}})),
                ("map", json!({"map": {"update": {"f": {"counter": {"incr": 1}}}}})),
                ("flag", json!({"flag": "enable"})),
            ] {
                let answer = send(server.post_op(key, op)).await;
                assert!(answer.status().is_success(), "{key}: {}", answer.status());
            }
        }
        let ctx = stored_context(&server, "reg").await;
        assert!(ctx.highest(NodeId(me)) < 100, "forged dots reached the stored context: {ctx:?}");
        assert_eq!(ctx.highest(NodeId(7)), 0, "a node that never wrote entered the context");
        assert_eq!(ctx.highest(NodeId(u64::MAX)), 0, "the coordinator's actor entered the context");
    }
    server.stop().await;
}

#[tokio::test]
async fn contexts_of_random_entries_do_not_grow_the_stored_context() {
    let server = TestServer::start().await;
    let mut rng = rand::rng();
    for _ in 0..150 {
        // What the client read, plus 2,000 made-up entries (about 62 KB).
        let mut ctx = stored_context(&server, "big").await;
        for _ in 0..2_000 {
            ctx.insert(Dot::new(NodeId(rng.random()), rng.random_range(1..u64::MAX)));
        }
        let token = context_token(&ctx);
        let put = send(server.put("/v1/kv/big").header("X-Context", &token).body("v")).await;
        assert!(put.status().is_success(), "{}", put.status());
    }
    let ctx = stored_context(&server, "big").await;
    assert!(ctx.entries() <= 1, "the stored context grew to {} entries", ctx.entries());
    let read = send(server.get("/v1/kv/big")).await;
    assert!(read.status().is_success());
    server.stop().await;
}

#[tokio::test]
async fn a_real_context_still_supersedes_what_it_read() {
    let server = TestServer::start().await;
    send(server.put("/v1/kv/k").body("one")).await;
    send(server.put("/v1/kv/k").body("two")).await;
    let read = send(server.get("/v1/kv/k")).await;
    assert_eq!(read.status().as_u16(), 300, "two blind puts make siblings");
    let token = read.headers()["x-context"].to_str().unwrap().to_string();
    // The real context plus forged claims: the real part still supersedes.
    let mut ctx: CausalContext =
        calmkv_crdts::decode(&URL_SAFE_NO_PAD.decode(&token).unwrap()).unwrap();
    ctx.insert(Dot::new(NodeId(99), 5));
    let put =
        send(server.put("/v1/kv/k").header("X-Context", context_token(&ctx)).body("three")).await;
    assert!(put.status().is_success());
    let read = send(server.get("/v1/kv/k")).await;
    assert_eq!(read.status().as_u16(), 200);
    assert_eq!(read.text().await.unwrap(), "three");
    server.stop().await;
}

#[test]
fn a_write_that_would_grow_a_keys_context_past_its_limit_is_refused_and_changes_nothing() {
    use calmkv::{Action, Config, Limits, NodeError, Op};
    let limits = Limits { context_entries_max: 2, ..Limits::default() };
    let node = Config { limits: limits.clone(), ..Config::in_memory() }.open_node().unwrap();
    let key = Key::new("shared".to_string(), &limits).unwrap();
    let put = |value: &'static str| Op {
        key: key.clone(),
        action: Action::Put { value: value.into(), context: None, if_absent: false },
    };
    // Two other nodes wrote the key: its context names two writers.
    for value in ["from b", "from c"] {
        let other = Config::in_memory().open_node().unwrap();
        let state = other.apply(&put(value)).unwrap().state;
        node.merge(&key, &state).unwrap();
    }
    let before = node.envelope(&key).unwrap();
    assert_eq!(before.value.context().entries(), 2);
    // This node's own write would add a third entry.
    let refused = node.apply(&put("from a"));
    assert!(matches!(refused, Err(NodeError::LimitExceeded { .. })), "{refused:?}");
    assert_eq!(node.envelope(&key).unwrap(), before, "a refused write changed the key");
}
