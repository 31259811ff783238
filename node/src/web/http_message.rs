//! Mapping between HTTP messages and their Binary HTTP form, shared by the client (which
//! encapsulates requests) and the exit (which replays them to the backend): which headers
//! travel, and which stop at a hop.

use http::{HeaderMap, HeaderName, HeaderValue};
use tokengo_proto::bhttp::Field;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus framing
/// headers each hop recomputes.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Whether `name` is dropped at each hop.
#[must_use]
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Request headers the client forwards by default: what the listed inference APIs need to
/// read a request and negotiate its answer, nothing that tells one user or tool from another.
/// Operators add names with `forward_headers`.
pub const FORWARDED_REQUEST_HEADERS: &[&str] = &[
    "content-type",
    "content-encoding",
    "accept",
    "accept-encoding",
    // OpenAI: opt-in to beta APIs (Assistants v2, Realtime).
    "openai-beta",
    // Anthropic Messages: API version and beta features.
    "anthropic-version",
    "anthropic-beta",
];

/// The `User-Agent` every forwarded request carries: the same for every user of this version,
/// instead of the tool's own (which names the tool, its version, often the OS and runtime).
pub const USER_AGENT: &str = concat!("tokengo/", env!("CARGO_PKG_VERSION"));

/// Headers by which a proxy names the client it forwards for. The exit never forwards any of
/// them from a request: the backend must not be told an address, real or forged.
const FORWARDING: &[&str] = &[
    "forwarded",
    "via",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "client-ip",
];

/// Whether `name` is a forwarding header (`Forwarded`, `Via`, `X-Forwarded-*`, client-IP
/// headers of common proxies).
#[must_use]
pub fn is_forwarding(name: &HeaderName) -> bool {
    FORWARDING.contains(&name.as_str()) || name.as_str().starts_with("x-forwarded-")
}

/// Credential headers: a request's own are never forwarded to the backend (the exit's
/// configured headers are the only credentials the backend sees).
const CREDENTIALS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
];

/// Whether `name` carries a credential.
#[must_use]
pub fn is_credential(name: &HeaderName) -> bool {
    CREDENTIALS.contains(&name.as_str())
}

/// Distributed-tracing context headers (W3C Trace Context and Baggage, B3, Jaeger, Sentry,
/// Datadog, AWS X-Ray, Google Cloud, OpenTracing). A trace id set by the user's tool or by the
/// client's own tracing would let whoever sees it at the exit or the backend join their trace
/// to the user's, so none of them leaves the client.
const TRACE_CONTEXT: &[&str] = &[
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "uber-trace-id",
    "sentry-trace",
    "x-cloud-trace-context",
    "x-amzn-trace-id",
    "grpc-trace-bin",
    "x-ot-span-context",
];

/// Prefixes of families of tracing headers (`x-b3-traceid`, `uberctx-…` Jaeger baggage,
/// `ot-baggage-…`, `x-datadog-trace-id`, …).
const TRACE_CONTEXT_PREFIXES: &[&str] = &[
    "x-b3-",
    "uberctx-",
    "ot-baggage-",
    "ot-tracer-",
    "x-datadog-",
];

/// Whether `name` carries distributed-tracing context.
#[must_use]
pub fn is_trace_context(name: &HeaderName) -> bool {
    let name = name.as_str();
    TRACE_CONTEXT.contains(&name) || TRACE_CONTEXT_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Response field in which the exit tells the client how long the backend took (milliseconds,
/// decimal). It travels inside the encrypted response, only between exit and client: the exit
/// drops any copy the backend sent, and the client removes it before the user's tool sees the
/// response. The client uses it to tell the backend's time from the gateway's overhead.
pub const BACKEND_TIME_FIELD: &str = "tokengo-backend-ms";

/// Whether `name` is [`BACKEND_TIME_FIELD`].
#[must_use]
pub fn is_backend_time(name: &HeaderName) -> bool {
    name.as_str() == BACKEND_TIME_FIELD
}

/// The backend time from a response's fields, if the exit sent a plausible one.
#[must_use]
pub fn backend_time(fields: &[Field]) -> Option<std::time::Duration> {
    let field = fields
        .iter()
        .rev()
        .find(|f| f.name.eq_ignore_ascii_case(BACKEND_TIME_FIELD.as_bytes()))?;
    let millis: f64 = std::str::from_utf8(&field.value)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A day is far beyond any idle timeout; anything outside is a broken or lying exit.
    (millis.is_finite() && (0.0..=86_400_000.0).contains(&millis))
        .then(|| std::time::Duration::from_secs_f64(millis / 1000.0))
}

/// The field that reports `duration` as the backend's time.
#[must_use]
pub fn backend_time_field(duration: std::time::Duration) -> Field {
    Field {
        name: BACKEND_TIME_FIELD.as_bytes().to_vec(),
        value: format!("{:.3}", duration.as_secs_f64() * 1000.0).into_bytes(),
    }
}

/// The backend time as a value of fixed width (12 bytes, zero-padded milliseconds, at most a
/// day), so an answer whose head is written before its body can carry the time of the whole
/// exchange: the value is rewritten in place once the body is in. Reads as
/// [`backend_time_field`]'s does.
#[must_use]
pub fn backend_time_fixed(duration: std::time::Duration) -> Vec<u8> {
    let millis = (duration.as_secs_f64() * 1000.0).min(86_400_000.0);
    format!("{millis:012.3}").into_bytes()
}

/// [`backend_time_field`] with a [`backend_time_fixed`] value.
#[must_use]
pub fn backend_time_field_fixed(duration: std::time::Duration) -> Field {
    Field {
        name: BACKEND_TIME_FIELD.as_bytes().to_vec(),
        value: backend_time_fixed(duration),
    }
}

/// The field that dates a request (or an exit's refusal) with `time`, as an HTTP date.
#[must_use]
pub fn date_field(time: std::time::SystemTime) -> Field {
    Field {
        name: b"date".to_vec(),
        value: httpdate::fmt_http_date(time).into_bytes(),
    }
}

/// A message's `Date` in Unix seconds, if it has exactly one valid one.
#[must_use]
pub fn request_date(fields: &[Field]) -> Option<u64> {
    let mut dates = fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(b"date"));
    let date = dates.next()?;
    if dates.next().is_some() {
        return None;
    }
    let time = httpdate::parse_http_date(std::str::from_utf8(&date.value).ok()?).ok()?;
    Some(crate::clock::unix_secs(time))
}

/// Converts headers to BHTTP fields, keeping order and repeated headers, skipping hop-by-hop
/// headers, the names listed in `Connection`, and anything `drop` rejects.
#[must_use]
pub fn to_fields(headers: &HeaderMap, drop: impl Fn(&HeaderName) -> bool) -> Vec<Field> {
    let connection_listed: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            !is_hop_by_hop(name)
                && !drop(name)
                && !connection_listed
                    .iter()
                    .any(|listed| listed == name.as_str())
        })
        .map(|(name, value)| Field {
            name: name.as_str().as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        })
        .collect()
}

