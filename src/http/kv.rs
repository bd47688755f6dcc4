//! `/v1/kv`: reads, writes, CRDT operations and scans of keys.

use super::{ApiError, AppState};
use crate::envelope::Envelope;
use crate::op::{Action, CrdtOp, Key, Op};
use crate::quorum::IdempotencyKey;
use crate::read::{ReadResult, TypedValue};
use crate::replication::cluster::{ClusterError, WriteQuorum};
use crate::replication::harvest::Consistency;
use crate::{Applied, Limits, NodeError};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use calmkv_crdts::CausalContext;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

/// The causal context of a key, as an opaque token (base64url of its encoding).
pub const X_CONTEXT: HeaderName = HeaderName::from_static("x-context");
/// The fraction of replicas a read reflects, e.g. `0.67`.
pub const X_HARVEST: HeaderName = HeaderName::from_static("x-harvest");
/// Replicas a read reflects over replicas of the key, e.g. `2/3`.
pub const X_REPLICAS: HeaderName = HeaderName::from_static("x-replicas");
/// Whether a write was coordinated: `none` (local) or `quorum`.
pub const X_COORDINATION: HeaderName = HeaderName::from_static("x-coordination");

/// A client's name for a coordinated operation, so that a retry is answered
/// with the first outcome instead of being applied again.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Decodes the optional `Idempotency-Key` header.
fn parse_idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get(&IDEMPOTENCY_KEY) else { return Ok(None) };
    let text = value.to_str().map_err(|_| NodeError::BadIdempotencyKey {
        reason: "the key holds a character outside printable ASCII",
        max: crate::quorum::idempotency::IDEMPOTENCY_KEY_BYTES_MAX,
    })?;
    Ok(Some(IdempotencyKey::new(text)?))
}

/// Encodes a context as the token clients send back in `X-Context`.
pub fn context_token(context: &CausalContext) -> String {
    URL_SAFE_NO_PAD.encode(calmkv_crdts::encode(context).expect("a context always encodes"))
}

/// Decodes the optional `X-Context` header.
fn parse_context(headers: &HeaderMap, limits: &Limits) -> Result<Option<CausalContext>, ApiError> {
    let Some(value) = headers.get(&X_CONTEXT) else { return Ok(None) };
    let bad = |why: &str| ApiError::BadRequest { reason: format!("bad X-Context token: {why}") };
    if value.len() > limits.context_bytes_max {
        return Err(bad(&format!("longer than {} bytes", limits.context_bytes_max)));
    }
    let bytes = URL_SAFE_NO_PAD.decode(value.as_bytes()).map_err(|_| bad("not base64url"))?;
    calmkv_crdts::decode(&bytes).map(Some).map_err(|e| bad(&e.to_string()))
}

fn key_of(path: Result<Path<String>, PathRejection>, limits: &Limits) -> Result<Key, ApiError> {
    let Path(raw) = path.map_err(|e| NodeError::BadKey {
        reason: if e.body_text().contains("UTF-8") {
            "the key is not UTF-8"
        } else {
            "the key is malformed"
        },
        max: limits.key_bytes_max,
    })?;
    Ok(Key::new(raw, limits)?)
}

fn body_of(body: Result<Bytes, BytesRejection>, limits: &Limits) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge { max: limits.body_bytes_max },
        _ => ApiError::BadRequest { reason: format!("cannot read the body: {}", e.body_text()) },
    })
}

/// Runs node work on the blocking pool: a scan page may read thousands of
/// stored keys. Reads and writes of one key run on the request's own thread
/// ([`Node::apply_async`](crate::Node::apply_async)).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

fn with_context(mut response: Response, context: &CausalContext) -> Response {
    let token = HeaderValue::from_str(&context_token(context)).expect("base64 is a valid header");
    response.headers_mut().insert(X_CONTEXT, token);
    response
}

/// Adds the headers every write answers with: the new context, and how it was
/// coordinated (`none`: locally; `quorum`: admitted under a declared invariant).
fn written(response: impl IntoResponse, applied: &Applied) -> Response {
    let mut response = with_context(response.into_response(), applied.context());
    let how = if applied.coordinated { "quorum" } else { "none" };
    response.headers_mut().insert(X_COORDINATION, HeaderValue::from_static(how));
    response
}

/// A typed value as JSON with the read's context added:
/// `{"type": .., "value": .., "context": ..}`.
///
/// Serialized straight into the body, never through `serde_json::Value`: a
/// counter is an `i128`, and a `Value` cannot hold one outside the `i64`/`u64`
/// range (one `decr` of `u64::MAX` gets there).
#[derive(Serialize)]
struct TypedJson<'a> {
    #[serde(flatten)]
    value: &'a TypedValue,
    context: String,
}

