//! Which requests an exit passes to its backend. An exit serves anonymous users, so by default
//! only inference endpoints (OpenAI-style, Anthropic Messages, Ollama-native) reach it, each
//! with its method; model management, files, fine-tuning and server administration never do.
//! Paths are checked in the form the backend will see: anything that could climb out of the
//! backend's base path (dot segments, encoded dots or slashes, empty segments) is refused
//! before any rule is consulted. Pure logic, no I/O.

use std::fmt;

use http::Method;

/// The endpoints that reach the backend unless the operator says otherwise.
pub const DEFAULT_ENDPOINTS: &[&str] = &[
    // OpenAI-style (OpenAI, vLLM, llama.cpp, Ollama's /v1).
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
    "GET /v1/models",
    "GET /v1/models/*",
    // Anthropic Messages.
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
    // Ollama-native.
    "POST /api/chat",
    "POST /api/generate",
    "POST /api/embed",
    "POST /api/embeddings",
    "GET /api/tags",
    "POST /api/show",
    "GET /api/version",
];

/// Why a rule in the configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Not `METHOD /path`.
    #[error("`{0}` is not `METHOD /path` (e.g. `POST /v1/audio/speech`, `GET /v1/models/*`)")]
    Shape(String),
    /// The method is not an HTTP token (or `*`).
    #[error("`{0}` is not an HTTP method (or `*` for any)")]
    Method(String),
    /// The path would itself be refused as unsafe, or has `*` other than as a last segment.
    #[error("`{0}` must be a clean absolute path; `*` only as the last segment (`/v1/models/*`)")]
    Path(String),
}

/// Why a request path is refused before any rule is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path must start with /")]
    NotAbsolute,
    /// `//` (an empty segment): could turn into an authority or be collapsed.
    #[error("the path has an empty segment (//)")]
    EmptySegment,
    /// A `.` or `..` segment, plain or percent-encoded.
    #[error("the path has a dot segment")]
    DotSegment,
    /// A percent-encoded `/`, `\`, `.` or control character, or a malformed escape.
    #[error("the path has an encoded slash, backslash, dot or control character")]
    Encoded,
    /// A backslash, whitespace or control character (URL parsers treat these inconsistently).
    #[error("the path has a backslash, whitespace or control character")]
    Character,
}

/// What a rule matches as path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathPattern {
    /// This path exactly.
    Exact(String),
    /// Anything below this path (`/v1/models/*`: `/v1/models/x`, `/v1/models/a/b`).
    Below(String),
}

/// One allowed endpoint: `POST /v1/chat/completions`, `GET /v1/models/*`, `* /v1/audio/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRule {
    /// `None` for any method.
    method: Option<Method>,
    path: PathPattern,
}

impl EndpointRule {
    fn matches(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        match &self.path {
            PathPattern::Exact(exact) => path == exact,
            // Paths reach here checked: no empty segments, so `rest` is never just `/`
            // unless the rule is `/*` and the path the root.
            PathPattern::Below(prefix) => path
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
        }
    }
}

impl std::str::FromStr for EndpointRule {
    type Err = RuleError;

    fn from_str(raw: &str) -> Result<Self, RuleError> {
        let mut parts = raw.split_whitespace();
        let (Some(method), Some(path), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(RuleError::Shape(raw.to_owned()));
        };
        let method = match method {
            "*" => None,
            m => Some(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| RuleError::Method(m.to_owned()))?,
            ),
        };
        let bad_path = || RuleError::Path(path.to_owned());
        let (base, below) = match path.strip_suffix("/*") {
            Some(base) => (base, true),
            None => (path, false),
        };
        if base.contains(['*', '?']) || (!base.is_empty() && check_path(base).is_err()) {
            return Err(bad_path());
        }
        let path = match (base.is_empty(), below) {
            // `/*`: every path.
            (true, true) => PathPattern::Below(String::new()),
            (true, false) => return Err(bad_path()),
            (false, true) => PathPattern::Below(base.to_owned()),
            (false, false) => PathPattern::Exact(base.to_owned()),
        };
        Ok(Self { method, path })
    }
}

impl fmt::Display for EndpointRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = self.method.as_ref().map_or("*", Method::as_str);
        match &self.path {
            PathPattern::Exact(path) => write!(f, "{method} {path}"),
            PathPattern::Below(path) => write!(f, "{method} {path}/*"),
        }
    }
}

/// The endpoints an exit passes to its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPolicy {
    rules: Vec<EndpointRule>,
}

impl Default for EndpointPolicy {
    /// [`DEFAULT_ENDPOINTS`].
    fn default() -> Self {
        Self {
            rules: DEFAULT_ENDPOINTS
                .iter()
                .filter_map(|rule| rule.parse().ok())
                .collect(),
        }
    }
}

/// Why a request may not reach the backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The path could escape the backend's base path or be read differently by the backend.
    #[error("unsafe path: {0}")]
    Path(#[from] PathError),
    /// No rule allows this method and path.
    #[error("{method} {path} is not an endpoint this exit serves")]
    NotAllowed {
        /// The request's method.
        method: Method,
        /// The request's path (without the query).
        path: String,
    },
}