/// Converts BHTTP fields back to headers, skipping hop-by-hop headers and fields that are not
/// valid HTTP (a peer's bytes must never panic or smuggle a header).
#[must_use]
pub fn to_header_map(fields: &[Field]) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&field.name),
            HeaderValue::from_bytes(&field.value),
        ) else {
            continue;
        };
        if !is_hop_by_hop(&name) {
            headers.append(name, value);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_repeated_headers_and_drops_hop_by_hop() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.append(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.append("x-secret", HeaderValue::from_static("s"));
        headers.append("host", HeaderValue::from_static("localhost:8080"));
        headers.append("authorization", HeaderValue::from_static("Bearer user"));
        let fields = to_fields(&headers, |n| n == http::header::AUTHORIZATION);
        let names: Vec<_> = fields
            .iter()
            .map(|f| String::from_utf8_lossy(&f.name).into_owned())
            .collect();
        assert_eq!(names, ["x-a", "x-a"]);
        let back = to_header_map(&fields);
        let values: Vec<_> = back.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
    }

    #[test]
    fn forwarding_and_credential_headers_are_recognised() {
        for name in [
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-host",
            "via",
            "x-real-ip",
        ] {
            assert!(is_forwarding(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["authorization", "x-api-key", "cookie"] {
            assert!(is_credential(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["content-type", "accept", "openai-beta"] {
            let name = HeaderName::from_static(name);
            assert!(!is_forwarding(&name) && !is_credential(&name));
        }
        assert!(USER_AGENT.starts_with("tokengo/"));
    }

    #[test]
    fn dates_round_trip_and_duplicates_are_refused() {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let field = date_field(time);
        assert_eq!(field.value, b"Tue, 14 Nov 2023 22:13:20 GMT");
        assert_eq!(
            request_date(std::slice::from_ref(&field)),
            Some(1_700_000_000)
        );
        assert_eq!(request_date(&[field.clone(), field]), None);
        let bad = Field {
            name: b"Date".to_vec(),
            value: b"yesterday".to_vec(),
        };
        assert_eq!(request_date(&[bad]), None);
        assert_eq!(request_date(&[]), None);
    }

    #[test]
    fn trace_context_headers_are_recognised() {
        for name in [
            "traceparent",
            "tracestate",
            "baggage",
            "b3",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-sampled",
            "uber-trace-id",
            "uberctx-user",
            "sentry-trace",
            "x-datadog-trace-id",
            "x-amzn-trace-id",
            "x-cloud-trace-context",
        ] {
            assert!(is_trace_context(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["content-type", "x-request-kind", "accept", "user-agent"] {
            assert!(!is_trace_context(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn backend_time_round_trips_and_rejects_nonsense() {
        let field = backend_time_field(std::time::Duration::from_micros(12_345));
        assert_eq!(field.value, b"12.345");
        let time = backend_time(&[field]).unwrap();
        assert_eq!(time.as_micros(), 12_345);
        for bad in [&b"-1"[..], b"NaN", b"inf", b"1e12", b"soon"] {
            let field = Field {
                name: BACKEND_TIME_FIELD.as_bytes().to_vec(),
                value: bad.to_vec(),
            };
            assert_eq!(backend_time(&[field]), None, "{bad:?}");
        }
    }

    #[test]
    fn fixed_width_backend_time_reads_the_same_and_never_widens() {
        let field = backend_time_field_fixed(std::time::Duration::from_micros(12_345));
        assert_eq!(field.value, b"00000012.345");
        assert_eq!(backend_time(&[field]).unwrap().as_micros(), 12_345);
        for duration in [
            std::time::Duration::ZERO,
            std::time::Duration::from_secs(86_400),
            std::time::Duration::from_secs(10 * 86_400),
        ] {
            assert_eq!(backend_time_fixed(duration).len(), 12, "{duration:?}");
        }
    }

    #[test]
    fn invalid_fields_are_skipped() {
        let fields = vec![
            Field {
                name: b"bad name".to_vec(),
                value: b"v".to_vec(),
            },
            Field {
                name: b"x-ok".to_vec(),
                value: b"line\nbreak".to_vec(),
            },
            Field {
                name: b"transfer-encoding".to_vec(),
                value: b"chunked".to_vec(),
            },
            Field {
                name: b"x-good".to_vec(),
                value: b"yes".to_vec(),
            },
        ];
        let headers = to_header_map(&fields);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers.get("x-good").unwrap(), "yes");
    }
}
