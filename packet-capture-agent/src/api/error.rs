//! The API's errors, and how each transport spells them: an HTTP status with
//! a JSON `{"error": …}` body, or a gRPC status code with the same message.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use packet_capture_common::validate::ValidationErrors;

use crate::capture::StartError;
use crate::files::FileError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or not valid; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The request body is larger than the API accepts.
    #[error("{0}")]
    TooLarge(String),
    /// A capture with this id exists with another name or spec.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// The capture is not in a state that allows it (it has ended).
    #[error("{0}")]
    FailedPrecondition(String),
    /// No bearer token, or one the cluster does not accept.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Too many refused tokens came from the caller's address, or a
    /// capture has as many live readers as it takes; the caller may try
    /// again after `retry_after` seconds.
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    /// The node (or the cluster, for authentication) cannot serve it now.
    #[error("{0}")]
    Unavailable(String),
    /// The node runs as many captures as it may, or has no room for their
    /// targets in its address maps: 503 over REST, as other
    /// reasons it cannot run one now, and RESOURCE_EXHAUSTED over gRPC, so
    /// the controller tells it apart from an agent it cannot reach.
    #[error("{0}")]
    Full(String),
    /// A download's `Range` holds no byte of its file of `size` bytes.
    #[error("{message}")]
    RangeNotSatisfiable { message: String, size: u64 },
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::FailedPrecondition(_) => StatusCode::CONFLICT,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Invalid(_) => tonic::Code::InvalidArgument,
            Self::TooLarge(_) => tonic::Code::ResourceExhausted,
            Self::Conflict(_) => tonic::Code::AlreadyExists,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Self::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Self::Forbidden(_) => tonic::Code::PermissionDenied,
            Self::RateLimited { .. } => tonic::Code::ResourceExhausted,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Full(_) => tonic::Code::ResourceExhausted,
            Self::RangeNotSatisfiable { .. } => tonic::Code::OutOfRange,
            Self::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The error as a gRPC response (trailers only), for requests refused
    /// before they reach the gRPC service.
    pub fn into_grpc_response(self) -> Response {
        tonic::Status::from(self).into_http::<axum::body::Body>()
    }

    pub fn capture_not_found(id: &str) -> Self {
        Self::NotFound(format!("id: no capture {id:?}"))
    }

    /// `Content-Range` of a refused range: the file's size (RFC 9110 15.5.17).
    pub(crate) fn content_range(&self) -> Option<String> {
        match self {
            Self::RangeNotSatisfiable { size, .. } => Some(format!("bytes */{size}")),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        let mut response = (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(range) = self
            .content_range()
            .and_then(|r| HeaderValue::from_str(&r).ok())
        {
            response.headers_mut().insert(header::CONTENT_RANGE, range);
        }
        response
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let mut status = tonic::Status::new(e.code(), e.to_string());
        if let Some(range) = e.content_range().and_then(|r| r.parse().ok()) {
            status.metadata_mut().insert("content-range", range);
        }
        status
    }
}

impl From<ValidationErrors> for ApiError {
    fn from(e: ValidationErrors) -> Self {
        Self::Invalid(e.to_string())
    }
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Invalid(m) => Self::Invalid(m),
            StartError::Conflict(m) => Self::Conflict(format!("id: {m}")),
            StartError::Unavailable(m) => Self::Unavailable(m),
            StartError::Full(m) => Self::Full(m),
        }
    }
}

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        match e {
            FileError::BadName(_) => Self::Invalid(format!("name: {e}")),
            FileError::NotFound(_) => Self::NotFound(format!("name: {e}")),
            FileError::Io { .. } => Self::Internal(e.to_string()),
        }
    }
}
