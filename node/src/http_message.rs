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
#[allow(clippy::unwrap_used)]
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
