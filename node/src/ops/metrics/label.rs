//! The closed sets of label values. Each is an enum written as a fixed snake_case string, so a
//! label can only ever say which kind of thing happened, never carry a value from a request.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use crate::web::api_error::ApiError;

/// Writes a closed enum as its snake_case label value.
macro_rules! label_value {
    ($ty:ty) => {
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

/// How a request travels: one OHTTP message, or chunked OHTTP (streamed).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Media {
    /// RFC 9458 single message.
    Single,
    /// Chunked OHTTP.
    Chunked,
}

impl Media {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Chunked => "chunked",
        }
    }

    /// Every media type.
    pub(super) const ALL: [Self; 2] = [Self::Single, Self::Chunked];
}

impl From<tokengo_proto::frame::MediaType> for Media {
    fn from(media: tokengo_proto::frame::MediaType) -> Self {
        match media {
            tokengo_proto::frame::MediaType::Single => Self::Single,
            tokengo_proto::frame::MediaType::Chunked => Self::Chunked,
        }
    }
}
label_value!(Media);

/// What a client stream at the relay asked for.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RelayRequest {
    /// A request forwarded to an exit.
    Forward,
    /// The exit list.
    ListExits,
}

impl RelayRequest {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::ListExits => "list_exits",
        }
    }
}
label_value!(RelayRequest);

/// Which way counted bytes went.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Flow {
    /// Relay: client to exit.
    ToExit,
    /// Relay: exit to client.
    ToClient,
    /// Exit: request bodies sent to the backend.
    ToBackend,
    /// Exit: response bodies received from the backend.
    FromBackend,
    /// Client: encrypted bytes sent to the relay.
    ToRelay,
    /// Client: encrypted bytes received from the relay.
    FromRelay,
}

impl Flow {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ToExit => "to_exit",
            Self::ToClient => "to_client",
            Self::ToBackend => "to_backend",
            Self::FromBackend => "from_backend",
            Self::ToRelay => "to_relay",
            Self::FromRelay => "from_relay",
        }
    }
}
label_value!(Flow);

/// Why a request failed, as a closed set of classes (never the error text, which could carry
/// a path or a backend message).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ErrorClass {
    /// A stream header or message that does not parse.
    Malformed,
    /// The relay has no such exit.
    NoSuchExit,
    /// The exit went away or could not take the request.
    ExitUnavailable,
    /// A stream broke or was reset mid-way.
    StreamFailed,
    /// The request named an OHTTP key the exit does not hold.
    KeyUnknown,
    /// The request did not decrypt.
    Undecryptable,
    /// The request's encapsulated key was seen before.
    Replay,
    /// The backend refused the connection.
    BackendUnreachable,
    /// The backend went silent for longer than the idle timeout.
    BackendTimeout,
    /// The backend's answer broke off or was unusable.
    BackendFailed,
    /// The user's request could not be understood.
    BadRequest,
    /// No exit was available.
    NoExit,
    /// The relay could not be reached.
    RelayUnreachable,
    /// The request body was over the limit.
    PayloadTooLarge,
    /// A limit was reached.
    Overloaded,
    /// The exit did not answer in time.
    GatewayTimeout,
    /// A policy refused the request (endpoint, host or web origin).
    Forbidden,
    /// The exit requires an access token and the request had none, or a wrong one.
    AccessDenied,
    /// The node could not encode or seal its own answer (never the peer's fault).
    Internal,
}

impl ErrorClass {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NoSuchExit => "no_such_exit",
            Self::ExitUnavailable => "exit_unavailable",
            Self::StreamFailed => "stream_failed",
            Self::KeyUnknown => "key_unknown",
            Self::Undecryptable => "undecryptable",
            Self::Replay => "replay",
            Self::BackendUnreachable => "backend_unreachable",
            Self::BackendTimeout => "backend_timeout",
            Self::BackendFailed => "backend_failed",
            Self::BadRequest => "bad_request",
            Self::NoExit => "no_exit",
            Self::RelayUnreachable => "relay_unreachable",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Overloaded => "overloaded",
            Self::GatewayTimeout => "gateway_timeout",
            Self::Forbidden => "forbidden",
            Self::AccessDenied => "access_denied",
            Self::Internal => "internal",
        }
    }
}
label_value!(ErrorClass);

