//! Timeouts and size limits shared by the roles ([`Limits`]), and how the limit keys of a
//! role's file and the flags shared by several roles set them. The defaults and accepted
//! ranges are in [`defaults`].

use std::time::Duration;

use super::{
    ConfigError, defaults,
    defaults::{
        EXIT_ANSWER_TIMEOUT_SECS, QUIC_IDLE_TIMEOUT_SECS, REQUEST_TIMEOUT_SECS,
        TUNNEL_LIVENESS_SECS, WRITE_STALL_TIMEOUT_SECS,
    },
    invalid, out_of, positive, rate, seconds_within,
};
use crate::cli::{AnswerTimeoutArgs, RequestArgs, TunnelLivenessArgs};

/// Timeouts and size limits shared by the roles.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body the client accepts and the exit decodes. Default 32 MiB.
    pub max_request_body: usize,
    /// Largest non-streamed (single-message) response body. Default 64 MiB.
    pub max_response_body: usize,
    /// QUIC idle timeout; keep-alives are sent at a third of it. Default 30 s.
    pub quic_idle_timeout: Duration,
    /// Longest a request may wait for its answer to begin: the exit's wait for the backend's
    /// response head (which a non-streaming backend sends only when generation ends), and,
    /// with a margin, the client's wait for the exit. Default 30 minutes.
    pub request_timeout: Duration,
    /// The exit refuses requests whose `Date` is further than this from its clock. Default 60 s.
    pub max_clock_skew: Duration,
    /// Most recent requests (their `enc`) the exit remembers against replay; when full it
    /// refuses new requests rather than forget one early. Default 2,097,152 (about 80 MiB when
    /// full, 40 bytes each; 17,000 requests a second sustained with the default skew, above
    /// what one exit decapsulates on two cores: a flood of valid requests must not fill it and
    /// shut everyone out).
    pub replay_cache_entries: usize,
    /// How long a write may wait for a reader that takes no bytes (relay to client and to
    /// exit, exit to relay) before the stream is reset, so a client that stops reading cannot
    /// pin a stream and the backend connection behind it. Idle, not absolute: a slow reader
    /// that keeps reading is never cut. Default 30 s.
    pub write_stall_timeout: Duration,
    /// How long the relay waits for an exit's tunnel to take a new stream before it answers
    /// `ExitUnavailable`. Default 10 s.
    pub stream_open_timeout: Duration,
    /// Silence after which an exit's tunnel counts as dead. The exit asks for it as the
    /// tunnel's QUIC idle timeout (QUIC takes the lower of the two ends' values, so the relay
    /// applies it too) and sends keep-alives at a third of it: a crashed exit leaves the
    /// relay's list and its streams fail within it, and an exit notices a lost relay within
    /// it. Three keep-alive packets per tunnel every two seconds at the default, against
    /// which a relay's 1000 tunnels cost little; client connections keep `quic_idle_timeout`.
    /// Default 2 s (1 to 60): a request in flight at an exit that crashes then ends within
    /// about 2.5 s (the fault suite's bound is 3 s), and three keep-alives in a row must be
    /// lost for a live tunnel to count as dead.
    pub tunnel_liveness: Duration,
    /// How long an exit may take, once the relay has sent it a whole request, to send the
    /// first byte of its answer: version 2 exits send `ACCEPTED` right before they call their
    /// backend, so only a wedged exit misses it. Then the relay resets the exit's stream and
    /// answers `ExitUnavailable`, and the client tries another exit. Requests in version 1
    /// (the first byte comes with the backend's answer) are not bounded. Default 10 s
    /// (1 to 600).
    pub exit_answer_timeout: Duration,
    /// A request body must reach the relay at this average rate (bytes per second, counted
    /// from the stream's start) once `request_body_grace` has passed, or the stream is
    /// reset: trickling bytes cannot hold an exit's slot. Default 16 KiB/s.
    pub min_request_body_rate: u64,
    /// Time a request body may take before its rate counts. Default 10 s.
    pub request_body_grace: Duration,
    /// Most exits one relay keeps registered; its exit list must always fit what clients
    /// accept (1024 entries, 4 MiB), so the byte budget of the descriptors is fixed at
    /// `relay::registry::MAX_LIST_BYTES`. Default 1000, at most 1000.
    pub max_exits: usize,
    /// Registrations of new exit identities a relay accepts: a burst, then a steady rate
    /// per second. Default 256, then 16/s.
    pub registration_burst: u32,
    /// See `registration_burst`.
    pub registrations_per_sec: u32,
    /// Handshakes in progress above which the relay asks new clients to prove their address
    /// first (QUIC Retry), so spoofed sources cannot make it hold handshake state.
    /// Default 64.
    pub retry_above_handshakes: usize,
    /// Most bytes of single-message (non-streamed) answers the exit holds at once, all
    /// requests together. Such an answer is one AEAD seal, so it is held whole until the relay
    /// has taken it, and a client that stops reading keeps it held until the write stall
    /// timeout: without a bound, clients that never read could make an exit hold any amount.
    /// Bytes beyond an answer's first 256 KiB may use only seven eighths of it, so large
    /// answers never starve small ones. Streamed (chunked) answers are not buffered and do
    /// not count. Default 256 MiB: three of the largest answers (`max_response_body`), or
    /// about 56 stalled 4 MiB answers; at least eight sevenths of `max_response_body` plus
    /// 1 MiB.
    pub answer_budget: usize,
    /// How long one answer may wait in all for the answer budget (the backend's body is not
    /// read meanwhile) before the user gets an encrypted 503 `exit_overloaded` and the bytes
    /// it collected are given back. Default 10 s.
    pub answer_budget_wait: Duration,
    /// Streams in flight at one exit from which the relay shares that exit fairly among
    /// client source addresses (IPv4 address, IPv6 /64) active there in the last second:
    /// each then keeps at most its part of this many (at least 4) in flight and its further
    /// requests wait for its own to finish (at most 5 s, then `Overloaded`). A source alone
    /// at an exit is never limited by it; 0 shares only a full exit. Default 16.
    pub contended_streams: usize,
    /// New QUIC connections the relay accepts per source address and second, after a burst
    /// of `source_connection_burst`; beyond it, an unproven address is asked for a QUIC
    /// Retry and a proven one refused before the handshake (proven and unproven attempts
    /// are counted apart, so spoofed packets cannot spend another's; an address that
    /// answers Retries gets up to twice this). 0 turns the limit off. Default 8.
    pub source_connections_per_sec: f64,
    /// See `source_connections_per_sec`. Default 64.
    pub source_connection_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_body: defaults::DEFAULT_MAX_REQUEST_BODY,
            max_response_body: defaults::DEFAULT_MAX_RESPONSE_BODY,
            quic_idle_timeout: defaults::DEFAULT_QUIC_IDLE_TIMEOUT,
            request_timeout: defaults::DEFAULT_REQUEST_TIMEOUT,
            max_clock_skew: defaults::DEFAULT_MAX_CLOCK_SKEW,
            replay_cache_entries: defaults::DEFAULT_REPLAY_CACHE_ENTRIES,
            write_stall_timeout: defaults::DEFAULT_WRITE_STALL_TIMEOUT,
            stream_open_timeout: defaults::STREAM_OPEN_TIMEOUT,
            tunnel_liveness: defaults::DEFAULT_TUNNEL_LIVENESS,
            exit_answer_timeout: defaults::DEFAULT_EXIT_ANSWER_TIMEOUT,
            min_request_body_rate: defaults::DEFAULT_MIN_REQUEST_BODY_RATE,
            request_body_grace: defaults::REQUEST_BODY_GRACE,
            max_exits: defaults::MAX_EXITS_CEILING,
            registration_burst: defaults::NEW_EXIT_REGISTRATION_BURST,
            registrations_per_sec: defaults::NEW_EXIT_REGISTRATIONS_PER_SEC,
            retry_above_handshakes: defaults::RETRY_ABOVE_HANDSHAKES,
            answer_budget: defaults::DEFAULT_ANSWER_BUDGET,
            answer_budget_wait: defaults::DEFAULT_ANSWER_BUDGET_WAIT,
            contended_streams: defaults::DEFAULT_CONTENDED_STREAMS,
            source_connections_per_sec: defaults::DEFAULT_SOURCE_CONNECTIONS_PER_SEC,
            source_connection_burst: defaults::DEFAULT_SOURCE_CONNECTION_BURST,
        }
    }
}

