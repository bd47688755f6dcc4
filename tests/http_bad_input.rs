//! Every malformed request and every crossed limit (docs/openapi.yaml, docs/design.md §9) gets its
//! typed error, and changes nothing: the whole store (data and digest index) is
//! compared before and after each request of the table.

mod common;

use bytes::Bytes;
use calmkv::Limits;
use common::{answer_of, chunked, send, TestServer};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "table-token";

/// Small bounds, so that crossing them takes small requests.
fn limits() -> Limits {
    Limits {
        value_bytes_max: 64,
        body_bytes_max: 256,
        member_bytes_max: 16,
        members_max: 3,
        siblings_max: 2,
        map_depth_max: 2,
        context_bytes_max: 512,
        ..Limits::default()
    }
}

/// One refused request: what it is, the request, and the answer it must get.
struct Row {
    what: &'static str,
    request: RequestBuilder,
    status: StatusCode,
    code: &'static str,
}

fn row(what: &'static str, request: RequestBuilder, status: u16, code: &'static str) -> Row {
    let status = StatusCode::from_u16(status).expect("a status");
    Row { what, request, status, code }
}

/// A map operation nested `depth` maps deep (`depth` 1 is a plain map op).
fn nested_map(depth: usize) -> Value {
    let mut op = json!({"counter": {"incr": 1}});
    for _ in 0..depth {
        op = json!({"map": {"update": {"f": op}}});
    }
    op
}

/// Keys the table runs against, each brought just up to a bound.
async fn populate(server: &TestServer) {
    let ok = |r: reqwest::Response| {
        assert!(r.status().is_success(), "setup failed: {}", r.status());
    };
    // A register with siblings_max (2) concurrent values.
    ok(send(server.put("/v1/kv/reg").body("one")).await);
    ok(send(server.put("/v1/kv/reg").body("two")).await);
    ok(send(server.put("/v1/kv/lww?type=lww").body("v")).await);
    // A set and a map with members_max (3) members.
    ok(send(server.post_op("set", json!({"set": {"add": ["a", "b", "c"]}}))).await);
    let fields = json!({"map": {"update": {
        "n": {"counter": {"incr": 1}}, "s": {"set": {"add": ["x"]}}, "r": {"register": "v"},
    }}});
    ok(send(server.post_op("map", fields)).await);
    // Counters whose share is at u64::MAX, at the top and in a map field.
    ok(send(server.post_op("count", json!({"counter": {"incr": u64::MAX}}))).await);
    let field = json!({"map": {"update": {"c": {"counter": {"decr": u64::MAX}}}}});
    ok(send(server.post_op("fields", field)).await);
}