impl From<&ApiError> for ErrorClass {
    fn from(error: &ApiError) -> Self {
        match error {
            ApiError::BackendUnreachable => Self::BackendUnreachable,
            ApiError::BackendTimeout => Self::BackendTimeout,
            ApiError::BackendFailed(_) => Self::BackendFailed,
            ApiError::NoExit | ApiError::PinnedExitsUnavailable { .. } => Self::NoExit,
            ApiError::RelayUnreachable(_) => Self::RelayUnreachable,
            ApiError::ExitUnavailable(_) => Self::ExitUnavailable,
            ApiError::ExitLostRequest(_) => Self::StreamFailed,
            ApiError::PayloadTooLarge { .. } => Self::PayloadTooLarge,
            ApiError::BadRequest(_) => Self::BadRequest,
            ApiError::Overloaded => Self::Overloaded,
            ApiError::GatewayTimeout => Self::GatewayTimeout,
            ApiError::Forbidden { .. } => Self::Forbidden,
            ApiError::RequestExpired(_) | ApiError::Replayed => Self::Replay,
            ApiError::ReplayWindowFull | ApiError::ExitOverloaded => Self::Overloaded,
            ApiError::ExitAccessDenied { .. } => Self::AccessDenied,
        }
    }
}

/// What an exit registration at the relay did.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Registration {
    /// A new exit.
    New,
    /// A known exit sent a fresh descriptor (refresh or key rotation).
    Updated,
    /// A known exit came back on a new connection.
    Replaced,
    /// The descriptor was refused.
    Refused,
}

impl Registration {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Updated => "updated",
            Self::Replaced => "replaced",
            Self::Refused => "refused",
        }
    }
}
label_value!(Registration);

/// Why a client did not accept an exit's descriptor from a source.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum DescriptorRefusal {
    /// Older than one already seen for the exit, with other keys.
    Rollback,
    /// As new as the newest seen for the exit, with other keys.
    KeyConflict,
}

impl DescriptorRefusal {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rollback => "rollback",
            Self::KeyConflict => "key_conflict",
        }
    }
}
label_value!(DescriptorRefusal);

/// An HTTP status code's class.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum StatusClass {
    /// 1xx.
    Informational,
    /// 2xx.
    Success,
    /// 3xx.
    Redirection,
    /// 4xx.
    ClientError,
    /// 5xx.
    ServerError,
}

impl StatusClass {
    /// The class of `status`.
    #[must_use]
    pub fn of(status: u16) -> Self {
        match status {
            ..=199 => Self::Informational,
            200..=299 => Self::Success,
            300..=399 => Self::Redirection,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }

    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Informational => "1xx",
            Self::Success => "2xx",
            Self::Redirection => "3xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
        }
    }
}
label_value!(StatusClass);

/// Whether an exit's attempt to reach its relay succeeded.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Connected and registered.
    Registered,
    /// Could not connect or register.
    Failed,
}

impl ConnectOutcome {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Failed => "failed",
        }
    }
}
label_value!(ConnectOutcome);

/// Which of the exit's OHTTP keys.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum KeySlot {
    /// The key new requests are encrypted to.
    Current,
    /// The key kept during a rotation overlap.
    Previous,
}

impl KeySlot {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Previous => "previous",
        }
    }
}
label_value!(KeySlot);

/// `media="…"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MediaLabel {
    /// The media type.
    pub media: Media,
}

/// `kind="…"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The request kind.
    pub kind: RelayRequest,
}

/// `class="…"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// The error class.
    pub class: ErrorClass,
}

/// `direction="…"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabel {
    /// The direction.
    pub direction: Flow,
}

/// `outcome="…"` of a registration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistrationLabel {
    /// What happened.
    pub outcome: Registration,
}

/// `reason="…"` of a refused descriptor (never the exit or the source: no PeerId, no address).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    /// Why.
    pub reason: DescriptorRefusal,
}

/// `outcome="…"` of a connection attempt.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectLabel {
    /// What happened.
    pub outcome: ConnectOutcome,
}

/// `status_class="…"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The class.
    pub status_class: StatusClass,
}

/// `key_id="…",slot="…"`: an exit's own key, not anything about a user.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabel {
    /// The OHTTP key id (0-255).
    pub key_id: u32,
    /// Current or previous.
    pub slot: KeySlot,
}
