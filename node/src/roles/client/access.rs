//! Which local requests the client answers, and which of their headers it forwards.
//!
//! The local endpoint has no credential: whatever can send it a request can use the user's
//! exits and read the answers. A web page can, twice over: by DNS rebinding (its own name
//! resolving to 127.0.0.1, so the browser sends `Host: attacker.example`) and by a
//! cross-origin request (the browser sends the page's `Origin`). So requests are answered only
//! when `Host` is a loopback name or address (or configured), and a browser request only when
//! its `Origin` is loopback (or configured). Pure logic, no I/O.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::web::api_error::ApiError;

/// What the local endpoint answers and forwards beyond the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientPolicy {
    /// Request headers forwarded in addition to
    /// [`FORWARDED_REQUEST_HEADERS`](crate::web::http_message::FORWARDED_REQUEST_HEADERS).
    pub forward_headers: Vec<HeaderName>,
    /// `Host` names answered in addition to loopback ones (lower case, no port); `*` for any.
    pub allowed_hosts: Vec<String>,
    /// Web origins answered in addition to loopback ones (`scheme://host[:port]`, lower
    /// case); `*` for any.
    pub allowed_origins: Vec<String>,
}

impl ClientPolicy {
    /// Whether a request header is forwarded to the exit.
    #[must_use]
    pub fn forwards(&self, name: &HeaderName) -> bool {
        crate::web::http_message::FORWARDED_REQUEST_HEADERS.contains(&name.as_str())
            || self.forward_headers.contains(name)
    }

    /// Refuses a local request from a host or web origin the client does not answer.
    pub fn check(&self, headers: &HeaderMap, authority: Option<&str>) -> Result<(), ApiError> {
        let host = headers
            .get(http::header::HOST)
            .map(|h| h.to_str().unwrap_or("\u{fffd}"))
            .or(authority);
        // HTTP/1.0 without `Host` is no browser's request, and names no host to rebind.
        if let Some(host) = host
            && !self.host_allowed(host)
        {
            return Err(ApiError::Forbidden {
                code: "host_not_allowed",
                message: format!(
                    "this endpoint answers only requests to a loopback address (got Host `{}`); add the name with --allowed-host if it is yours",
                    host.chars().take(100).collect::<String>()
                ),
            });
        }
        let origins: Vec<_> = headers.get_all(http::header::ORIGIN).iter().collect();
        for origin in &origins {
            let origin = origin.to_str().unwrap_or("\u{fffd}");
            if !self.origin_allowed(origin) {
                return Err(ApiError::Forbidden {
                    code: "origin_not_allowed",
                    message: format!(
                        "this endpoint does not answer web pages from `{}`; add the origin with --allowed-origin if it is yours",
                        origin.chars().take(100).collect::<String>()
                    ),
                });
            }
        }
        // A browser's cross-site request without `Origin` (a no-cors GET): refused too.
        let cross_site = headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
        if origins.is_empty() && cross_site && !self.allowed_origins.iter().any(|o| o == "*") {
            return Err(ApiError::Forbidden {
                code: "origin_not_allowed",
                message: "this endpoint does not answer cross-site browser requests".into(),
            });
        }
        Ok(())
    }

    /// The origin to name in `Access-Control-Allow-Origin` on the answer: the request's
    /// `Origin` when it is allowed (browsers then let the page read the answer), else none.
    /// Requests from other origins never get this far (see [`ClientPolicy::check`]).
    #[must_use]
    pub fn cors_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let mut origins = headers.get_all(http::header::ORIGIN).iter();
        let origin = origins.next()?;
        (origins.next().is_none() && self.origin_allowed(origin.to_str().ok()?))
            .then(|| origin.clone())
    }

    fn host_allowed(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else {
            return false;
        };
        is_loopback_name(&name) || self.allowed_hosts.iter().any(|h| h == "*" || *h == name)
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        if self
            .allowed_origins
            .iter()
            .any(|o| o == "*" || *o == origin)
        {
            return true;
        }
        // `null` (sandboxed frames, files) and anything unparsable are not loopback.
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false;
        };
        matches!(scheme, "http" | "https")
            && !rest.contains(['/', '@'])
            && host_name(rest).is_some_and(|name| is_loopback_name(&name))
    }
}

/// Whether a request is a CORS preflight, which the client answers itself (an exit passes no
/// `OPTIONS`).
#[must_use]
pub(super) fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight from `origin` (already allowed): any method and the headers
/// asked for (what is not forwarded stays at the client anyway), cached for ten minutes.
#[must_use]
pub(super) fn preflight_headers(origin: HeaderValue, request: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        http::header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    if let Some(asked) = request.get(http::header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(http::header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    headers.insert(
        http::header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    headers.insert(http::header::VARY, HeaderValue::from_static("Origin"));
    headers
}

/// The name or address in a `Host` value (`name[:port]`, `[v6][:port]`), lower case, without
/// a trailing dot; `None` when it is not one.
fn host_name(host: &str) -> Option<String> {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || is_port(after.strip_prefix(':')?)) {
            return None;
        }
        inside
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return None,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    (!name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':')))
    .then_some(name)
}