fn typed_json<'a>(value: &'a TypedValue, context: &CausalContext) -> TypedJson<'a> {
    TypedJson { value, context: context_token(context) }
}

/// A key created concurrently with several types: `{"conflict": [..], "context": ..}`.
#[derive(Serialize)]
struct ConflictJson<'a> {
    conflict: &'a [TypedValue],
    context: String,
}

/// Replicas a read asks, and how long it waits: `?consistency=&timeout_ms=&min_harvest=`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReadParams {
    #[serde(default)]
    consistency: Consistency,
    timeout_ms: Option<u64>,
    min_harvest: Option<f64>,
}

/// How long a read over several replicas waits when `timeout_ms` is not given.
pub const READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(1);
/// How long a write with `w` above 1 waits when `timeout_ms` is not given.
pub const WRITE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

/// A client's `timeout_ms` (refused past the request timeout), or the default
/// (cut to the request timeout).
fn timeout_of(
    timeout_ms: Option<u64>,
    default: Duration,
    limits: &Limits,
) -> Result<Duration, ApiError> {
    let Some(timeout_ms) = timeout_ms else { return Ok(default.min(limits.request_timeout)) };
    let timeout = Duration::from_millis(timeout_ms);
    if timeout.is_zero() || timeout > limits.request_timeout {
        let max = limits.request_timeout.as_millis();
        return Err(ApiError::BadRequest {
            reason: format!("timeout_ms must be between 1 and {max}"),
        });
    }
    Ok(timeout)
}

/// `GET /v1/kv/{key}`.
pub(super) async fn get(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let limits = state.node().limits();
    let key = key_of(path, limits)?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest { reason: e.body_text() })?;
    if params.min_harvest.is_some_and(|h| !(0.0..=1.0).contains(&h)) {
        return Err(ApiError::BadRequest { reason: "min_harvest must be between 0 and 1".into() });
    }
    let timeout = timeout_of(params.timeout_ms, READ_TIMEOUT_DEFAULT, limits)?;
    // A read above `local`, or one with `min_harvest`, says its harvest on
    // every answer: 200, 300, 404 and 503 alike.
    let reports = params.consistency != Consistency::Local || params.min_harvest.is_some();
    let read = state.cluster().read(&key, params.consistency, timeout, params.min_harvest).await;
    let (response, harvest) = match read {
        Ok(read) => (read_response(&key, &read.state), read.harvest),
        Err(ClusterError::InsufficientHarvest { harvest }) => {
            let error = ApiError::InsufficientHarvest { harvest: harvest.to_string() };
            (error.into_response(), harvest)
        }
        Err(error) => return Err(error.into()),
    };
    let mut response = response;
    if reports {
        let headers = response.headers_mut();
        headers.insert(X_HARVEST, HeaderValue::from_str(&harvest.header()).expect("digits"));
        headers
            .insert(X_REPLICAS, HeaderValue::from_str(&harvest.replicas_header()).expect("digits"));
    }
    Ok(response)
}

/// The answer to a read of `state`: its value, or 404.
fn read_response(key: &Key, state: &Envelope) -> Response {
    let Some(ReadResult { values, context }) = ReadResult::of(state) else {
        return ApiError::NotFound { what: format!("key {:?}", key.as_str()) }.into_response();
    };
    let response = match values.as_slice() {
        [TypedValue::Register(v)] if v.len() == 1 => raw(v[0].clone()),
        [TypedValue::Lww(v)] => raw(v.clone()),
        [TypedValue::Register(_)] => {
            (StatusCode::MULTIPLE_CHOICES, Json(typed_json(&values[0], &context))).into_response()
        }
        [one] => Json(typed_json(one, &context)).into_response(),
        many => {
            let body = ConflictJson { conflict: many, context: context_token(&context) };
            (StatusCode::MULTIPLE_CHOICES, Json(body)).into_response()
        }
    };
    with_context(response, &context)
}

fn raw(bytes: bytes::Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutParams {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    w: WriteQuorum,
    timeout_ms: Option<u64>,
}

/// Replicas a write waits for: `?w=1|quorum|all&timeout_ms=`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WriteParams {
    #[serde(default)]
    w: WriteQuorum,
    timeout_ms: Option<u64>,
}

/// Applies a write through the cluster, waiting for `w` replicas; a
/// coordinated one under the request's `Idempotency-Key`, if any.
async fn write(
    state: &AppState,
    op: Op,
    w: WriteQuorum,
    timeout_ms: Option<u64>,
    headers: &HeaderMap,
) -> Result<Applied, ApiError> {
    let timeout = timeout_of(timeout_ms, WRITE_TIMEOUT_DEFAULT, state.node().limits())?;
    let idempotency_key = parse_idempotency_key(headers)?;
    Ok(state.cluster().write_idempotent(op, w, timeout, idempotency_key).await?)
}

