//! The errors a user's tool can see, in one place: each maps to an HTTP status and an
//! OpenAI-shaped JSON body (`{"error":{"message","type","code"}}`), whichever side produces it.
//! The exit sends these *encrypted* (backend failures); the client sends them for failures
//! before an exit was reached.

use http::StatusCode;

/// A failure reported to the user's tool as an HTTP error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The exit could not connect to its backend.
    #[error("the AI backend behind the exit is unreachable")]
    BackendUnreachable,
    /// The backend stopped sending for longer than the idle timeout.
    #[error("the AI backend did not answer in time")]
    BackendTimeout,
    /// The backend's answer broke off or was unusable.
    #[error("the AI backend's response failed: {0}")]
    BackendFailed(String),
    /// No exit is registered with the relay (or none serves the model).
    #[error(
        "no exit is available right now; check that an exit is running and registered with the relay"
    )]
    NoExit,
    /// None of the exits the user pinned can take the request; requests never go to another.
    #[error(
        "none of the pinned exits ({pinned}) can take the request, and requests are never sent to other exits; tried: {tried}"
    )]
    PinnedExitsUnavailable {
        /// The pinned PeerIds.
        pinned: String,
        /// What was found for each, and what each relay answered.
        tried: String,
    },
    /// The relay cannot be reached.
    #[error("the relay is unreachable: {0}")]
    RelayUnreachable(String),
    /// The chosen exit went away and no other could take the request.
    #[error("the exit is unavailable: {0}")]
    ExitUnavailable(String),
    /// The exit said it was passing the request to its backend and then failed before its
    /// answer began. The request may have reached the backend, so it was not sent to another
    /// exit (that could run it twice).
    #[error(
        "the exit took the request and then failed before answering ({0}); it may have reached the AI backend, so it was not sent again; retry it if running it twice is harmless"
    )]
    ExitLostRequest(String),
    /// The request is too large.
    #[error("request body too large (limit {limit} bytes)")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request could not be understood.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The relay or exit is at its limits.
    #[error("the network is overloaded; retry shortly")]
    Overloaded,
    /// No response within the gateway's own deadline.
    #[error("the gateway timed out waiting for the exit")]
    GatewayTimeout,
    /// A policy refuses the request: an endpoint the exit does not serve, or a local request
    /// from a host or web origin the client does not answer. `code` says which.
    #[error("{message}")]
    Forbidden {
        /// The machine-readable code (`endpoint_not_allowed`, `host_not_allowed`, ...).
        code: &'static str,
        /// What was refused and what to do about it.
        message: String,
    },
    /// The request's `Date` is outside the exit's acceptance window (clock skew, a delayed
    /// or replayed request, or a request from before the exit started).
    #[error("request refused by the exit's replay protection: {0}")]
    RequestExpired(String),
    /// The exit has already served this encapsulated request.
    #[error("request refused by the exit's replay protection: it was already received")]
    Replayed,
    /// The exit remembers as many recent requests as it may and refuses more rather than
    /// forget one early (which would let it be replayed).
    #[error("the exit is at its limit of recent requests; retry shortly")]
    ReplayWindowFull,
    /// The exit holds as many answer bytes as its memory budget allows, and none were freed
    /// while the request waited. Sent encrypted by the exit.
    #[error(
        "the exit is overloaded: its memory for buffered answers is full; retry shortly, or ask for a streamed answer (\"stream\": true), which the exit does not buffer"
    )]
    ExitOverloaded,
    /// The exit requires a group access token and the request carried none (`missing`) or
    /// one it does not accept. Sent encrypted by the exit; the backend was not called.
    #[error(
        "this exit requires an access token and {}; give the client your group's token with --exit-token (TOKENGO_EXIT_TOKEN) or --exit PEERID=TOKEN",
        if *missing { "the request carried none" } else { "refused the one sent" }
    )]
    ExitAccessDenied {
        /// No token was sent at all.
        missing: bool,
    },
}

impl ApiError {
    /// The HTTP status for this error.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BackendUnreachable
            | Self::BackendFailed(_)
            | Self::RelayUnreachable(_)
            | Self::ExitLostRequest(_) => StatusCode::BAD_GATEWAY,
            Self::BackendTimeout | Self::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::NoExit
            | Self::PinnedExitsUnavailable { .. }
            | Self::ExitUnavailable(_)
            | Self::Overloaded
            | Self::ExitOverloaded
            | Self::ReplayWindowFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadRequest(_) | Self::RequestExpired(_) | Self::Replayed => {
                StatusCode::BAD_REQUEST
            }
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::ExitAccessDenied { .. } => StatusCode::UNAUTHORIZED,
        }
    }

    /// The machine-readable `code`.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::BackendUnreachable => "backend_unreachable",
            Self::BackendTimeout => "backend_timeout",
            Self::BackendFailed(_) => "backend_failed",
            Self::NoExit => "no_exit_available",
            Self::PinnedExitsUnavailable { .. } => "pinned_exit_unavailable",
            Self::RelayUnreachable(_) => "relay_unreachable",
            Self::ExitUnavailable(_) => "exit_unavailable",
            Self::ExitLostRequest(_) => "exit_failed_after_accepting",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::BadRequest(_) => "bad_request",
            Self::Overloaded => "overloaded",
            Self::ExitOverloaded => "exit_overloaded",
            Self::GatewayTimeout => "gateway_timeout",
            Self::Forbidden { code, .. } => code,
            Self::RequestExpired(_) => "request_expired",
            Self::Replayed => "replayed_request",
            Self::ReplayWindowFull => "replay_window_full",
            Self::ExitAccessDenied { missing: true } => "exit_token_missing",
            Self::ExitAccessDenied { missing: false } => "exit_token_invalid",
        }
    }

    /// The OpenAI error `type`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PayloadTooLarge { .. }
            | Self::BadRequest(_)
            | Self::RequestExpired(_)
            | Self::Replayed
            | Self::ExitAccessDenied { .. } => "invalid_request_error",
            Self::Forbidden { .. } => "permission_error",
            _ => "api_error",
        }
    }

    /// The JSON body.
    #[must_use]
    pub fn body(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "code": self.code(),
            }
        });
        body.to_string().into_bytes()
    }
}

impl From<crate::net::relay_link::LinkError> for ApiError {
    fn from(error: crate::net::relay_link::LinkError) -> Self {
        Self::RelayUnreachable(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape_and_statuses() {
        let error = ApiError::BackendUnreachable;
        assert_eq!(error.status(), StatusCode::BAD_GATEWAY);
        let json: serde_json::Value = serde_json::from_slice(&error.body()).unwrap();
        assert_eq!(json["error"]["code"], "backend_unreachable");
        assert_eq!(json["error"]["type"], "api_error");
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unreachable")
        );
        assert_eq!(ApiError::NoExit.status(), StatusCode::SERVICE_UNAVAILABLE);
        let lost = ApiError::ExitLostRequest("stream reset".into());
        assert_eq!(lost.status(), StatusCode::BAD_GATEWAY);
        let json: serde_json::Value = serde_json::from_slice(&lost.body()).unwrap();
        assert_eq!(json["error"]["code"], "exit_failed_after_accepting");
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not sent again")
        );
        assert_eq!(
            ApiError::BackendTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
