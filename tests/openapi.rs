//! `docs/openapi.yaml` against the code: the spec lists exactly the routes and
//! methods of [`calmkv::http::route_table`], a live server refuses every other
//! method on those paths with `405` (so the table cannot leave a method out), and
//! every error code the API can produce is in the spec's `Error` enum.

mod common;

use calmkv::http::{route_table, ApiError};
use calmkv::store::StoreError;
use calmkv::{KeyType, NodeError};
use common::{error_of, header, send, TestServer};
use reqwest::{Method, StatusCode};
use std::collections::{BTreeMap, BTreeSet};

const SPEC: &str = include_str!("../docs/openapi.yaml");

/// Methods a path of the spec may carry (OpenAPI's operation keys).
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The operations of the spec, `path -> {method}`, read line by line: under the
/// top-level `paths:`, a path is a key indented by two spaces and an operation a
/// method key indented by four.
fn spec_operations() -> BTreeMap<String, BTreeSet<String>> {
    let mut operations: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut lines = SPEC.lines().skip_while(|line| *line != "paths:").skip(1);
    let mut path: Option<String> = None;
    for line in lines.by_ref() {
        if !line.is_empty() && !line.starts_with(' ') {
            break; // the next top-level key
        }
        if let Some(key) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            if !key.starts_with(' ') {
                let key = key.trim_matches('"').to_string();
                operations.entry(key.clone()).or_default();
                path = Some(key);
                continue;
            }
        }
        if let Some(key) = line.strip_prefix("    ").and_then(|l| l.split_once(':')) {
            let method = key.0;
            if METHODS.contains(&method) {
                let path = path.as_ref().expect("an operation under a path");
                operations.get_mut(path).expect("the path").insert(method.to_string());
            }
        }
    }
    assert!(!operations.is_empty(), "no paths found in docs/openapi.yaml");
    operations
}

/// The codes of the spec's `Error` schema: the `enum: [...]` under
/// `components.schemas.Error`, which may span lines.
fn spec_error_codes() -> BTreeSet<String> {
    let schema = SPEC.find("\n    Error:\n").expect("an Error schema in docs/openapi.yaml");
    let rest = &SPEC[schema..];
    let start = rest.find("enum: [").expect("an enum of codes in the Error schema") + 7;
    let end = start + rest[start..].find(']').expect("the end of the enum");
    rest[start..end].split(',').map(|code| code.trim().to_string()).collect()
}

/// The routes of the code in the spec's spelling (`{*key}` is `{key}`).
fn code_operations() -> BTreeMap<String, BTreeSet<String>> {
    route_table()
        .into_iter()
        .map(|(path, methods, _)| {
            let path = path.replace("{*", "{");
            (path, methods.iter().map(|m| m.as_str().to_lowercase()).collect())
        })
        .collect()
}

#[test]
fn the_spec_lists_exactly_the_routes_and_methods_of_the_route_table() {
    let code = code_operations();
    let spec = spec_operations();
    for (path, methods) in &code {
        let documented = spec.get(path).unwrap_or_else(|| panic!("{path} is not in the spec"));
        for method in methods {
            assert!(
                documented.contains(method),
                "{} {path} is not in the spec",
                method.to_uppercase()
            );
        }
    }
    // And the spec promises nothing the server does not serve.
    assert_eq!(spec, code, "the spec's operations differ from the route table");
}

