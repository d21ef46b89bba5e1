//! Every way an intake request can fail, each knowing its HTTP status, its stable
//! error code (also the metric label) and whether the client may retry.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Why one event was refused. `code` is stable and machine-readable.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventRejection {
    pub code: &'static str,
    pub message: String,
}

impl EventRejection {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A refused event of a batch, by its position in the request.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedEvent {
    pub index: usize,
    #[serde(flatten)]
    pub reason: EventRejection,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body must be a JSON object{0}")]
    InvalidBody(String),
    #[error("request body is larger than {limit} bytes (limit applies after decompression)")]
    BodyTooLarge { limit: usize },
    #[error("event is larger than {limit} bytes")]
    EventTooLarge { limit: usize },
    #[error("batch has {count} events; at most {limit} are allowed per request")]
    TooManyEvents { count: usize, limit: usize },
    #[error("batch has no events")]
    EmptyBatch,
    #[error("unsupported content type `{0}`: send JSON labelled application/json, text/plain or application/x-www-form-urlencoded (or no content type)")]
    UnsupportedMediaType(String),
    #[error("unsupported content encoding `{0}`: send gzip, deflate, br or identity")]
    UnsupportedEncoding(String),
    #[error("{0} body could not be decompressed: {1}")]
    InvalidCompression(&'static str, String),
    #[error("request body was not received within {0} ms")]
    BodyReadTimeout(u64),
    #[error("request body could not be read: {0}")]
    BodyRead(String),
    #[error("no write key: send it as HTTP Basic user name, X-Write-Key header or body writeKey")]
    MissingWriteKey,
    #[error("write key is not valid")]
    InvalidWriteKey,
    #[error("event is invalid: {}", .0.message)]
    InvalidEvent(EventRejection),
    #[error("every event of the batch is invalid")]
    InvalidBatch(Vec<RejectedEvent>),
    #[error("requests from web pages at origin `{0}` are not allowed for this source: add the origin to the source's allowed_origins (or [browser] allowed_origins)")]
    OriginNotAllowed(String),
    #[error("too many requests in flight; retry later")]
    Overloaded,
    #[error("the server's memory budget for requests in progress is used up; retry later")]
    MemoryBudget,
    #[error("a sink rejected events for good and the dead-letter store that keeps them is full; retry later")]
    DeadLettersFull,
    #[error(
        "too many requests with the write key in the body are being read at once; send the key in a header \
         (Authorization: Basic, or X-Write-Key), or retry later"
    )]
    BodyKeyOverloaded,
    #[error(
        "source `{source_name}` is over its rate limit of {per_second} events/s; retry in {retry_after_seconds} s"
    )]
    RateLimited {
        source_name: String,
        per_second: u64,
        retry_after_seconds: u64,
    },
    #[error("events could not be made durable; retry later")]
    SinkUnavailable,
    #[error("some of these messageIds are being delivered by another request; retry shortly")]
    InFlightElsewhere,
    #[error("a sink is down and its spool is full; retry later")]
    SpoolFull,
    #[error("the spool cannot write (a full disk or an I/O error); retry later")]
    SpoolUnavailable,
    #[error("the spool did not finish writing in time (a slow or stalled disk); retry later")]
    SpoolSlow,
    #[error("too many open connections; retry later")]
    TooManyConnections,
    #[error("server is shutting down; retry later")]
    ShuttingDown,
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
}

/// Seconds a client is told to wait after a retryable refusal.
const RETRY_AFTER_SECONDS: &str = "1";

impl IntakeError {
    /// `403 origin_not_allowed`, naming the origin (at most 128 characters of it).
    pub fn origin_not_allowed(origin: &str) -> IntakeError {
        IntakeError::OriginNotAllowed(origin.chars().take(128).collect())
    }