/// The limit keys of a role's file. Each role fills in the keys its own schema takes and
/// leaves the others `None`, which keeps their defaults.
#[derive(Debug, Clone, Default)]
pub(crate) struct LimitsFile {
    /// `max_request_body_bytes` (client, exit, serve).
    pub(crate) max_request_body_bytes: Option<usize>,
    /// `max_response_body_bytes` (client, exit, serve).
    pub(crate) max_response_body_bytes: Option<usize>,
    /// `quic_idle_timeout_secs` (relay, client, exit, serve).
    pub(crate) quic_idle_timeout_secs: Option<u64>,
    /// `write_stall_timeout_secs` (relay, exit, serve).
    pub(crate) write_stall_timeout_secs: Option<u64>,
    /// `tunnel_liveness_secs` (relay, exit, serve).
    pub(crate) tunnel_liveness_secs: Option<u64>,
    /// `exit_answer_timeout_secs` (relay, serve).
    pub(crate) exit_answer_timeout_secs: Option<u64>,
    /// `min_request_body_rate` (relay, serve).
    pub(crate) min_request_body_rate: Option<u64>,
    /// `max_exits` (relay, serve).
    pub(crate) max_exits: Option<usize>,
    /// `contended_streams` (relay, serve).
    pub(crate) contended_streams: Option<usize>,
    /// `source_connections_per_sec` (relay, serve).
    pub(crate) source_connections_per_sec: Option<f64>,
    /// `source_connection_burst` (relay, serve).
    pub(crate) source_connection_burst: Option<u32>,
}

