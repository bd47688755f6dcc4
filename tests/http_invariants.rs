//! Invariants on one node over HTTP and embedded: the unsafe direction is
//! admitted exactly (a single node is the only replica), refusals leave the
//! store unchanged, and `/v1/invariants` and `/v1/explain` describe what
//! routing does.

mod common;

use common::{error_of, json_of, send, TestServer};
use reqwest::StatusCode;

const BANK: &str = r#"
[[invariant]]
keys = "account/*"
type = "counter"
min = 0

[[invariant]]
keys = "username/*"
unique = true

[[invariant]]
keys = "cart/*"
type = "set"
max_size = 2
"#;

async fn balance(server: &TestServer, key: &str) -> serde_json::Value {
    json_of(send(server.get(&format!("/v1/kv/{key}"))).await, StatusCode::OK).await["value"].clone()
}

#[tokio::test]
async fn decrements_are_coordinated_and_refused_below_min_with_the_store_unchanged() {
    let server = TestServer::builder().invariants(BANK).start().await;
    let post = |body: &'static str| send(server.post("/v1/kv/account/alice").body(body));
    let incr = post(r#"{"counter":{"incr":10}}"#).await;
    assert_eq!(incr.status(), StatusCode::OK);
    assert_eq!(incr.headers()["x-coordination"], "none", "an increment is local");
    let decr = post(r#"{"counter":{"decr":7}}"#).await;
    assert_eq!(decr.status(), StatusCode::OK);
    assert_eq!(decr.headers()["x-coordination"], "quorum");
    let before = server
        .node()
        .envelope(&calmkv::Key::new("account/alice", server.node().limits()).unwrap())
        .unwrap();
    let refused = post(r#"{"counter":{"decr":4}}"#).await;
    assert_eq!(error_of(refused).await, (StatusCode::CONFLICT, "invariant_violation".to_string()));
    let after = server
        .node()
        .envelope(&calmkv::Key::new("account/alice", server.node().limits()).unwrap())
        .unwrap();
    assert_eq!(before, after, "a refused decrement leaves no trace");
    assert_eq!(balance(&server, "account/alice").await, 3);
    // Undeclared keys go below zero freely.
    let free = send(server.post("/v1/kv/visits").body(r#"{"counter":{"decr":4}}"#)).await;
    assert_eq!(free.status(), StatusCode::OK);
    assert_eq!(free.headers()["x-coordination"], "none");
}

#[tokio::test]
async fn a_unique_key_is_created_once_and_updated_with_its_context() {
    let server = TestServer::builder().invariants(BANK).start().await;
    let first = send(server.put("/v1/kv/username/ann").body("owner-1")).await;
    assert_eq!(first.status(), StatusCode::CREATED, "a claim is a creation");
    assert_eq!(first.headers()["x-coordination"], "quorum");
    let context = first.headers()["x-context"].to_str().unwrap().to_string();
    // A second creation, with or without If-None-Match, is refused.
    let again = send(server.put("/v1/kv/username/ann").body("owner-2")).await;
    assert_eq!(
        error_of(again).await,
        (StatusCode::PRECONDITION_FAILED, "precondition_failed".to_string())
    );
    let again =
        send(server.put("/v1/kv/username/ann").header("If-None-Match", "*").body("owner-2")).await;
    assert_eq!(error_of(again).await.0, StatusCode::PRECONDITION_FAILED);
    // The owner updates with the context of its read: local.
    let update =
        send(server.put("/v1/kv/username/ann").header("X-Context", context).body("owner-1b")).await;
    assert_eq!(update.status(), StatusCode::NO_CONTENT);
    assert_eq!(update.headers()["x-coordination"], "none");
    let read = send(server.get("/v1/kv/username/ann")).await;
    assert_eq!(read.text().await.unwrap(), "owner-1b");
}

#[tokio::test]
async fn a_set_stops_at_max_size_and_an_operation_of_another_type_is_refused() {
    let server = TestServer::builder().invariants(BANK).start().await;
    let add = |m: &'static str| {
        send(server.post("/v1/kv/cart/bob").body(format!(r#"{{"set":{{"add":["{m}"]}}}}"#)))
    };
    assert_eq!(add("a").await.status(), StatusCode::OK);
    assert_eq!(add("b").await.status(), StatusCode::OK);
    assert_eq!(error_of(add("c").await).await.1, "invariant_violation");
    let wrong = send(server.post("/v1/kv/cart/bob").body(r#"{"counter":{"incr":1}}"#)).await;
    assert_eq!(error_of(wrong).await, (StatusCode::CONFLICT, "type_mismatch".to_string()));
    let members = balance(&server, "cart/bob").await;
    assert_eq!(members, serde_json::json!(["a", "b"]));
}

#[tokio::test]
async fn invariants_and_explain_describe_the_routing() {
    let server = TestServer::builder().invariants(BANK).start().await;
    let all = json_of(send(server.get("/v1/invariants")).await, StatusCode::OK).await;
    let expected_hash = format!("{:016x}", server.node().invariants().hash());
    assert_eq!(all["hash"], expected_hash.as_str());
    let declarations = all["invariants"].as_array().unwrap();
    assert_eq!(declarations.len(), 3);
    let account = &declarations[0];
    assert_eq!(account["keys"], "account/*");
    let routes: Vec<(String, String)> = account["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["op"].as_str().unwrap().to_string(), v["route"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        routes,
        [("incr", "local"), ("decr", "quorum"), ("delete", "quorum")]
            .map(|(o, r)| (o.to_string(), r.to_string()))
    );

    let explain =
        json_of(send(server.get("/v1/explain?key=account/alice&op=decr")).await, StatusCode::OK)
            .await;
    assert_eq!(explain["route"], "quorum");
    assert_eq!(explain["counterexample"]["merged"], "value -1");
    let undeclared =
        json_of(send(server.get("/v1/explain?key=visits&op=decr")).await, StatusCode::OK).await;
    assert_eq!(undeclared["route"], "local");
    assert_eq!(undeclared["invariant"], serde_json::Value::Null);
    for bad in [
        "/v1/explain?key=account/a&op=explode",
        "/v1/explain?key=account/a&op=add",
        "/v1/explain?key=x",
    ] {
        assert_eq!(
            error_of(send(server.get(bad)).await).await,
            (StatusCode::BAD_REQUEST, "bad_request".to_string()),
            "{bad}"
        );
    }
}

#[test]
fn the_embedded_db_enforces_the_same_invariants() {
    let config = calmkv::Config {
        invariants: std::sync::Arc::new(calmkv::invariants::Invariants::parse(BANK).unwrap()),
        ..calmkv::Config::in_memory()
    };
    let db = calmkv::Db::open_with(config).unwrap();
    db.counter("account/a").incr(5).unwrap();
    db.counter("account/a").decr(5).unwrap();
    let refused = db.counter("account/a").decr(1);
    assert!(matches!(refused, Err(calmkv::NodeError::InvariantViolation { .. })), "{refused:?}");
    assert_eq!(db.counter("account/a").get().unwrap(), 0);
    db.register("username/z").put("me", None).unwrap();
    let twice = db.register("username/z").put("you", None);
    assert!(matches!(twice, Err(calmkv::NodeError::PreconditionFailed { .. })), "{twice:?}");
}
