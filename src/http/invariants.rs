//! `GET /v1/invariants` and `GET /v1/explain`: the declarations this node
//! enforces and the analysis that routes each operation.

use super::{ApiError, AppState};
use crate::invariants::{analysis, Declaration, Invariants, OpKind};
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value as JsonValue};

/// The verdict of every kind of operation under a declaration, with reasons
/// and, where the quorum is needed, the computed counterexample.
pub fn verdicts(declaration: &Declaration) -> Vec<JsonValue> {
    OpKind::for_type(declaration.rule.key_type())
        .iter()
        .map(|&kind| explain_kind(declaration, kind))
        .collect()
}

fn explain_kind(declaration: &Declaration, kind: OpKind) -> JsonValue {
    let verdict = analysis::verdict(&declaration.rule, kind);
    json!({
        "op": kind,
        "route": if verdict.confluent { "local" } else { "quorum" },
        "reason": verdict.reason,
        "counterexample": analysis::counterexample(&declaration.rule, kind),
    })
}

/// The whole analysis of a set of declarations, as `GET /v1/invariants` serves it.
pub fn describe(invariants: &Invariants) -> JsonValue {
    let declarations: Vec<JsonValue> = invariants
        .declarations()
        .iter()
        .map(|d| json!({ "keys": d.keys, "rule": d.rule, "verdicts": verdicts(d) }))
        .collect();
    json!({
        "hash": format!("{:016x}", invariants.hash()),
        "invariants": declarations,
        "undeclared": "every operation on a key no declaration matches runs locally",
    })
}

/// The explanation of `op` on `key`, as `GET /v1/explain` serves it.
pub fn explain(invariants: &Invariants, key: &str, op: &str) -> Result<JsonValue, ApiError> {
    let kind = OpKind::parse(op).ok_or_else(|| ApiError::BadRequest {
        reason: format!(
            "unknown op {op:?}; expected one of: {}",
            OpKind::ALL.map(OpKind::name).join(", ")
        ),
    })?;
    let Some(declaration) = invariants.rule_for(key) else {
        return Ok(json!({
            "key": key, "op": kind, "invariant": null, "route": "local",
            "reason": "No invariant is declared for this key: every operation runs locally.",
            "counterexample": null,
        }));
    };
    if !OpKind::for_type(declaration.rule.key_type()).contains(&kind) {
        return Err(ApiError::BadRequest {
            reason: format!(
                "{key:?} is declared `{declaration}`; {op:?} is not an operation of that type"
            ),
        });
    }
    let mut answer = explain_kind(declaration, kind);
    answer["key"] = json!(key);
    answer["invariant"] = json!({ "keys": declaration.keys, "rule": declaration.rule });
    Ok(answer)
}

/// `GET /v1/invariants`.
pub(super) async fn invariants(State(state): State<AppState>) -> Json<JsonValue> {
    Json(describe(state.node().invariants()))
}

#[derive(Deserialize)]
pub(super) struct ExplainQuery {
    key: String,
    op: String,
}

/// `GET /v1/explain?key=K&op=OP`.
pub(super) async fn explain_route(
    State(state): State<AppState>,
    query: Result<Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JsonValue>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest {
        reason: format!("{}; expected ?key=K&op=OP", e.body_text()),
    })?;
    Ok(Json(explain(state.node().invariants(), &query.key, &query.op)?))
}
