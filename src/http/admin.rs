//! Health, readiness, cluster membership and metrics.

use super::{ApiError, AppState};
use crate::metrics::Histogram;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use calmkv_crdts::NodeId;
use calmkv_gossip::MemberState;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// `GET /healthz`: the process is up.
pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// How long `/readyz` waits for the store's probe before it answers not ready.
/// Under a second, so that the probe answers within one whatever the disk does.
pub const READY_PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Probes that may be running at once in this process. A probe that times out
/// keeps its blocking thread until the store answers; past this many, `/readyz`
/// answers not ready without starting another, so a hung disk cannot make the
/// probe take thread after thread.
pub const READY_PROBES_MAX: usize = 4;

/// Probes running now (process-wide).
static READY_PROBES: AtomicUsize = AtomicUsize::new(0);

/// One running probe; ends when its blocking call returns.
struct ProbeSlot;

impl ProbeSlot {
    fn take() -> Option<ProbeSlot> {
        READY_PROBES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < READY_PROBES_MAX).then_some(n + 1)
            })
            .ok()
            .map(|_| ProbeSlot)
    }
}

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        READY_PROBES.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `GET /readyz`: `200 ready` when the store answers a read and would take a
/// write; else `503` with the reason in the body (`not ready: ...`): a full
/// disk, a failed flush, writes that do not finish, or a store that did not
/// answer within [`READY_PROBE_TIMEOUT`]. Always answers within that timeout.
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let not_ready = |reason: String| {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response()
    };
    let Some(slot) = ProbeSlot::take() else {
        return not_ready(format!(
            "{READY_PROBES_MAX} earlier probes of the store have not returned"
        ));
    };
    let node = state.node().clone();
    let probe = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        node.store().get(b"readyz-probe")?;
        node.store().writable()
    });
    match tokio::time::timeout(READY_PROBE_TIMEOUT, probe).await {
        Ok(Ok(Ok(()))) => "ready\n".into_response(),
        Ok(Ok(Err(error))) => not_ready(error.to_string()),
        Ok(Err(_)) => not_ready("the store probe panicked".to_string()),
        Err(_) => not_ready(format!("the store did not answer within {READY_PROBE_TIMEOUT:?}")),
    }
}

/// `GET /v1/cluster`: this node and the members its gossip view knows, with
/// their SWIM state, incarnation and metadata (only itself when it does not
/// gossip).
pub(super) async fn cluster(State(state): State<AppState>) -> Json<serde_json::Value> {
    let id = state.node().id();
    let Some(watch) = state.cluster().membership() else {
        let me = json!({
            "id": id.to_string(), "http_addr": state.inner.http_addr,
            "state": "alive", "incarnation": 0,
        });
        let quorum = state.cluster().coordinator().map(|c| c.status());
        let refusals = refusals(&state);
        return Json(
            json!({ "node": me, "members": [me], "quorum": quorum, "refusals": refusals }),
        );
    };
    let me = watch.identity();
    let describe = |identity: &calmkv_gossip::NodeIdentity, swim: &str, incarnation: u16| {
        json!({
            "id": NodeId(identity.node_id).to_string(),
            "state": swim,
            "incarnation": incarnation,
            "bump": identity.bump,
            "gossip_addr": identity.gossip_addr.to_string(),
            "http_addr": identity.meta.http_addr.to_string(),
            "peer_addr": identity.meta.peer_addr.to_string(),
            "invariants_hash": format!("{:016x}", identity.meta.invariants_hash),
        })
    };
    let own_hash = me.meta.invariants_hash;
    let describe = |identity: &calmkv_gossip::NodeIdentity, swim: &str, incarnation: u16| {
        let mut member = describe(identity, swim, incarnation);
        member["invariants_match"] = json!(identity.meta.invariants_hash == own_hash);
        member
    };
    let node = describe(&me, "alive", 0);
    let mut members = vec![node.clone()];
    for member in watch.members() {
        let swim = match member.state {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
        };
        members.push(describe(&member.identity, swim, member.incarnation));
    }
    let quorum = state.cluster().coordinator().map(|c| c.status());
    let refusals = refusals(&state);
    Json(json!({ "node": node, "members": members, "quorum": quorum, "refusals": refusals }))
}