impl EndpointPolicy {
    /// The defaults plus `extra` (`replace`: only `extra`).
    #[must_use]
    pub fn new(extra: Vec<EndpointRule>, replace: bool) -> Self {
        let mut policy = if replace {
            Self { rules: Vec::new() }
        } else {
            Self::default()
        };
        for rule in extra {
            if !policy.rules.contains(&rule) {
                policy.rules.push(rule);
            }
        }
        policy
    }

    /// The rules, for logs and `/status`.
    #[must_use]
    pub fn rules(&self) -> &[EndpointRule] {
        &self.rules
    }

    /// Checks a request's method and origin-form target (`/path?query`). Returns the
    /// target to send, its path normalised (escaped letters, digits, `-`, `_`, `~` decoded,
    /// other escapes in upper case), so the backend sees exactly the path the rules matched.
    pub fn check(&self, method: &Method, path_and_query: &str) -> Result<String, Refused> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        check_path(path)?;
        let path = normalize(path);
        if !self.rules.iter().any(|rule| rule.matches(method, &path)) {
            return Err(Refused::NotAllowed {
                method: method.clone(),
                path,
            });
        }
        Ok(match query {
            Some(query) => format!("{path}?{query}"),
            None => path,
        })
    }
}

/// Refuses paths a URL parser or the backend could read as something else: whatever passes
/// is appended to the backend's base path and stays below it.
pub(super) fn check_path(path: &str) -> Result<(), PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if path
        .bytes()
        .any(|b| b == b'\\' || b.is_ascii_whitespace() || b.is_ascii_control() || b >= 0x80)
    {
        return Err(PathError::Character);
    }
    for segment in rest.split('/') {
        if segment.is_empty() {
            // Only the root itself may end in `/`: `/v1/` would be a different resource.
            if rest.is_empty() {
                break;
            }
            return Err(PathError::EmptySegment);
        }
        let decoded = decode_segment(segment)?;
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
    }
    Ok(())
}