impl Limits {
    /// The limits the file gave, the defaults for the rest.
    pub(crate) fn from_file(file: &LimitsFile) -> Result<Self, ConfigError> {
        let default = Self::default();
        let quic_idle_timeout = seconds_within(
            "quic_idle_timeout_secs",
            file.quic_idle_timeout_secs,
            QUIC_IDLE_TIMEOUT_SECS,
            default.quic_idle_timeout,
        )?;
        let write_stall_timeout = seconds_within(
            "write_stall_timeout_secs",
            file.write_stall_timeout_secs,
            WRITE_STALL_TIMEOUT_SECS,
            default.write_stall_timeout,
        )?;
        let tunnel_liveness = seconds_within(
            "tunnel_liveness_secs",
            file.tunnel_liveness_secs,
            TUNNEL_LIVENESS_SECS,
            default.tunnel_liveness,
        )?;
        let exit_answer_timeout = seconds_within(
            "exit_answer_timeout_secs",
            file.exit_answer_timeout_secs,
            EXIT_ANSWER_TIMEOUT_SECS,
            default.exit_answer_timeout,
        )?;
        let max_exits = match file.max_exits {
            None => default.max_exits,
            Some(n @ 1..=defaults::MAX_EXITS_CEILING) => n,
            Some(_) => {
                return Err(invalid(
                    "max_exits",
                    format!(
                        "must be 1 to {} (clients accept lists of at most 1024 exits)",
                        defaults::MAX_EXITS_CEILING
                    ),
                ));
            }
        };
        let min_request_body_rate = match file.min_request_body_rate {
            None => default.min_request_body_rate,
            Some(0) => {
                return Err(invalid(
                    "min_request_body_rate",
                    "must be at least 1 byte per second",
                ));
            }
            Some(rate) => rate,
        };
        let source_connection_burst = match file.source_connection_burst {
            None => default.source_connection_burst,
            Some(0) => {
                return Err(invalid(
                    "source_connection_burst",
                    "must be at least 1 (turn the limit off with source_connections_per_sec: 0)",
                ));
            }
            Some(burst) => burst,
        };
        let source_connections_per_sec = rate(
            "source_connections_per_sec",
            file.source_connections_per_sec,
        )?
        .unwrap_or(default.source_connections_per_sec);
        Ok(Self {
            source_connections_per_sec,
            contended_streams: file.contended_streams.unwrap_or(default.contended_streams),
            source_connection_burst,
            max_request_body: positive("max_request_body_bytes", file.max_request_body_bytes)?
                .unwrap_or(default.max_request_body),
            max_response_body: positive("max_response_body_bytes", file.max_response_body_bytes)?
                .unwrap_or(default.max_response_body),
            quic_idle_timeout,
            write_stall_timeout,
            tunnel_liveness,
            exit_answer_timeout,
            min_request_body_rate,
            max_exits,
            ..default
        })
    }