/// `PUT /v1/kv/{key}`: set a register (`?type=lww` for last-writer-wins).
pub(super) async fn put(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<PutParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let limits = state.node().limits();
    let key = key_of(path, limits)?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest { reason: e.body_text() })?;
    let value = body_of(body, limits)?;
    let context = parse_context(&headers, limits)?;
    let if_absent = match headers.get(header::IF_NONE_MATCH).map(HeaderValue::as_bytes) {
        None => false,
        Some(b"*") => true,
        Some(_) => {
            return Err(ApiError::BadRequest { reason: "If-None-Match supports only `*`".into() })
        }
    };
    let action = match params.kind.as_deref() {
        None | Some("register") => Action::Put { value, context, if_absent },
        Some("lww") if context.is_none() && !if_absent => Action::PutLww { value },
        Some("lww") => {
            return Err(ApiError::BadRequest {
                reason: "an lww write takes neither X-Context nor If-None-Match".into(),
            })
        }
        Some(other) => {
            return Err(ApiError::BadRequest {
                reason: format!("unknown type {other:?} for PUT (register or lww)"),
            })
        }
    };
    let applied = write(&state, Op { key, action }, params.w, params.timeout_ms, &headers).await?;
    // A coordinated register write is a creation: on a key declared unique, a
    // write without a context runs as insert-if-absent.
    let created = if_absent || applied.coordinated;
    Ok(written(if created { StatusCode::CREATED } else { StatusCode::NO_CONTENT }, &applied))
}

/// `DELETE /v1/kv/{key}`: delete what `X-Context` saw, or everything here.
pub(super) async fn delete(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = key_of(path, state.node().limits())?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest { reason: e.body_text() })?;
    let context = parse_context(&headers, state.node().limits())?;
    let op = Op { key, action: Action::Delete { context } };
    let applied = write(&state, op, params.w, params.timeout_ms, &headers).await?;
    Ok(written(StatusCode::NO_CONTENT, &applied))
}

/// `POST /v1/kv/{key}`: a CRDT operation; answers the key's new value.
pub(super) async fn post(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let limits = state.node().limits();
    let key = key_of(path, limits)?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest { reason: e.body_text() })?;
    let body = body_of(body, limits)?;
    let op: CrdtOp = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest { reason: format!("not a CRDT operation: {e}") })?;
    let kind = crate::KeyType::from(op.kind());
    let op = Op { key, action: Action::Crdt(op) };
    let applied = write(&state, op, params.w, params.timeout_ms, &headers).await?;
    let value = TypedValue::all_of(&applied.state.value).into_iter().find(|v| v.key_type() == kind);
    // None: the operation removed the last content (the last member of a set, or
    // disabled a flag); the key now reads as absent, and the answer is the empty
    // value of its type, which keeps the documented shape (`false`, `[]`, `{}`).
    let value = value.unwrap_or_else(|| empty_value(kind));
    Ok(written(Json(typed_json(&value, applied.context())), &applied))
}

/// The value of a type with no live content.
fn empty_value(kind: crate::KeyType) -> TypedValue {
    use crate::KeyType;
    match kind {
        KeyType::Counter => TypedValue::Counter(0),
        KeyType::Set => TypedValue::Set(Vec::new()),
        KeyType::Map => TypedValue::Map(Default::default()),
        KeyType::Flag => TypedValue::Flag(false),
        // A register write always leaves a value; no operation empties one.
        KeyType::Register | KeyType::Lww => TypedValue::Register(Vec::new()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScanParams {
    #[serde(default)]
    prefix: String,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /v1/kv?prefix=P&limit=N&cursor=C`: a page of live keys with a prefix.
pub(super) async fn scan(
    State(state): State<AppState>,
    params: Result<Query<ScanParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest { reason: e.body_text() })?;
    let limits = state.node().limits();
    if !params.prefix.is_empty() {
        Key::new(params.prefix.clone(), limits)?;
    }
    let limit = match params.limit {
        Some(0) => return Err(ApiError::BadRequest { reason: "limit must be at least 1".into() }),
        Some(n) => n.min(limits.scan_page_max),
        None => limits.scan_page_max,
    };
    let node = state.node().clone();
    let page = blocking(move || node.scan(&params.prefix, params.cursor.as_deref(), limit)).await?;
    let keys: Vec<_> =
        page.keys.iter().map(|(key, types)| json!({ "key": key, "types": types })).collect();
    Ok(Json(json!({ "keys": keys, "cursor": page.cursor })).into_response())
}