#[tokio::test]
async fn every_method_outside_the_route_table_is_refused_with_405() {
    let server = TestServer::start().await;
    let every_method = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"];
    // The key exists, so that a served method cannot answer 404 either.
    let put = send(server.put("/v1/kv/some/key").body("v")).await;
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    for (path, methods, _) in route_table() {
        let concrete = path.replace("{*key}", "some/key");
        // axum answers HEAD wherever it answers GET.
        let mut allowed: BTreeSet<&str> = methods.iter().map(Method::as_str).collect();
        if allowed.contains("GET") {
            allowed.insert("HEAD");
        }
        for method in every_method {
            let request = server.request(method.parse().expect("a method"), &concrete);
            let response = send(request).await;
            let described = format!("{method} {concrete}");
            if allowed.contains(method) {
                assert_ne!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{described}");
                assert_ne!(response.status(), StatusCode::NOT_FOUND, "{described}");
                continue;
            }
            let allow: BTreeSet<&str> = header(&response, "allow")
                .unwrap_or_else(|| panic!("{described}: no Allow header"))
                .split(',')
                .map(str::trim)
                .collect();
            assert_eq!(allow, allowed, "{described}: Allow lists other methods than the table");
            if method == "HEAD" {
                assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{described}");
            } else {
                let expected = (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".to_string());
                assert_eq!(error_of(response).await, expected, "{described}");
            }
        }
    }
    server.stop().await;
}

/// One error of every variant of [`NodeError`]. A new variant breaks the match in
/// `node_variant`; give it the next index, raise `NODE_VARIANTS` and add a sample.
fn every_node_error() -> Vec<NodeError> {
    const NODE_VARIANTS: usize = 16;
    fn node_variant(error: &NodeError) -> usize {
        match error {
            NodeError::BadKey { .. } => 0,
            NodeError::BadRequest { .. } => 1,
            NodeError::ValueTooLarge { .. } => 2,
            NodeError::TypeMismatch { .. } => 3,
            NodeError::TooManySiblings { .. } => 4,
            NodeError::LimitExceeded { .. } => 5,
            NodeError::PreconditionFailed { .. } => 6,
            NodeError::Store { .. } => 7,
            NodeError::CorruptIndex { .. } => 8,
            NodeError::Corrupt { .. } => 9,
            NodeError::InvalidConfig { .. } => 10,
            NodeError::InvariantViolation { .. } => 11,
            NodeError::CoordinationUnavailable { .. } => 12,
            NodeError::CoordinationIndeterminate { .. } => 13,
            NodeError::BadIdempotencyKey { .. } => 14,
            NodeError::IdempotencyKeyReused { .. } => 15,
        }
    }
    let decode_error = calmkv_crdts::decode::<calmkv::Envelope>(&[]).expect_err("empty input");
    let samples = vec![
        NodeError::BadKey { reason: "the key is empty", max: 1024 },
        NodeError::BadRequest { reason: "r".into() },
        NodeError::ValueTooLarge { bytes: 2, max: 1 },
        NodeError::TypeMismatch { key: "k".into(), wanted: KeyType::Counter, found: "set".into() },
        NodeError::TooManySiblings { key: "k".into(), siblings: 3, max: 2 },
        NodeError::LimitExceeded { key: "k".into(), what: "w".into() },
        NodeError::PreconditionFailed { key: "k".into() },
        NodeError::Store { source: StoreError::FlushFailed { reason: "r".into() } },
        NodeError::Store {
            source: StoreError::InsufficientStorage {
                path: "store".into(),
                available_bytes: 1,
                needed_bytes: 2,
            },
        },
        NodeError::CorruptIndex { entry: "e".into() },
        NodeError::Corrupt { key: "k".into(), source: decode_error },
        NodeError::InvalidConfig { reason: "r".into() },
        NodeError::InvariantViolation { key: "k".into(), violation: "v".into() },
        NodeError::CoordinationUnavailable { key: "k".into(), reason: "r".into() },
        NodeError::CoordinationIndeterminate { key: "k".into(), reason: "r".into() },
        NodeError::BadIdempotencyKey { reason: "the key is empty", max: 128 },
        NodeError::IdempotencyKeyReused { key: "k".into(), reason: "r".into() },
    ];
    let covered: BTreeSet<usize> = samples.iter().map(node_variant).collect();
    assert_eq!(covered, (0..NODE_VARIANTS).collect(), "a NodeError variant has no sample");
    samples
}

/// One error of every variant of [`ApiError`] (every [`NodeError`] among them);
/// a new variant breaks the match in `api_variant`, as above.
fn every_api_error() -> Vec<ApiError> {
    const API_VARIANTS: usize = 12;
    fn api_variant(error: &ApiError) -> usize {
        match error {
            ApiError::Node(_) => 0,
            ApiError::BadRequest { .. } => 1,
            ApiError::BodyTooLarge { .. } => 2,
            ApiError::NotFound { .. } => 3,
            ApiError::Unauthorized => 4,
            ApiError::Overloaded { .. } => 5,
            ApiError::Timeout { .. } => 6,
            ApiError::MethodNotAllowed => 7,
            ApiError::InsufficientHarvest { .. } => 8,
            ApiError::InsufficientReplicas { .. } => 9,
            ApiError::BodyTimeout { .. } => 10,
            ApiError::BodiesOverloaded { .. } => 11,
        }
    }
    let mut samples: Vec<ApiError> = every_node_error().into_iter().map(ApiError::Node).collect();
    samples.extend([
        ApiError::BadRequest { reason: "r".into() },
        ApiError::BodyTooLarge { max: 1 },
        ApiError::NotFound { what: "w".into() },
        ApiError::Unauthorized,
        ApiError::Overloaded { limit: 1 },
        ApiError::Timeout { timeout_ms: 1 },
        ApiError::MethodNotAllowed,
        ApiError::InsufficientHarvest { harvest: "0.33 (1/3)".into() },
        ApiError::InsufficientReplicas { acked: 1, wanted: 3 },
        ApiError::BodyTimeout { timeout_ms: 1 },
        ApiError::BodiesOverloaded { bytes_max: 1 },
    ]);
    let covered: BTreeSet<usize> = samples.iter().map(api_variant).collect();
    assert_eq!(covered, (0..API_VARIANTS).collect(), "an ApiError variant has no sample");
    samples
}

#[test]
fn every_error_code_the_api_produces_is_in_the_spec_with_its_design_status() {
    // docs/openapi.yaml, plus the codes of the HTTP layer itself.
    let design_status: BTreeMap<&str, u16> = [
        ("bad_key", 400),
        ("bad_request", 400),
        ("payload_too_large", 413),
        ("type_mismatch", 409),
        ("too_many_siblings", 409),
        ("limit_exceeded", 409),
        ("invariant_violation", 409),
        ("coordination_unavailable", 503),
        ("precondition_failed", 412),
        ("overloaded", 503),
        ("unauthorized", 401),
        ("not_found", 404),
        ("method_not_allowed", 405),
        ("timeout", 503),
        ("body_timeout", 408),
        ("insufficient_harvest", 503),
        ("insufficient_replicas", 503),
        ("idempotency_key_reused", 422),
        ("insufficient_storage", 507),
        ("internal", 500),
    ]
    .into();
    let documented = spec_error_codes();
    for error in every_api_error() {
        let (status, code) = error.status_and_code();
        assert!(documented.contains(code), "{code} ({error}) is not in the spec's Error enum");
        assert_eq!(Some(&status.as_u16()), design_status.get(code), "status of {code} ({error})");
    }
}

/// The text of one response of an operation: from its status line to the next
/// response at the same indentation.
fn spec_response(path: &str, method: &str, status: &str) -> String {
    let path_line = format!("\n  {path}:\n");
    let rest = &SPEC[SPEC.find(&path_line).unwrap_or_else(|| panic!("{path} in the spec"))..];
    let rest = &rest[rest.find(&format!("\n    {method}:\n")).expect("the method")..];
    let mut lines = rest.lines().skip_while(|l| !l.starts_with(&format!("        \"{status}\":")));
    let first = lines.next().unwrap_or_else(|| panic!("{method} {path} has no {status}"));
    let indent = |l: &str| l.len() - l.trim_start().len();
    let nested = lines.take_while(|l| indent(l) > 8);
    std::iter::once(first).chain(nested).collect::<Vec<_>>().join("\n")
}

/// Every answer of a read over replicas says its harvest: the spec documents
/// the headers on each status, and a live node sends them on 200 and 404.
#[tokio::test]
async fn every_answer_of_a_read_over_replicas_carries_its_harvest() {
    for status in ["200", "300", "404", "503"] {
        let response = spec_response("/v1/kv/{key}", "get", status);
        for header in ["X-Harvest", "X-Replicas"] {
            assert!(response.contains(header), "GET /v1/kv/{{key}} {status} lacks {header}");
        }
    }
    let server = TestServer::start().await;
    send(server.put("/v1/kv/h")).await;
    for path in ["/v1/kv/h?consistency=one", "/v1/kv/missing?consistency=all&min_harvest=0.5"] {
        let response = send(server.get(path)).await;
        assert_eq!(header(&response, "x-harvest"), Some("1.00"), "{path}");
        assert_eq!(header(&response, "x-replicas"), Some("1/1"), "{path}");
    }
    let local = send(server.get("/v1/kv/h")).await;
    assert_eq!(header(&local, "x-harvest"), None, "a local read reports nothing");
    server.stop().await;
}