/// What this node refused from other nodes since it started: peer handshakes
/// by kind (`wrong_secret` means another node holds another cluster secret),
/// peer frames, remote states past a limit, and gossip packets (`null` when
/// the node does not gossip). A node that refuses a peer runs without it, so
/// these numbers are where a misconfigured secret shows.
fn refusals(state: &AppState) -> serde_json::Value {
    let metrics = state.cluster().channel().metrics();
    let handshakes: serde_json::Map<String, serde_json::Value> = metrics
        .handshakes_refused()
        .into_iter()
        .map(|(kind, n)| (kind.name().to_string(), json!(n)))
        .collect();
    let gossip = state.cluster().membership().map(|watch| {
        let m = watch.metrics();
        json!({
            "wrong_secret": m.dropped_auth,
            "oversized": m.dropped_size,
            "undecodable": m.decode_errors,
            "refused": m.protocol_errors,
        })
    });
    json!({
        "peer_handshakes": handshakes,
        "peer_frames": metrics.frames_refused.load(std::sync::atomic::Ordering::Relaxed),
        "remote_states": metrics.states_refused.load(std::sync::atomic::Ordering::Relaxed),
        "gossip": gossip,
    })
}

/// `GET /metrics`: Prometheus text format.
pub(super) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let node = state.node().clone();
    let store = match tokio::task::spawn_blocking(move || node.store().stats()).await {
        Ok(stats) => stats.map_err(crate::NodeError::from)?,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    };
    let histograms: Vec<(&str, &str, &Histogram)> = match &store.flush_latency {
        Some(h) => vec![("calmkv_store_flush_seconds", "Latency of store flushes (fsync).", h)],
        None => vec![],
    };
    let mut gauges = store.gauges();
    gauges.push((
        "calmkv_store_live_bytes",
        "Bytes of the rows the node keeps for its keys (bases, delta logs, digest index; keys \
         and values), beside calmkv_store_size_bytes on disk.",
        state.node().live_bytes() as f64,
    ));
    gauges.push((
        "calmkv_http_in_flight_requests",
        "HTTP requests being served (this one included), bounded by the in-flight limit.",
        state.in_flight_requests() as f64,
    ));
    gauges.extend(state.connections().exposition());
    let channel = state.cluster().channel();
    gauges.extend(channel.metrics().exposition());
    gauges.push(("calmkv_peers", "Peers this node replicates to.", channel.peers().len() as f64));
    let backlog: usize = channel.outbox_bytes().iter().map(|(_, bytes)| bytes).sum();
    gauges.push((
        "calmkv_replication_backlog_bytes",
        "Bytes waiting in peer outboxes: how far replication lags behind local writes.",
        backlog as f64,
    ));
    if let Some(watch) = state.cluster().membership() {
        gauges.extend(gossip_gauges(&watch.metrics()));
    }
    let text = state.inner.metrics.render(&gauges, &histograms);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// Gossip membership and traffic, as gauges (`_total` ones only ever grow).
fn gossip_gauges(m: &calmkv_gossip::MetricsSnapshot) -> Vec<(&'static str, &'static str, f64)> {
    [
        ("calmkv_gossip_members_alive", "Other members gossip sees alive.", m.members_alive),
        ("calmkv_gossip_members_suspect", "Other members gossip suspects.", m.members_suspect),
        ("calmkv_gossip_members_down", "Other members gossip knows as down.", m.members_down),
        ("calmkv_gossip_packets_sent_total", "Gossip datagrams sent.", m.packets_sent),
        ("calmkv_gossip_bytes_sent_total", "Gossip bytes sent.", m.bytes_sent),
        ("calmkv_gossip_packets_received_total", "Gossip datagrams received.", m.packets_received),
        ("calmkv_gossip_bytes_received_total", "Gossip bytes received.", m.bytes_received),
        (
            "calmkv_gossip_packets_refused_total",
            "Gossip datagrams dropped: bad tag, oversized, undecodable, refused, or inbox full.",
            m.dropped_auth
                + m.dropped_size
                + m.decode_errors
                + m.protocol_errors
                + m.dropped_inbox_full,
        ),
    ]
    .into_iter()
    .map(|(name, help, value)| (name, help, value as f64))
    .collect()
}

/// The body of `POST /v1/quorum/replace`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Replace {
    dead: u64,
    id: u64,
    addr: String,
}

/// `POST /v1/quorum/replace`: on the leader, replaces a dead voter with a new
/// one (started beforehand with `--quorum-id`).
pub(super) async fn replace_voter(
    State(state): State<AppState>,
    body: Result<Json<Replace>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(replace) = body.map_err(|e| ApiError::BadRequest { reason: e.body_text() })?;
    let Some(coordinator) = state.cluster().coordinator() else {
        // No group is a missing resource, not a malformed request.
        return Err(ApiError::NotFound { what: "this node's quorum group".into() });
    };
    coordinator
        .replace_voter(replace.dead, replace.id, replace.addr)
        .await
        .map_err(|reason| ApiError::BadRequest { reason })?;
    Ok(Json(coordinator.status()))
}