    /// Adds the tunnel liveness flag, which wins over the file (exit).
    pub(crate) fn with_tunnel_liveness(
        mut self,
        args: &TunnelLivenessArgs,
    ) -> Result<Self, ConfigError> {
        if let Some(secs) = args.tunnel_liveness_secs {
            self.tunnel_liveness = seconds_within(
                "tunnel_liveness",
                Some(secs),
                TUNNEL_LIVENESS_SECS,
                self.tunnel_liveness,
            )?;
        }
        Ok(self)
    }

    /// Adds the exit answer timeout flag, which wins over the file (relay).
    pub(crate) fn with_answer_timeout(
        mut self,
        args: &AnswerTimeoutArgs,
    ) -> Result<Self, ConfigError> {
        if let Some(secs) = args.exit_answer_timeout_secs {
            self.exit_answer_timeout = seconds_within(
                "exit_answer_timeout",
                Some(secs),
                EXIT_ANSWER_TIMEOUT_SECS,
                self.exit_answer_timeout,
            )?;
        }
        Ok(self)
    }

    /// Adds the request timeout, the flag over the file's `request_timeout_secs` (client,
    /// exit, serve).
    pub(crate) fn with_request(
        mut self,
        args: &RequestArgs,
        file: Option<u64>,
    ) -> Result<Self, ConfigError> {
        match args.request_timeout_secs.or(file) {
            None => {}
            Some(secs) if REQUEST_TIMEOUT_SECS.contains(&secs) => {
                self.request_timeout = Duration::from_secs(secs);
            }
            Some(_) => return Err(out_of("request_timeout", &REQUEST_TIMEOUT_SECS, "seconds")),
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_keys_keep_the_defaults() {
        let limits = Limits::from_file(&LimitsFile::default()).unwrap();
        let default = Limits::default();
        assert_eq!(limits.max_request_body, defaults::DEFAULT_MAX_REQUEST_BODY);
        assert_eq!(limits.max_exits, defaults::MAX_EXITS_CEILING);
        assert_eq!(limits.quic_idle_timeout, default.quic_idle_timeout);
        assert_eq!(limits.answer_budget, default.answer_budget);
        assert_eq!(limits.tunnel_liveness, default.tunnel_liveness);
    }

    #[test]
    fn each_key_is_checked_against_its_range() {
        for (file, field) in [
            (
                LimitsFile {
                    quic_idle_timeout_secs: Some(601),
                    ..LimitsFile::default()
                },
                "quic_idle_timeout_secs",
            ),
            (
                LimitsFile {
                    max_response_body_bytes: Some(0),
                    ..LimitsFile::default()
                },
                "max_response_body_bytes",
            ),
            (
                LimitsFile {
                    max_exits: Some(0),
                    ..LimitsFile::default()
                },
                "max_exits",
            ),
            (
                LimitsFile {
                    source_connection_burst: Some(0),
                    ..LimitsFile::default()
                },
                "source_connection_burst",
            ),
            (
                LimitsFile {
                    exit_answer_timeout_secs: Some(601),
                    ..LimitsFile::default()
                },
                "exit_answer_timeout_secs",
            ),
        ] {
            let error = Limits::from_file(&file).unwrap_err().to_string();
            assert!(error.contains(field), "{file:?} -> {error}");
        }
        let error = Limits::default()
            .with_request(&RequestArgs::default(), Some(86_401))
            .unwrap_err()
            .to_string();
        assert!(error.contains("request_timeout"), "{error}");
    }
}