fn rows(server: &TestServer) -> Vec<Row> {
    let put = |path: &str| server.put(path);
    let op = |key: &str, op: Value| server.post_op(key, op);
    let raw_op = |key: &str, body: &str| {
        let request = server.post(&format!("/v1/kv/{key}"));
        request.header("content-type", "application/json").body(body.to_string())
    };
    let long_key = "k".repeat(1025);
    let wide_key = "%C3%BC".repeat(513); // 513 × "ü": 513 characters, 1026 bytes
    let too_long_value = "v".repeat(65);
    let too_long_member = "m".repeat(17);
    let huge_body = "b".repeat(257);
    let huge_context = "A".repeat(513);
    let garbage_context = "Z2FyYmFnZQ"; // base64url of "garbage"
    let truncated_context = "AQ"; // base64url of the version byte alone: a truncated context

    vec![
        // Keys.
        row("empty key", put("/v1/kv/").body("v"), 400, "bad_key"),
        row("empty key, read", server.get("/v1/kv/"), 400, "bad_key"),
        row("empty key, delete", server.delete("/v1/kv/"), 400, "bad_key"),
        row("key over 1024 bytes", put(&format!("/v1/kv/{long_key}")).body("v"), 400, "bad_key"),
        row(
            "key over 1024 bytes of UTF-8",
            put(&format!("/v1/kv/{wide_key}")).body("v"),
            400,
            "bad_key",
        ),
        row("key with a control char", put("/v1/kv/a%01b").body("v"), 400, "bad_key"),
        row("key with DEL", put("/v1/kv/a%7Fb").body("v"), 400, "bad_key"),
        row("key with a newline, CRDT op", op("a%0Ab", json!({"flag": "enable"})), 400, "bad_key"),
        row("key with invalid UTF-8", put("/v1/kv/a%FFb").body("v"), 400, "bad_key"),
        row("key with truncated UTF-8", put("/v1/kv/a%C3").body("v"), 400, "bad_key"),
        row("scan prefix with a control char", server.get("/v1/kv?prefix=a%01"), 400, "bad_key"),
        // Sizes.
        row(
            "value over the value limit",
            put("/v1/kv/new").body(too_long_value.clone()),
            413,
            "payload_too_large",
        ),
        row(
            "lww value over the value limit",
            put("/v1/kv/new?type=lww").body(too_long_value.clone()),
            413,
            "payload_too_large",
        ),
        row(
            "map register over the value limit",
            op("new", json!({"map": {"update": {"f": {"register": too_long_value}}}})),
            413,
            "payload_too_large",
        ),
        row(
            "PUT body over the body limit",
            put("/v1/kv/new").body(huge_body.clone()),
            413,
            "payload_too_large",
        ),
        row(
            "POST body over the body limit",
            server.post("/v1/kv/new").body(huge_body),
            413,
            "payload_too_large",
        ),
        row(
            "valid JSON padded past the body limit",
            raw_op("count", &format!(r#"{{"counter":{{"incr":1}}}}{}"#, " ".repeat(240))),
            413,
            "payload_too_large",
        ),
        row(
            "chunked body past the body limit, without Content-Length",
            server.post("/v1/kv/count").body(chunked(vec![
                Bytes::from(r#"{"counter":{"incr":1}}"#),
                Bytes::from(" ".repeat(240)),
            ])),
            413,
            "payload_too_large",
        ),
        row(
            "set member over the member limit",
            op("new", json!({"set": {"add": [too_long_member]}})),
            400,
            "bad_request",
        ),
        // CRDT operations.
        row("malformed JSON", raw_op("count", r#"{"counter":"#), 400, "bad_request"),
        row("not JSON", raw_op("count", "incr 1"), 400, "bad_request"),
        row("empty body", raw_op("count", ""), 400, "bad_request"),
        row(
            "unknown counter operation",
            op("count", json!({"counter": {"mul": 2}})),
            400,
            "bad_request",
        ),
        row("unknown type", op("new", json!({"bogus": 1})), 400, "bad_request"),
        row(
            "negative increment",
            op("count", json!({"counter": {"incr": -1}})),
            400,
            "bad_request",
        ),
        row(
            "increment past u64",
            raw_op("count", r#"{"counter":{"incr":18446744073709551616}}"#),
            400,
            "bad_request",
        ),
        row(
            "two operations in one body",
            op("new", json!({"counter": {"incr": 1}, "flag": "enable"})),
            400,
            "bad_request",
        ),
        row("unknown flag operation", op("new", json!({"flag": "toggle"})), 400, "bad_request"),
        row("set op with nothing", op("set", json!({"set": {}})), 400, "bad_request"),
        row(
            "set op with empty add and remove",
            op("set", json!({"set": {"add": [], "remove": []}})),
            400,
            "bad_request",
        ),
        row(
            "member both added and removed",
            op("set", json!({"set": {"add": ["a", "z"], "remove": ["z"]}})),
            400,
            "bad_request",
        ),
        row("map op with nothing", op("map", json!({"map": {}})), 400, "bad_request"),
        row(
            "map field both updated and removed",
            op("map", json!({"map": {"update": {"n": {"counter": {"incr": 1}}}, "remove": ["n"]}})),
            400,
            "bad_request",
        ),
        row("map nested deeper than the limit", op("new", nested_map(3)), 400, "bad_request"),
        // Types.
        row("incr on a set key", op("set", json!({"counter": {"incr": 1}})), 409, "type_mismatch"),
        row("PUT on a counter key", put("/v1/kv/count").body("v"), 409, "type_mismatch"),
        row(
            "lww PUT on a register key",
            put("/v1/kv/reg?type=lww").body("v"),
            409,
            "type_mismatch",
        ),
        row("register PUT on an lww key", put("/v1/kv/lww").body("v"), 409, "type_mismatch"),
        row(
            "set op on a register key",
            op("reg", json!({"set": {"add": ["a"]}})),
            409,
            "type_mismatch",
        ),
        row(
            "map field of another type",
            op("map", json!({"map": {"update": {"n": {"set": {"add": ["a"]}}}}})),
            409,
            "type_mismatch",
        ),
        row(
            "map op whose first field is fine and second is of another type",
            op(
                "map",
                json!({"map": {"update": {"a": {"flag": "enable"}, "n": {"flag": "enable"}}}}),
            ),
            409,
            "type_mismatch",
        ),
        // Headers and query parameters.
        row(
            "X-Context not base64",
            put("/v1/kv/reg").header("X-Context", "not base64!").body("v"),
            400,
            "bad_request",
        ),
        row(
            "X-Context of garbage",
            put("/v1/kv/reg").header("X-Context", garbage_context).body("v"),
            400,
            "bad_request",
        ),
        row(
            "X-Context truncated",
            put("/v1/kv/reg").header("X-Context", truncated_context).body("v"),
            400,
            "bad_request",
        ),
        row(
            "X-Context oversized",
            put("/v1/kv/reg").header("X-Context", huge_context.clone()).body("v"),
            400,
            "bad_request",
        ),
        row(
            "X-Context on delete, garbage",
            server.delete("/v1/kv/reg").header("X-Context", garbage_context),
            400,
            "bad_request",
        ),
        row(
            "X-Context on delete, oversized",
            server.delete("/v1/kv/reg").header("X-Context", huge_context),
            400,
            "bad_request",
        ),
        row(
            "If-None-Match other than *",
            put("/v1/kv/new").header("If-None-Match", "\"abc\"").body("v"),
            400,
            "bad_request",
        ),
        row(
            "If-None-Match on lww",
            put("/v1/kv/new?type=lww").header("If-None-Match", "*").body("v"),
            400,
            "bad_request",
        ),
        row(
            "If-None-Match * on a key with a value",
            put("/v1/kv/reg").header("If-None-Match", "*").body("v"),
            412,
            "precondition_failed",
        ),
        row("type=bogus", put("/v1/kv/new?type=bogus").body("v"), 400, "bad_request"),
        row("type=counter on PUT", put("/v1/kv/new?type=counter").body("v"), 400, "bad_request"),
        row("unknown PUT parameter", put("/v1/kv/new?ttl=5").body("v"), 400, "bad_request"),
        row("scan limit=0", server.get("/v1/kv?limit=0"), 400, "bad_request"),
        row("unknown consistency", server.get("/v1/kv/s?consistency=most"), 400, "bad_request"),
        row(
            "min_harvest above 1",
            server.get("/v1/kv/s?consistency=all&min_harvest=1.5"),
            400,
            "bad_request",
        ),
        row("min_harvest below 0", server.get("/v1/kv/s?min_harvest=-0.1"), 400, "bad_request"),
        row(
            "read timeout_ms=0",
            server.get("/v1/kv/s?consistency=one&timeout_ms=0"),
            400,
            "bad_request",
        ),
        row(
            "read timeout_ms past the request timeout",
            server.get("/v1/kv/s?consistency=one&timeout_ms=99999999"),
            400,
            "bad_request",
        ),
        row("unknown w", put("/v1/kv/w?w=2").body("v"), 400, "bad_request"),
        row("write timeout_ms=0", put("/v1/kv/w?w=all&timeout_ms=0").body("v"), 400, "bad_request"),
        row(
            "unknown write parameter",
            server.post("/v1/kv/w?x=1").body(r#"{"flag":"enable"}"#),
            400,
            "bad_request",
        ),
        row("unknown delete parameter", server.delete("/v1/kv/w?x=1"), 400, "bad_request"),
        row("scan limit not a number", server.get("/v1/kv?limit=ten"), 400, "bad_request"),
        row("scan limit negative", server.get("/v1/kv?limit=-1"), 400, "bad_request"),
        row(
            "scan unknown parameter",
            server.get("/v1/kv?prefix=a&consistency=bogus"),
            400,
            "bad_request",
        ),
        // Bounds of the CRDTs.
        row(
            "third blind PUT past siblings_max",
            put("/v1/kv/reg").body("three"),
            409,
            "too_many_siblings",
        ),
        row(
            "set add past members_max",
            op("set", json!({"set": {"add": ["d"]}})),
            409,
            "limit_exceeded",
        ),
        row(
            "new set past members_max in one op",
            op("new", json!({"set": {"add": ["w", "x", "y", "z"]}})),
            409,
            "limit_exceeded",
        ),
        row(
            "map field past members_max",
            op("map", json!({"map": {"update": {"f": {"flag": "enable"}}}})),
            409,
            "limit_exceeded",
        ),
        row(
            "counter overflow",
            op("count", json!({"counter": {"incr": u64::MAX}})),
            409,
            "limit_exceeded",
        ),
        row(
            "counter overflow in a map field",
            op("fields", json!({"map": {"update": {"c": {"counter": {"decr": 1}}}}})),
            409,
            "limit_exceeded",
        ),
        // Auth, routes and methods.
        row(
            "missing token",
            server.client.put(server.url("/v1/kv/new")).body("v"),
            401,
            "unauthorized",
        ),
        row(
            "wrong token",
            server.client.put(server.url("/v1/kv/new")).bearer_auth("nope").body("v"),
            401,
            "unauthorized",
        ),
        row(
            "missing token on a CRDT op",
            server.client.post(server.url("/v1/kv/count")).json(&json!({"counter": {"incr": 1}})),
            401,
            "unauthorized",
        ),
        row(
            "missing token on a delete",
            server.client.delete(server.url("/v1/kv/reg")),
            401,
            "unauthorized",
        ),
        row("unknown route", server.put("/v1/kvs/new").body("v"), 404, "not_found"),
        row(
            "wrong method",
            server.request(Method::PATCH, "/v1/kv/reg").body("v"),
            405,
            "method_not_allowed",
        ),
    ]
}

#[tokio::test]
async fn every_bad_request_gets_its_typed_error_and_changes_nothing() {
    let server = TestServer::builder().limits(limits()).auth_token(TOKEN).start().await;
    populate(&server).await;
    let mut failures = Vec::new();
    for Row { what, request, status, code } in rows(&server) {
        let before = server.store_snapshot();
        let (got_status, got_code, body) = answer_of(send(request).await).await;
        if (got_status, got_code.as_deref()) != (status, Some(code)) {
            failures.push(format!("{what}: expected {status} {code}, got {got_status} {body:?}"));
        }
        if server.store_snapshot() != before {
            failures.push(format!("{what}: the store changed"));
        }
    }
    assert!(failures.is_empty(), "{} rows failed:\n{}", failures.len(), failures.join("\n"));
    server.stop().await;
}

/// The other side of each bound: a request exactly at it is served, so the
/// refusals above come from the bound and not from something else.
#[tokio::test]
async fn requests_exactly_at_every_limit_are_served() {
    let server = TestServer::builder().limits(limits()).auth_token(TOKEN).start().await;
    let key = format!("/v1/kv/{}", "k".repeat(1024));
    let wide_key = format!("/v1/kv/{}", "%C3%BC".repeat(512)); // 1024 bytes of UTF-8
    let member = "m".repeat(16);
    let requests = [
        ("a key of 1024 bytes", server.put(&key).body("v")),
        ("a key of 1024 bytes of UTF-8", server.put(&wide_key).body("v")),
        ("a value at the value limit", server.put("/v1/kv/value").body("v".repeat(64))),
        ("an lww value at the value limit", server.put("/v1/kv/lww?type=lww").body("v".repeat(64))),
        ("a body at the body limit", {
            // A small operation padded with JSON whitespace to exactly 256 bytes.
            let body = r#"{"set":{"add":["padded"]}}"#;
            server.post("/v1/kv/padded").body(format!("{body}{}", " ".repeat(256 - body.len())))
        }),
        (
            "a member at the member limit",
            server.post_op("members", json!({"set": {"add": [member]}})),
        ),
        ("a set at members_max", server.post_op("full", json!({"set": {"add": ["a", "b", "c"]}}))),
        ("a map nested at the depth limit", server.post_op("nested", nested_map(2))),
        ("a register at siblings_max", server.put("/v1/kv/value").body("sibling")),
        ("a scan of limit 1", server.get("/v1/kv?limit=1")),
    ];
    for (what, request) in requests {
        let (status, _, body) = answer_of(send(request).await).await;
        assert!(status.is_success(), "{what}: {status} {body}");
    }
    server.stop().await;
}