    pub fn status(&self) -> StatusCode {
        use IntakeError::*;
        match self {
            InvalidJson(_)
            | InvalidBody(_)
            | EmptyBatch
            | InvalidCompression(..)
            | BodyRead(_)
            | InvalidEvent(_)
            | InvalidBatch(_) => StatusCode::BAD_REQUEST,
            BodyTooLarge { .. } | EventTooLarge { .. } | TooManyEvents { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType(_) | UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyReadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            MissingWriteKey | InvalidWriteKey => StatusCode::UNAUTHORIZED,
            OriginNotAllowed(_) => StatusCode::FORBIDDEN,
            Overloaded | BodyKeyOverloaded | MemoryBudget | DeadLettersFull | SinkUnavailable | SpoolFull
            | SpoolUnavailable | SpoolSlow | InFlightElsewhere | TooManyConnections | ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// Stable code for the JSON body and the `reason` metric label.
    pub fn code(&self) -> &'static str {
        use IntakeError::*;
        match self {
            InvalidJson(_) => "invalid_json",
            InvalidBody(_) => "invalid_body",
            BodyTooLarge { .. } => "body_too_large",
            EventTooLarge { .. } => "event_too_large",
            TooManyEvents { .. } => "too_many_events",
            EmptyBatch => "empty_batch",
            UnsupportedMediaType(_) => "unsupported_media_type",
            UnsupportedEncoding(_) => "unsupported_encoding",
            // `invalid_gzip` kept for gzip, as before deflate and br were read.
            InvalidCompression("gzip", _) => "invalid_gzip",
            InvalidCompression(..) => "invalid_compression",
            BodyReadTimeout(_) => "body_read_timeout",
            BodyRead(_) => "body_read_failed",
            MissingWriteKey => "missing_write_key",
            InvalidWriteKey => "invalid_write_key",
            InvalidEvent(_) => "invalid_event",
            InvalidBatch(_) => "invalid_batch",
            Overloaded => "overloaded",
            BodyKeyOverloaded => "overloaded_body_key",
            MemoryBudget => "memory_budget",
            DeadLettersFull => "dead_letters_full",
            RateLimited { .. } => "rate_limited",
            SinkUnavailable => "sink_unavailable",
            InFlightElsewhere => "in_flight_elsewhere",
            SpoolFull => "spool_full",
            SpoolUnavailable => "spool_unavailable",
            SpoolSlow => "spool_slow",
            OriginNotAllowed(_) => "origin_not_allowed",
            TooManyConnections => "too_many_connections",
            ShuttingDown => "shutting_down",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
        }
    }

    /// Whether sending the same request again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            IntakeError::Overloaded
                | IntakeError::BodyKeyOverloaded
                | IntakeError::MemoryBudget
                | IntakeError::DeadLettersFull
                | IntakeError::RateLimited { .. }
                | IntakeError::SinkUnavailable
                | IntakeError::InFlightElsewhere
                | IntakeError::SpoolFull
                | IntakeError::SpoolUnavailable
                | IntakeError::SpoolSlow
                | IntakeError::TooManyConnections
                | IntakeError::ShuttingDown
                | IntakeError::BodyReadTimeout(_)
        )
    }
}

/// `{"error": {...}, "code": ..., "message": ...}`. The top-level `code` and
/// `message` repeat the detail's for Segment-style SDKs, which read exactly those two
/// keys (analytics-python and rudder-sdk-python raise a KeyError without them, and
/// then retry a 400 or 401 instead of giving up).
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
    code: &'static str,
    message: String,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'static str,
    message: String,
    retryable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected: Option<&'a [RejectedEvent]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a EventRejection>,
}

impl IntakeError {
    /// The JSON error body (also written by hand-made responses, such as the
    /// listener's refusal of a connection over its limit).
    pub fn json_body(&self) -> String {
        let body = ErrorBody {
            code: self.code(),
            message: self.to_string(),
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                retryable: self.is_retryable(),
                rejected: match self {
                    IntakeError::InvalidBatch(rejected) => Some(rejected),
                    _ => None,
                },
                event: match self {
                    IntakeError::InvalidEvent(rejection) => Some(rejection),
                    _ => None,
                },
            },
        };
        serde_json::to_string(&body).expect("an error body always serializes")
    }
}

impl IntoResponse for IntakeError {
    fn into_response(self) -> Response {
        const X_RATELIMIT_RESET: header::HeaderName = header::HeaderName::from_static("x-ratelimit-reset");
        let json = [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))];
        let mut response = (self.status(), json, self.json_body()).into_response();
        let headers = response.headers_mut();
        if let IntakeError::RateLimited {
            retry_after_seconds, ..
        } = &self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            // Segment's browser SDK reads only this one, as seconds to wait.
            headers.insert(X_RATELIMIT_RESET, HeaderValue::from(*retry_after_seconds));
        } else if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"breakwater\""),
            );
        }
        response
    }
}
