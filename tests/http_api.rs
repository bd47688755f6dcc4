//! The single-node HTTP API (docs/openapi.yaml) against a real server on a loopback
//! port: every route, every type, auth, load shedding and the request timeout.

mod common;

use calmkv::Limits;
use common::{error_of, header, json_of, send, wait_until, HeldBody, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The body of a successful raw read, checking status and content type.
async fn raw_of(response: reqwest::Response) -> String {
    let status = response.status();
    let content_type = header(&response, "content-type").map(str::to_string);
    let body = response.text().await.expect("a body");
    assert_eq!(status, StatusCode::OK, "body: {body}");
    assert_eq!(content_type.as_deref(), Some("application/octet-stream"));
    body
}

/// The `X-Context` token of a response (every read and write answers one).
fn context_of(response: &reqwest::Response) -> String {
    let token = header(response, "x-context").expect("an X-Context header").to_string();
    assert!(!token.is_empty());
    token
}

/// Checks the headers every write answers with; returns the new context.
fn written(response: &reqwest::Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    assert_eq!(header(response, "x-coordination"), Some("none"));
    context_of(response)
}

/// Keys of every page of a scan of `prefix`, `limit` at a time; checks each page
/// holds at most `limit` keys.
async fn scan_all(server: &TestServer, prefix: &str, limit: usize) -> (Vec<String>, usize) {
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    for pages in 1..=100 {
        let mut query = vec![("prefix", prefix.to_string()), ("limit", limit.to_string())];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let page = json_of(send(server.get("/v1/kv").query(&query)).await, StatusCode::OK).await;
        let page_keys = page["keys"].as_array().expect("keys");
        assert!(page_keys.len() <= limit, "page {page} is larger than {limit}");
        keys.extend(page_keys.iter().map(|k| k["key"].as_str().expect("a key").to_string()));
        match &page["cursor"] {
            Value::Null => return (keys, pages),
            Value::String(next) => cursor = Some(next.clone()),
            other => panic!("cursor {other} is neither null nor a string"),
        }
    }
    panic!("the scan of {prefix:?} did not end within 100 pages");
}

#[tokio::test]
async fn a_put_register_reads_back_as_raw_bytes_with_a_context() {
    let server = TestServer::start().await;
    let put = send(server.put("/v1/kv/greeting").body("hello")).await;
    written(&put, StatusCode::NO_CONTENT);

    let get = send(server.get("/v1/kv/greeting")).await;
    context_of(&get);
    assert_eq!(raw_of(get).await, "hello");
    server.stop().await;
}

#[tokio::test]
async fn keys_may_hold_slashes_spaces_and_non_ascii_characters() {
    let server = TestServer::start().await;
    let put = send(server.put("/v1/kv/dir/sub%20key%C3%BC").body("v")).await;
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    // The key is the decoded path: an encoded slash names the same key.
    assert_eq!(raw_of(send(server.get("/v1/kv/dir%2Fsub%20key%C3%BC")).await).await, "v");
    let (keys, _) = scan_all(&server, "dir/", 10).await;
    assert_eq!(keys, ["dir/sub keyü"]);
    server.stop().await;
}

#[tokio::test]
async fn two_blind_puts_are_siblings_until_a_put_with_their_context_resolves_them() {
    let server = TestServer::start().await;
    for value in [b"text".to_vec(), vec![0xff, 0x00]] {
        let put = send(server.put("/v1/kv/doc").body(value)).await;
        assert_eq!(put.status(), StatusCode::NO_CONTENT);
    }

    let conflict = send(server.get("/v1/kv/doc")).await;
    let header_context = context_of(&conflict);
    let body = json_of(conflict, StatusCode::MULTIPLE_CHOICES).await;
    assert_eq!(body["type"], "register");
    assert_eq!(body["context"], header_context.as_str());
    let mut siblings: Vec<String> =
        body["siblings"].as_array().expect("siblings").iter().map(Value::to_string).collect();
    siblings.sort();
    // A value that is not UTF-8 is shown as base64.
    assert_eq!(siblings, [r#""text""#, r#"{"base64":"/wA="}"#]);

    let resolve =
        send(server.put("/v1/kv/doc").header("X-Context", &header_context).body("merged")).await;
    written(&resolve, StatusCode::NO_CONTENT);
    assert_eq!(raw_of(send(server.get("/v1/kv/doc")).await).await, "merged");
    server.stop().await;
}

#[tokio::test]
async fn if_none_match_star_creates_once_and_then_refuses_with_412() {
    let server = TestServer::start().await;
    let create =
        send(server.put("/v1/kv/user/ann").header("If-None-Match", "*").body("first")).await;
    written(&create, StatusCode::CREATED);

    let again =
        send(server.put("/v1/kv/user/ann").header("If-None-Match", "*").body("second")).await;
    assert_eq!(
        error_of(again).await,
        (StatusCode::PRECONDITION_FAILED, "precondition_failed".into())
    );
    assert_eq!(raw_of(send(server.get("/v1/kv/user/ann")).await).await, "first");

    // A deleted key is absent again: it can be created once more.
    let delete = send(server.delete("/v1/kv/user/ann")).await;
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    let recreate =
        send(server.put("/v1/kv/user/ann").header("If-None-Match", "*").body("third")).await;
    assert_eq!(recreate.status(), StatusCode::CREATED);
    assert_eq!(raw_of(send(server.get("/v1/kv/user/ann")).await).await, "third");
    server.stop().await;
}

#[tokio::test]
async fn an_lww_register_keeps_the_later_write_without_siblings() {
    let server = TestServer::start().await;
    for value in ["one", "two", "three"] {
        let put = send(server.put("/v1/kv/latest?type=lww").body(value)).await;
        assert_eq!(put.status(), StatusCode::NO_CONTENT);
        assert_eq!(header(&put, "x-coordination"), Some("none"));
    }
    assert_eq!(raw_of(send(server.get("/v1/kv/latest")).await).await, "three");

    let delete = send(server.delete("/v1/kv/latest")).await;
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    let gone = send(server.get("/v1/kv/latest")).await;
    assert_eq!(error_of(gone).await, (StatusCode::NOT_FOUND, "not_found".into()));
    server.stop().await;
}

#[tokio::test]
async fn counter_increments_and_decrements_answer_the_new_value() {
    let server = TestServer::start().await;
    let incr = send(server.post_op("visits", json!({"counter": {"incr": 5}}))).await;
    let context = written(&incr, StatusCode::OK);
    let body = json_of(incr, StatusCode::OK).await;
    assert_eq!(body["type"], "counter");
    assert_eq!(body["value"], 5);
    assert_eq!(body["context"], context.as_str());

    let decr = send(server.post_op("visits", json!({"counter": {"decr": 7}}))).await;
    assert_eq!(json_of(decr, StatusCode::OK).await["value"], -2);

    let read = json_of(send(server.get("/v1/kv/visits")).await, StatusCode::OK).await;
    assert_eq!(read["type"], "counter");
    assert_eq!(read["value"], -2);
    assert!(read["context"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn a_counter_past_the_i64_range_answers_its_exact_value() {
    let server = TestServer::start().await;
    let below = "-18446744073709551615"; // -(2^64 - 1): no i64 or u64 holds it
    let decr = send(server.post_op("deep", json!({"counter": {"decr": u64::MAX}}))).await;
    assert_eq!(decr.status(), StatusCode::OK);
    let body = decr.text().await.unwrap();
    assert!(body.contains(&format!(r#""value":{below},"#)), "{body}");
    let read = send(server.get("/v1/kv/deep")).await;
    assert_eq!(read.status(), StatusCode::OK);
    let body = read.text().await.unwrap();
    assert!(body.contains(&format!(r#""value":{below},"#)), "{body}");

    let field = json!({"map": {"update": {"c": {"counter": {"decr": u64::MAX}}}}});
    let map = send(server.post_op("deep-map", field)).await;
    assert_eq!(map.status(), StatusCode::OK);
    let body = send(server.get("/v1/kv/deep-map")).await.text().await.unwrap();
    assert!(body.contains(&format!(r#""c":{{"type":"counter","value":{below}}}"#)), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn set_adds_and_removes_answer_the_members() {
    let server = TestServer::start().await;
    let add = send(server.post_op("cart", json!({"set": {"add": ["pear", "apple", "fig"]}}))).await;
    assert_eq!(json_of(add, StatusCode::OK).await["value"], json!(["apple", "fig", "pear"]));

    let both = json!({"set": {"add": ["kiwi"], "remove": ["apple", "not-there"]}});
    let both = send(server.post_op("cart", both)).await;
    written(&both, StatusCode::OK);
    assert_eq!(json_of(both, StatusCode::OK).await["value"], json!(["fig", "kiwi", "pear"]));

    let read = json_of(send(server.get("/v1/kv/cart")).await, StatusCode::OK).await;
    assert_eq!(read["type"], "set");
    assert_eq!(read["value"], json!(["fig", "kiwi", "pear"]));

    // Removing the last members leaves an empty set, which reads as absent.
    let empty =
        send(server.post_op("cart", json!({"set": {"remove": ["fig", "kiwi", "pear"]}}))).await;
    let empty = json_of(empty, StatusCode::OK).await;
    assert_eq!((&empty["type"], &empty["value"]), (&json!("set"), &json!([])));
    let absent = send(server.get("/v1/kv/cart")).await;
    assert_eq!(error_of(absent).await, (StatusCode::NOT_FOUND, "not_found".into()));
    server.stop().await;
}

#[tokio::test]
async fn map_operations_update_nested_fields_and_remove_fields() {
    let server = TestServer::start().await;
    let create = json!({"map": {"update": {
        "qty": {"counter": {"incr": 2}},
        "name": {"register": "widget"},
        "tags": {"set": {"add": ["new"]}},
        "options": {"map": {"update": {"gift": {"flag": "enable"}}}},
    }}});
    let created = json_of(send(server.post_op("order/1", create)).await, StatusCode::OK).await;
    assert_eq!(created["type"], "map");
    assert_eq!(
        created["value"],
        json!({
            "qty": {"type": "counter", "value": 2},
            "name": {"type": "register", "value": "widget"},
            "tags": {"type": "set", "value": ["new"]},
            "options": {"type": "map", "value": {"gift": {"type": "flag", "value": true}}},
        })
    );

    let change = json!({"map": {
        "update": {
            "qty": {"counter": {"incr": 1}},
            "options": {"map": {"update": {"note": {"register": "thanks"}}}},
        },
        "remove": ["name", "tags"],
    }});
    let changed = send(server.post_op("order/1", change)).await;
    written(&changed, StatusCode::OK);
    let expected = json!({
        "qty": {"type": "counter", "value": 3},
        "options": {"type": "map", "value": {
            "gift": {"type": "flag", "value": true},
            "note": {"type": "register", "value": "thanks"},
        }},
    });
    assert_eq!(json_of(changed, StatusCode::OK).await["value"], expected);
    let read = json_of(send(server.get("/v1/kv/order/1")).await, StatusCode::OK).await;
    assert_eq!((&read["type"], &read["value"]), (&json!("map"), &expected));
    server.stop().await;
}

#[tokio::test]
async fn a_flag_enables_and_a_disabled_flag_reads_as_absent() {
    let server = TestServer::start().await;
    let enable = send(server.post_op("feature/x", json!({"flag": "enable"}))).await;
    assert_eq!(json_of(enable, StatusCode::OK).await["value"], true);
    let read = json_of(send(server.get("/v1/kv/feature/x")).await, StatusCode::OK).await;
    assert_eq!((&read["type"], &read["value"]), (&json!("flag"), &json!(true)));

    let disable = send(server.post_op("feature/x", json!({"flag": "disable"}))).await;
    written(&disable, StatusCode::OK);
    let disabled = json_of(disable, StatusCode::OK).await;
    assert_eq!((&disabled["type"], &disabled["value"]), (&json!("flag"), &json!(false)));
    let absent = send(server.get("/v1/kv/feature/x")).await;
    assert_eq!(error_of(absent).await, (StatusCode::NOT_FOUND, "not_found".into()));
    server.stop().await;
}

#[tokio::test]
async fn a_deleted_key_reads_404_and_a_fresh_write_starts_from_nothing() {
    let server = TestServer::start().await;
    send(server.put("/v1/kv/reg").body("old")).await.error_for_status().expect("put");
    let incr = server.post_op("count", json!({"counter": {"incr": 5}}));
    send(incr).await.error_for_status().expect("incr");

    for key in ["reg", "count"] {
        let delete = send(server.delete(&format!("/v1/kv/{key}"))).await;
        written(&delete, StatusCode::NO_CONTENT);
        let gone = send(server.get(&format!("/v1/kv/{key}"))).await;
        assert_eq!(error_of(gone).await, (StatusCode::NOT_FOUND, "not_found".into()), "{key}");
    }

    // A blind write after the delete is not a sibling of the deleted value, and
    // the counter starts again from zero.
    send(server.put("/v1/kv/reg").body("new")).await.error_for_status().expect("put");
    assert_eq!(raw_of(send(server.get("/v1/kv/reg")).await).await, "new");
    let incr = send(server.post_op("count", json!({"counter": {"incr": 1}}))).await;
    assert_eq!(json_of(incr, StatusCode::OK).await["value"], 1);

    // Deleting what is absent is fine, and changes nothing visible.
    let delete = send(server.delete("/v1/kv/never-written")).await;
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    server.stop().await;
}

#[tokio::test]
async fn a_delete_with_a_stale_context_keeps_a_concurrent_sibling() {
    let server = TestServer::start().await;
    send(server.put("/v1/kv/k").body("seen")).await.error_for_status().expect("put");
    let stale = context_of(&send(server.get("/v1/kv/k")).await);
    // A write the reader did not see.
    send(server.put("/v1/kv/k").body("unseen")).await.error_for_status().expect("put");

    let delete = send(server.delete("/v1/kv/k").header("X-Context", &stale)).await;
    written(&delete, StatusCode::NO_CONTENT);
    assert_eq!(raw_of(send(server.get("/v1/kv/k")).await).await, "unseen");
    server.stop().await;
}

#[tokio::test]
async fn a_prefix_scan_pages_with_limit_and_cursor_and_skips_deleted_keys() {
    let server = TestServer::start().await;
    for i in 0..20 {
        send(server.put(&format!("/v1/kv/p/{i:02}")).body("v")).await.error_for_status().unwrap();
    }
    for outside in ["o/1", "q/1", "p"] {
        send(server.put(&format!("/v1/kv/{outside}")).body("v")).await.error_for_status().unwrap();
    }
    // A long run of deleted keys in the middle, and one at the end.
    for i in (3..=14).chain([19]) {
        let delete = send(server.delete(&format!("/v1/kv/p/{i:02}"))).await;
        assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    }

    let live = ["p/00", "p/01", "p/02", "p/15", "p/16", "p/17", "p/18"];
    let (keys, pages) = scan_all(&server, "p/", 2).await;
    assert_eq!(keys, live);
    assert!(pages >= 4, "7 keys at 2 a page take at least 4 pages, took {pages}");
    // Whatever the page size, the pages add up to the same keys.
    for limit in [1, 3, 7, 1000] {
        assert_eq!(scan_all(&server, "p/", limit).await.0, live, "limit {limit}");
    }

    // One page with the types of each key; a whole prefix fits in the default page.
    send(server.post_op("p/set", json!({"set": {"add": ["m"]}}))).await.error_for_status().unwrap();
    let page = json_of(send(server.get("/v1/kv?prefix=p/")).await, StatusCode::OK).await;
    assert_eq!(page["cursor"], Value::Null);
    assert_eq!(page["keys"].as_array().unwrap().len(), 8);
    assert_eq!(page["keys"][0], json!({"key": "p/00", "types": ["register"]}));
    assert_eq!(page["keys"][7], json!({"key": "p/set", "types": ["set"]}));

    let (everything, _) = scan_all(&server, "", 1000).await;
    assert_eq!(everything.len(), 11, "{everything:?}");
    server.stop().await;
}

#[tokio::test]
async fn health_and_readiness_answer_200() {
    let server = TestServer::start().await;
    let health = send(server.get("/healthz")).await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok\n");
    let ready = send(server.get("/readyz")).await;
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.text().await.unwrap(), "ready\n");
    server.stop().await;
}

#[tokio::test]
async fn the_cluster_has_one_member_and_it_is_this_node() {
    let server = TestServer::start().await;
    let cluster = json_of(send(server.get("/v1/cluster")).await, StatusCode::OK).await;
    let me = &cluster["node"];
    assert_eq!(me["id"], server.node().id().to_string());
    assert_eq!(me["state"], "alive");
    let advertised = me["http_addr"].as_str().expect("an address");
    assert_eq!(server.url("/"), format!("http://{advertised}/"));
    assert_eq!(cluster["members"], json!([me]));
    assert_eq!(cluster["quorum"], Value::Null);
    server.stop().await;
}

#[tokio::test]
async fn metrics_show_request_counts_latency_quantiles_and_the_store() {
    let server = TestServer::builder().on_disk().start().await;
    for i in 0..3 {
        send(server.put(&format!("/v1/kv/m/{i}")).body("v")).await.error_for_status().unwrap();
    }
    let missing = send(server.get("/v1/kv/m/absent")).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let response = send(server.get("/metrics")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "content-type").unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let has = |line: &str| text.lines().any(|l| l == line);
    let value_of = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line[name.len() + 1..].parse().unwrap()
    };
    let kv = r#"route="/v1/kv/{*key}""#;
    assert!(
        has(&format!(r#"calmkv_http_requests_total{{{kv},method="PUT",status="204"}} 3"#)),
        "{text}"
    );
    assert!(
        has(&format!(r#"calmkv_http_requests_total{{{kv},method="GET",status="404"}} 1"#)),
        "{text}"
    );
    for q in ["0.5", "0.99", "0.999"] {
        let prefix =
            format!(r#"calmkv_http_request_duration_seconds_quantile{{{kv},quantile="{q}"}} "#);
        assert!(text.lines().any(|l| l.starts_with(&prefix)), "no {prefix} in\n{text}");
        let flushes = format!(r#"calmkv_store_flush_seconds_quantile{{quantile="{q}"}} "#);
        assert!(text.lines().any(|l| l.starts_with(&flushes)), "no {flushes} in\n{text}");
    }
    assert!(has(&format!(r#"calmkv_http_request_duration_seconds_count{{{kv}}} 4"#)), "{text}");
    assert!(value_of("calmkv_store_size_bytes") > 0.0);
    let live = value_of("calmkv_store_live_bytes");
    assert!(live > 0.0, "{text}");
    assert_eq!(live, server.node().live_bytes() as f64);
    // The three PUTs, and the node's actor record when it opened.
    assert_eq!(value_of("calmkv_store_batches"), 4.0);
    // The metrics request itself is the one in flight.
    assert_eq!(value_of("calmkv_http_in_flight_requests"), 1.0);
    assert_eq!(value_of("calmkv_http_requests_shed_total"), 0.0);
    server.stop().await;
}

#[tokio::test]
async fn with_a_token_the_api_and_metrics_need_it_and_health_does_not() {
    let server = TestServer::builder().auth_token("s3cret").start().await;
    let anonymous = |method: Method, path: &str| server.client.request(method, server.url(path));
    let refused = [
        anonymous(Method::GET, "/v1/kv/k"),
        anonymous(Method::PUT, "/v1/kv/k").body("v"),
        anonymous(Method::GET, "/v1/kv?prefix=k"),
        anonymous(Method::GET, "/v1/cluster"),
        anonymous(Method::GET, "/metrics"),
        anonymous(Method::GET, "/v1/kv/k").bearer_auth("wrong"),
        anonymous(Method::GET, "/metrics").bearer_auth("s3cre"),
        anonymous(Method::GET, "/v1/kv/k").basic_auth("user", Some("s3cret")),
        anonymous(Method::GET, "/v1/kv/k").header("Authorization", "s3cret"),
    ];
    let refused_count = refused.len();
    for request in refused {
        let described = format!("{request:?}");
        let response = send(request).await;
        assert_eq!(header(&response, "www-authenticate"), Some("Bearer"), "{described}");
        assert_eq!(
            error_of(response).await,
            (StatusCode::UNAUTHORIZED, "unauthorized".into()),
            "{described}"
        );
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(send(anonymous(Method::GET, path)).await.status(), StatusCode::OK, "{path}");
    }
    assert!(server.node().scan("", None, 10).unwrap().keys.is_empty(), "the refused PUT wrote");

    // With the token, everything answers; the scheme's case does not matter.
    let put = send(server.put("/v1/kv/k").body("v")).await;
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let lowercase = anonymous(Method::GET, "/v1/kv/k").header("Authorization", "bearer s3cret");
    assert_eq!(send(lowercase).await.status(), StatusCode::OK);
    assert_eq!(raw_of(send(server.get("/v1/kv/k")).await).await, "v");
    let metrics = send(server.get("/metrics")).await;
    assert_eq!(metrics.status(), StatusCode::OK);
    let unauthorized =
        metrics.text().await.unwrap().lines().find_map(|l| {
            l.strip_prefix("calmkv_http_requests_unauthorized_total ").map(String::from)
        });
    assert_eq!(unauthorized, Some(refused_count.to_string()));
    server.stop().await;
}

#[tokio::test]
async fn past_the_in_flight_limit_a_request_is_shed_with_503_overloaded_and_retry_after() {
    let limits = Limits { in_flight_requests_max: 1, ..Limits::default() };
    let server = TestServer::builder().limits(limits).start().await;

    // A PUT whose body has not finished holds no permit: it is not served yet.
    let (held, body) = HeldBody::new();
    let first = tokio::spawn(server.put("/v1/kv/slow").body(body).send());
    let connections = server.state().connections().clone();
    wait_until("the first request's body is being read", || {
        connections.reading_bodies.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(server.state().in_flight_requests(), 0);
    assert_eq!(send(server.get("/v1/kv/other")).await.status(), StatusCode::NOT_FOUND);
    // A request being served holds the only permit.
    let permit = server.state().take_in_flight_permit().expect("a free permit");
    assert_eq!(server.state().in_flight_requests(), 1);

    for request in [server.get("/v1/kv/slow"), server.get("/metrics"), server.get("/v1/cluster")] {
        let shed = send(request).await;
        assert_eq!(header(&shed, "retry-after"), Some("1"));
        assert_eq!(error_of(shed).await, (StatusCode::SERVICE_UNAVAILABLE, "overloaded".into()));
    }
    // Health checks are never shed.
    assert_eq!(send(server.get("/healthz")).await.status(), StatusCode::OK);
    assert_eq!(send(server.get("/readyz")).await.status(), StatusCode::OK);

    drop(permit);
    held.finish("done").await;
    let first = first.await.expect("the task does not panic").expect("the first request");
    assert_eq!(first.status(), StatusCode::NO_CONTENT);
    assert_eq!(server.state().in_flight_requests(), 0);

    // The permit is back: requests are served again.
    assert_eq!(raw_of(send(server.get("/v1/kv/slow")).await).await, "done");
    let metrics = send(server.get("/metrics")).await.text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "calmkv_http_requests_shed_total 3"), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn a_body_past_the_body_read_timeout_is_answered_408_and_writes_nothing() {
    let timeout = Duration::from_millis(300);
    let limits = Limits { body_read_timeout: timeout, ..Limits::default() };
    let server = TestServer::builder().limits(limits).start().await;

    // A body that never completes.
    let (held, body) = HeldBody::new();
    let started = Instant::now();
    let response = send(server.put("/v1/kv/never").body(body)).await;
    assert!(started.elapsed() >= timeout, "answered after {:?}", started.elapsed());
    assert_eq!(header(&response, "connection"), Some("close"));
    assert_eq!(error_of(response).await, (StatusCode::REQUEST_TIMEOUT, "body_timeout".into()));
    drop(held);

    assert_eq!(server.state().in_flight_requests(), 0, "a waiting body never held a permit");
    let absent = send(server.get("/v1/kv/never")).await;
    assert_eq!(error_of(absent).await, (StatusCode::NOT_FOUND, "not_found".into()));
    let metrics = send(server.get("/metrics")).await.text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "calmkv_http_body_timeouts_total 1"), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_route_is_404_and_a_wrong_method_is_405_with_allow() {
    let server = TestServer::start().await;
    for path in ["/", "/v2/kv/k", "/v1/kvx", "/v1/cluster/extra", "/healthz/"] {
        let response = send(server.get(path)).await;
        assert_eq!(error_of(response).await, (StatusCode::NOT_FOUND, "not_found".into()), "{path}");
    }
    let patch = send(server.request(Method::PATCH, "/v1/kv/k")).await;
    assert_eq!(header(&patch, "allow"), Some("GET,HEAD,PUT,DELETE,POST"));
    assert_eq!(
        error_of(patch).await,
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".into())
    );
    let post = send(server.post("/v1/cluster")).await;
    assert_eq!(header(&post, "allow"), Some("GET,HEAD"));
    assert_eq!(error_of(post).await, (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".into()));
    server.stop().await;
}

#[tokio::test]
async fn a_single_node_answers_reads_above_local_with_full_harvest_and_writes_with_w_all() {
    let server = TestServer::start().await;
    let put = send(server.put("/v1/kv/h?w=all&timeout_ms=500").body("v")).await;
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let read = send(server.get("/v1/kv/h?consistency=all&min_harvest=1")).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(header(&read, "x-harvest"), Some("1.00"));
    assert_eq!(header(&read, "x-replicas"), Some("1/1"));
    let local = send(server.get("/v1/kv/h")).await;
    assert_eq!(
        header(&local, "x-harvest"),
        None,
        "a local read makes no claim about other replicas"
    );
    server.stop().await;
}

#[tokio::test]
async fn replacing_a_voter_on_a_node_without_a_quorum_group_is_not_found() {
    let server = TestServer::start().await;
    let body = serde_json::json!({"dead": 1, "id": 4, "addr": "127.0.0.1:1"});
    let answer = send(server.post("/v1/quorum/replace").json(&body)).await;
    assert_eq!(error_of(answer).await, (StatusCode::NOT_FOUND, "not_found".into()));
    server.stop().await;
}
