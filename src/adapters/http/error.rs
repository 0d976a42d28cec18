//! Errors of the HTTP API: each maps to a status code and a JSON body `{"error": "..."}`; the cause of a
//! 5xx is logged.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A sentence a person can act on.
    pub error: String,
}

/// Why an HTTP call could not be answered as asked.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body or a path parameter is not valid input (400).
    #[error("{0}")]
    BadRequest(String),
    /// No bearer token, or one that is not configured (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The token belongs to another service (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such route (404).
    #[error("{0}")]
    NotFound(String),
    /// The route exists, not with this method (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// NATS or the driver is not available, or the coordinator is starting or stopping (503).
    #[error("{0}")]
    Unavailable(String),
    /// The coordinator did not answer in time (504).
    #[error("{0}")]
    GatewayTimeout(String),
    /// A limit on open streams is reached (429).
    #[error("{0}")]
    TooMany(String),
    /// The input could not be stored: the store is full (a disk, JetStream's store, the input
    /// stream's or the embedded bus's byte limit) (507). Nothing was stored; send it again later.
    #[error("{0}")]
    InsufficientStorage(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "HTTP: {self}");
        }
        let unauthorized = matches!(self, ApiError::Unauthorized(_));
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