fn is_port(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// `localhost`, `*.localhost` (RFC 6761: always loopback) or a loopback address.
fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn code(policy: &ClientPolicy, pairs: &[(&str, &str)]) -> Option<&'static str> {
        policy.check(&headers(pairs), None).err().map(|e| e.code())
    }

    #[test]
    fn loopback_hosts_are_answered_and_others_refused() {
        let policy = ClientPolicy::default();
        for host in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "127.1.2.3:80",
            "localhost:8080",
            "LOCALHOST",
            "localhost.",
            "app.localhost:3000",
            "[::1]:8080",
            "[::1]",
        ] {
            assert_eq!(code(&policy, &[("host", host)]), None, "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:8080",
            "localhost.attacker.example",
            "127.0.0.1.nip.io:8080",
            "192.168.1.10:8080",
            "0.0.0.0:8080",
            "[::ffff:7f00:1]:8080x",
            "localhost:80:80",
            "",
        ] {
            assert_eq!(
                code(&policy, &[("host", host)]),
                Some("host_not_allowed"),
                "{host}"
            );
        }
        assert_eq!(code(&policy, &[]), None, "no Host at all (HTTP/1.0)");
        let error = policy
            .check(&headers(&[("host", "attacker.example")]), None)
            .unwrap_err();
        assert_eq!(error.status(), 403);
        assert!(error.to_string().contains("--allowed-host"));
    }

    #[test]
    fn configured_hosts_are_answered() {
        let policy = ClientPolicy {
            allowed_hosts: vec!["tokengo-client".into()],
            ..ClientPolicy::default()
        };
        assert_eq!(code(&policy, &[("host", "tokengo-client:8080")]), None);
        assert_eq!(
            code(&policy, &[("host", "other:8080")]),
            Some("host_not_allowed")
        );
        let any = ClientPolicy {
            allowed_hosts: vec!["*".into()],
            ..ClientPolicy::default()
        };
        assert_eq!(code(&any, &[("host", "10.0.0.5:8080")]), None);
    }

    #[test]
    fn browser_origins_must_be_loopback_or_configured() {
        let policy = ClientPolicy::default();
        let host = ("host", "127.0.0.1:8080");
        for origin in [
            "http://localhost:3000",
            "http://127.0.0.1:5173",
            "https://[::1]",
        ] {
            assert_eq!(code(&policy, &[host, ("origin", origin)]), None, "{origin}");
        }
        for origin in [
            "https://attacker.example",
            "http://localhost.attacker.example",
            "null",
            "file://",
            "http://user@localhost",
            "localhost",
        ] {
            assert_eq!(
                code(&policy, &[host, ("origin", origin)]),
                Some("origin_not_allowed"),
                "{origin}"
            );
        }
        assert_eq!(
            code(&policy, &[host, ("sec-fetch-site", "cross-site")]),
            Some("origin_not_allowed")
        );
        assert_eq!(
            code(&policy, &[host, ("sec-fetch-site", "same-origin")]),
            None
        );
        let configured = ClientPolicy {
            allowed_origins: vec!["https://chat.example.com".into()],
            ..ClientPolicy::default()
        };
        assert_eq!(
            code(&configured, &[host, ("origin", "https://chat.example.com")]),
            None
        );
    }

    #[test]
    fn allowed_origins_get_cors_answers() {
        let policy = ClientPolicy::default();
        let request = headers(&[
            ("origin", "http://localhost:3000"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type, authorization",
            ),
        ]);
        assert!(is_preflight(&Method::OPTIONS, &request));
        assert!(!is_preflight(&Method::POST, &request));
        assert!(!is_preflight(
            &Method::OPTIONS,
            &headers(&[("origin", "http://localhost")])
        ));
        let origin = policy.cors_origin(&request).unwrap();
        assert_eq!(origin, "http://localhost:3000");
        let answer = preflight_headers(origin, &request);
        assert_eq!(
            answer["access-control-allow-origin"],
            "http://localhost:3000"
        );
        assert_eq!(
            answer["access-control-allow-headers"],
            "content-type, authorization"
        );
        assert_eq!(
            policy.cors_origin(&headers(&[("origin", "https://attacker.example")])),
            None
        );
        assert_eq!(policy.cors_origin(&headers(&[])), None);
    }

    #[test]
    fn only_listed_headers_are_forwarded() {
        let policy = ClientPolicy {
            forward_headers: vec![HeaderName::from_static("x-team")],
            ..ClientPolicy::default()
        };
        for name in [
            "content-type",
            "accept",
            "openai-beta",
            "anthropic-version",
            "x-team",
        ] {
            assert!(policy.forwards(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "user-agent",
            "openai-organization",
            "openai-project",
            "x-stainless-os",
            "origin",
            "referer",
            "x-api-key",
            "accept-language",
            "authorization",
            "cookie",
        ] {
            assert!(!policy.forwards(&HeaderName::from_static(name)), "{name}");
        }
    }
}