/// RFC 3986 §6.2.2 normalisation of a checked path: escapes of unreserved characters decoded,
/// the others' hex digits in upper case.
fn normalize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at + 1..at + 3).unwrap_or_default();
        match u8::from_str_radix(escape, 16) {
            Ok(byte) if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') => {
                out.push(char::from(byte));
            }
            _ => {
                out.push('%');
                out.push_str(&escape.to_ascii_uppercase());
            }
        }
        rest = rest.get(at + 3..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

/// Decodes `%XX` escapes; refuses encoded `/`, `\`, `.` and control characters, and
/// malformed escapes, which parsers disagree on.
fn decode_segment(segment: &str) -> Result<String, PathError> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::Encoded)?;
            if matches!(hex, b'/' | b'\\' | b'.' | b'%') || hex.is_ascii_control() {
                return Err(PathError::Encoded);
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(policy: &EndpointPolicy, method: &str, path: &str) -> bool {
        policy
            .check(&Method::from_bytes(method.as_bytes()).unwrap(), path)
            .is_ok()
    }

    #[test]
    fn every_default_rule_parses() {
        assert_eq!(
            EndpointPolicy::default().rules().len(),
            DEFAULT_ENDPOINTS.len()
        );
        for rule in DEFAULT_ENDPOINTS {
            assert_eq!(rule.parse::<EndpointRule>().unwrap().to_string(), *rule);
        }
    }

    #[test]
    fn inference_endpoints_pass_with_their_method() {
        let policy = EndpointPolicy::default();
        for (method, path) in [
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/embeddings"),
            ("POST", "/v1/responses"),
            ("GET", "/v1/models"),
            ("GET", "/v1/models/gemma3:270m"),
            ("GET", "/v1/models/meta-llama/Llama-3-8B"),
            ("GET", "/v1/models?limit=2"),
            ("POST", "/v1/messages"),
            ("POST", "/v1/messages/count_tokens"),
            ("POST", "/api/chat"),
            ("POST", "/api/generate"),
            ("POST", "/api/embed"),
            ("POST", "/api/embeddings"),
            ("GET", "/api/tags"),
            ("POST", "/api/show"),
            ("GET", "/api/version"),
            ("POST", "/v1/chat/completions?api-version=2024-10-21"),
        ] {
            assert!(allowed(&policy, method, path), "{method} {path}");
        }
    }

    #[test]
    fn management_and_wrong_methods_are_refused() {
        let policy = EndpointPolicy::default();
        for (method, path) in [
            // Ollama model management.
            ("DELETE", "/api/delete"),
            ("POST", "/api/pull"),
            ("POST", "/api/create"),
            ("POST", "/api/copy"),
            ("POST", "/api/push"),
            ("POST", "/api/blobs/sha256:abc"),
            ("HEAD", "/api/blobs/sha256:abc"),
            ("GET", "/api/ps"),
            // llama.cpp server administration.
            ("GET", "/slots"),
            ("POST", "/slots/0?action=erase"),
            ("POST", "/v1/load_lora_adapter"),
            ("GET", "/props"),
            // OpenAI platform state tied to the operator's key.
            ("GET", "/v1/files"),
            ("POST", "/v1/files"),
            ("POST", "/v1/fine_tuning/jobs"),
            ("POST", "/v1/batches"),
            ("DELETE", "/v1/models/ft:gpt-4o:org"),
            // Right path, wrong method; near misses.
            ("GET", "/v1/chat/completions"),
            ("DELETE", "/v1/chat/completions"),
            ("POST", "/v1/models"),
            ("POST", "/v1/chat/completions/"),
            ("POST", "/v1/chat/completionsX"),
            ("GET", "/v1/models/"),
            ("GET", "/v1/modelsX"),
            ("GET", "/"),
            ("POST", "/admin"),
        ] {
            assert!(!allowed(&policy, method, path), "{method} {path}");
        }
    }

    #[test]
    fn escaping_paths_are_refused_before_the_rules() {
        let any = EndpointPolicy::new(vec!["* /*".parse().unwrap()], true);
        for (path, why) in [
            ("/v1/../../admin", PathError::DotSegment),
            ("/v1/%2e%2e/%2e%2e/admin", PathError::Encoded),
            ("/v1/%2E%2E/admin", PathError::Encoded),
            ("/v1/.%2e/admin", PathError::Encoded),
            ("/v1/models/a%2eb", PathError::Encoded),
            ("/v1/./chat/completions", PathError::DotSegment),
            ("/v1/models/..", PathError::DotSegment),
            ("/v1/chat%2fcompletions", PathError::Encoded),
            ("/v1/%2F..%2Fadmin", PathError::Encoded),
            ("/v1/%5c..%5cadmin", PathError::Encoded),
            ("/v1/%00", PathError::Encoded),
            ("/v1/%zz", PathError::Encoded),
            ("/v1/%2", PathError::Encoded),
            ("/v1/%252e%252e", PathError::Encoded),
            ("//evil.example/v1/models", PathError::EmptySegment),
            ("/v1//models", PathError::EmptySegment),
            ("/v1/models/", PathError::EmptySegment),
            ("/v1/..\\admin", PathError::Character),
            ("/v1/\t../admin", PathError::Character),
            ("/v1/ ../admin", PathError::Character),
            ("/v1/\u{e9}", PathError::Character),
            ("v1/models", PathError::NotAbsolute),
            ("http://evil/", PathError::NotAbsolute),
        ] {
            assert_eq!(
                any.check(&Method::GET, path),
                Err(Refused::Path(why)),
                "{path}"
            );
        }
        // Dots inside a segment are ordinary characters (model ids like `llama-3.1`).
        assert!(allowed(&any, "GET", "/v1/models/llama-3.1..q4"));
        assert!(allowed(&any, "GET", "/v1/models/a%3Ab"));
        assert!(allowed(&any, "GET", "/"));
    }

    #[test]
    fn paths_are_normalised_before_the_rules() {
        let policy = EndpointPolicy::default();
        // An escaped letter is the same path: it matches, and the backend gets the plain form.
        assert_eq!(
            policy
                .check(&Method::POST, "/v1/chat/%63ompletions?x=%2e")
                .unwrap(),
            "/v1/chat/completions?x=%2e"
        );
        // So an escaped management path is refused like the plain one.
        assert!(!allowed(&policy, "POST", "/api/%70ull"));
        assert_eq!(
            policy.check(&Method::GET, "/v1/models/a%3ab%20c").unwrap(),
            "/v1/models/a%3Ab%20c"
        );
    }

    #[test]
    fn operators_extend_or_replace_the_defaults() {
        let extended = EndpointPolicy::new(
            vec![
                "POST /api/pull".parse().unwrap(),
                "* /v1/audio/*".parse().unwrap(),
            ],
            false,
        );
        assert!(allowed(&extended, "POST", "/api/pull"));
        assert!(allowed(&extended, "PUT", "/v1/audio/speech"));
        assert!(allowed(&extended, "POST", "/v1/chat/completions"));
        assert!(!allowed(&extended, "GET", "/api/pull"));
        let replaced =
            EndpointPolicy::new(vec!["post /v1/chat/completions".parse().unwrap()], true);
        assert_eq!(replaced.rules().len(), 1);
        assert!(allowed(&replaced, "POST", "/v1/chat/completions"));
        assert!(!allowed(&replaced, "GET", "/v1/models"));
    }

    #[test]
    fn bad_rules_are_named() {
        for bad in [
            "/v1/x",
            "POST",
            "POST /v1/x extra",
            "PO ST /v1/x",
            "POST v1/x",
            "POST /v1/../admin",
            "POST /v1/*/x",
            "POST /v1/x*",
            "POST /v1/x?y",
            "POST /v1//x",
        ] {
            assert!(bad.parse::<EndpointRule>().is_err(), "{bad}");
        }
        assert!("get /v1/models/*".parse::<EndpointRule>().is_ok());
    }
}
