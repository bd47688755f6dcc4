//! HTTP errors: every refusal as `{"error":{"code":"...","message":"..."}}` with a
//! stable code and its status (docs/openapi.yaml), mapped in one place.

use crate::replication::cluster::ClusterError;
use crate::store::StoreError;
use crate::NodeError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Seconds a client is asked to wait after `overloaded` or `timeout`.
pub const RETRY_AFTER_SECS: u64 = 1;

/// An error answer of the HTTP API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The node refused or failed the operation.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A malformed request that never reached the node.
    #[error("{reason}")]
    BadRequest {
        /// What is wrong.
        reason: String,
    },
    /// The request body is larger than the limit.
    #[error("request body is larger than the limit of {max} bytes")]
    BodyTooLarge {
        /// The limit.
        max: usize,
    },
    /// The request body did not arrive within the body read timeout.
    #[error("the request body did not arrive within {timeout_ms} ms")]
    BodyTimeout {
        /// The timeout.
        timeout_ms: u128,
    },
    /// No such key, or no such route.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// Missing or wrong bearer token.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// Too many requests in flight.
    #[error("too many requests in flight (limit {limit}); retry later")]
    Overloaded {
        /// The in-flight limit.
        limit: usize,
    },
    /// The request's body does not fit the budget of bodies being read at
    /// once; nothing was read or applied.
    #[error("too many request bodies being read (limit {bytes_max} bytes); retry later")]
    BodiesOverloaded {
        /// The budget.
        bytes_max: usize,
    },
    /// The request ran past the timeout; a write may or may not have been applied.
    #[error("request took longer than {timeout_ms} ms; a write may or may not have been applied")]
    Timeout {
        /// The timeout.
        timeout_ms: u128,
    },
    /// Fewer replicas answered a read than its consistency and `min_harvest` ask.
    #[error("only {harvest} of the replicas answered by the deadline")]
    InsufficientHarvest {
        /// What was gathered, e.g. `0.33 (1/3)`.
        harvest: String,
    },
    /// Fewer replicas acknowledged a write than `w` asks; it is applied here and
    /// will still reach the others.
    #[error("the write is applied here, but only {acked} of {wanted} replicas acknowledged it by the deadline")]
    InsufficientReplicas {
        /// Replicas (this one included) that acknowledged.
        acked: usize,
        /// Replicas wanted.
        wanted: usize,
    },
    /// The method is not served on this path.
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl ApiError {
    /// The status and stable code of the error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Node(e) => (node_status(e), e.code()),
            ApiError::BadRequest { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Overloaded { .. } | ApiError::BodiesOverloaded { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
            }
            ApiError::Timeout { .. } => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::InsufficientHarvest { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "insufficient_harvest")
            }
            ApiError::InsufficientReplicas { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "insufficient_replicas")
            }
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        }
    }
}

fn node_status(error: &NodeError) -> StatusCode {
    match error {
        NodeError::BadKey { .. }
        | NodeError::BadRequest { .. }
        | NodeError::BadIdempotencyKey { .. } => StatusCode::BAD_REQUEST,
        NodeError::IdempotencyKeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        NodeError::ValueTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        NodeError::TypeMismatch { .. }
        | NodeError::TooManySiblings { .. }
        | NodeError::LimitExceeded { .. }
        | NodeError::InvariantViolation { .. } => StatusCode::CONFLICT,
        NodeError::CoordinationUnavailable { .. } | NodeError::CoordinationIndeterminate { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        NodeError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
        NodeError::Store { source: StoreError::InsufficientStorage { .. } } => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        NodeError::Store { .. }
        | NodeError::Corrupt { .. }
        | NodeError::CorruptIndex { .. }
        | NodeError::InvalidConfig { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<ClusterError> for ApiError {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::Node(e) => ApiError::Node(e),
            ClusterError::InsufficientHarvest { harvest } => {
                ApiError::InsufficientHarvest { harvest: harvest.to_string() }
            }
            ClusterError::InsufficientAcks { acked, wanted } => {
                ApiError::InsufficientReplicas { acked, wanted }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error()
            && !matches!(
                self,
                ApiError::Overloaded { .. }
                    | ApiError::Timeout { .. }
                    | ApiError::Node(NodeError::CoordinationUnavailable { .. })
                    | ApiError::Node(NodeError::CoordinationIndeterminate { .. })
            )
        {
            tracing::error!(error = %self, "request failed");
        }
        let mut error = json!({ "code": code, "message": self.to_string() });
        if let ApiError::Node(node_error) = &self {
            if let Some(applied) = node_error.applied() {
                // `coordination_unavailable` says whether the operation was
                // applied: "no", or "unknown" (it may or may not be).
                error["applied"] = json!(applied);
            }
        }
        let body = json!({ "error": error });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
