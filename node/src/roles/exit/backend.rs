//! The exit's HTTP client for the AI backend: pooled connections, what of a user's request may
//! reach the backend (the endpoint policy, headers), and the mapping of backend failures to
//! the errors a user's tool understands.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use tokengo_proto::bhttp::RequestHead;

use super::config::BackendConfig;
use super::endpoint::{EndpointPolicy, Refused};
use crate::{web::api_error::ApiError, web::http_message};

/// How long a readiness probe waits for the backend.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A decapsulated request, ready for the backend.
#[derive(Debug)]
pub struct BackendRequest {
    /// HTTP method.
    pub method: Method,
    /// Path and query, starting with `/`.
    pub path_and_query: String,
    /// End-to-end headers from the user's tool.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl BackendRequest {
    /// Checks a BHTTP request head from the client against `policy`. Anything unusable
    /// becomes a 400 and anything the policy refuses a 403 for the user, never a panic or a
    /// request to somewhere other than the configured backend's allowed endpoints.
    pub fn from_bhttp(
        head: &RequestHead,
        body: Bytes,
        policy: &EndpointPolicy,
    ) -> Result<Self, ApiError> {
        let method = Method::from_bytes(&head.method)
            .map_err(|_| ApiError::BadRequest("invalid method".into()))?;
        let path = std::str::from_utf8(&head.path)
            .map_err(|_| ApiError::BadRequest("path is not UTF-8".into()))?;
        // Only origin-form paths: an absolute URL or authority form could point the exit at
        // another host.
        if !path.starts_with('/') || path.starts_with("//") {
            return Err(ApiError::BadRequest(
                "path must start with a single /".into(),
            ));
        }
        path.parse::<http::uri::PathAndQuery>()
            .map_err(|_| ApiError::BadRequest("invalid path".into()))?;
        let path = policy.check(&method, path).map_err(|refused| match refused {
            Refused::Path(why) => ApiError::Forbidden {
                code: "path_not_allowed",
                message: format!("{why}; this exit refuses such paths"),
            },
            not_allowed @ Refused::NotAllowed { .. } => ApiError::Forbidden {
                code: "endpoint_not_allowed",
                message: format!(
                    "{not_allowed}; exits serve inference endpoints only (see README, \"What an exit exposes\")"
                ),
            },
        })?;
        let mut headers = http_message::to_header_map(&head.fields);
        // Nothing from the request may claim an address or a credential at the backend: the
        // exit's configured headers are the only credentials the backend sees.
        let dropped: Vec<_> = headers
            .keys()
            .filter(|name| http_message::is_forwarding(name) || http_message::is_credential(name))
            .cloned()
            .collect();
        for name in dropped {
            headers.remove(name);
        }
        Ok(Self {
            method,
            path_and_query: path,
            headers,
            body,
        })
    }
}

/// The backend client.
#[derive(Debug, Clone)]
pub struct Backend {
    client: reqwest::Client,
    base: String,
    headers: HeaderMap,
    idle_timeout: Duration,
    policy: EndpointPolicy,
}

impl Backend {
    /// Builds the pooled client.
    pub fn new(config: &BackendConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // No read timeout here: a non-streamed answer's head comes only when generation
            // ends, so the wait for the head is bounded by the request timeout and the body by
            // the idle timeout per read, both applied by the gateway.
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(Self {
            client,
            base: config.url.as_str().trim_end_matches('/').to_owned(),
            headers: config.headers.0.clone(),
            idle_timeout: config.idle_timeout,
            policy: config.allow.clone(),
        })
    }

    /// The endpoints that may reach the backend.
    #[must_use]
    pub fn policy(&self) -> &EndpointPolicy {
        &self.policy
    }

    /// The idle timeout applied between body chunks.
    #[must_use]
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Sends `request` and returns the response once its head arrived.
    pub async fn send(&self, request: BackendRequest) -> Result<reqwest::Response, ApiError> {
        let url = self.url(&request.path_and_query)?;
        let mut headers = request.headers;
        for (name, value) in &self.headers {
            // The exit's configured headers (its credential above all) win over the user's.
            headers.insert(name.clone(), value.clone());
        }
        self.client
            .request(request.method, url)
            .headers(headers)
            .body(request.body)
            .send()
            .await
            .map_err(|e| classify(&e))
    }

    /// The backend URL for a checked path: the base URL's path followed by it. A URL parser
    /// that would normalise the result out of the base path (it cannot, for paths the policy
    /// passed) is refused rather than followed.
    fn url(&self, path_and_query: &str) -> Result<reqwest::Url, ApiError> {
        let joined = format!("{}{}", self.base, path_and_query);
        let url = reqwest::Url::parse(&joined)
            .map_err(|_| ApiError::BadRequest("invalid path".into()))?;
        let base_path = reqwest::Url::parse(&self.base)
            .map(|base| base.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(path, _)| path);
        if url.path() != format!("{base_path}{path}") {
            return Err(ApiError::Forbidden {
                code: "path_not_allowed",
                message: "the path would leave the backend's base path".into(),
            });
        }
        Ok(url)
    }

    /// Whether the backend answers HTTP at all (any status counts): a GET of its base URL,
    /// without the exit's credentials, bounded in time. For readiness.
    pub async fn probe(&self) -> bool {
        let url = format!("{}/", self.base);
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, self.client.get(url).send()).await,
            Ok(Ok(_))
        )
    }

    /// Fetches the backend's model ids (`GET /v1/models`) for the exit's descriptor; an empty
    /// list if the backend does not say.
    pub async fn models(&self) -> Vec<String> {
        #[derive(serde::Deserialize)]
        struct Models {
            data: Vec<Model>,
        }
        #[derive(serde::Deserialize)]
        struct Model {
            id: String,
        }
        let url = format!("{}/v1/models", self.base);
        let attempt = async {
            let response = self
                .client
                .get(url)
                .headers(self.headers.clone())
                .send()
                .await
                .ok()?;
            let bytes = response.bytes().await.ok()?;
            serde_json::from_slice::<Models>(&bytes).ok()
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Some(models)) => models.data.into_iter().map(|m| m.id).take(256).collect(),
            _ => Vec::new(),
        }
    }
}

/// Maps a transport failure to what the user's tool sees.
#[must_use]
pub(super) fn classify(error: &reqwest::Error) -> ApiError {
    if error.is_timeout() {
        ApiError::BackendTimeout
    } else if error.is_connect() {
        ApiError::BackendUnreachable
    } else {
        ApiError::BackendFailed(error.without_url_string())
    }
}

trait WithoutUrl {
    fn without_url_string(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    /// The error text without the URL (which may carry the user's path and query).
    fn without_url_string(&self) -> String {
        let mut text = self.to_string();
        if let Some(url) = self.url() {
            text = text.replace(url.as_str(), "<backend>");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengo_proto::bhttp::Field;

    fn head(method: &[u8], path: &[u8]) -> RequestHead {
        RequestHead {
            method: method.to_vec(),
            scheme: b"https".to_vec(),
            authority: Vec::new(),
            path: path.to_vec(),
            fields: vec![Field {
                name: b"x-a".to_vec(),
                value: b"1".to_vec(),
            }],
        }
    }

    #[test]
    fn accepts_origin_form_only() {
        let policy = EndpointPolicy::default();
        let check = |method: &[u8], path: &[u8]| {
            BackendRequest::from_bhttp(&head(method, path), Bytes::new(), &policy)
        };
        let ok = check(b"POST", b"/v1/chat/completions?x=1").unwrap();
        assert_eq!(ok.path_and_query, "/v1/chat/completions?x=1");
        assert_eq!(ok.headers.get("x-a").unwrap(), "1");
        for path in [&b"http://evil/"[..], b"//evil/x", b"", b"v1/x", b"/\xff"] {
            assert_eq!(check(b"GET", path).unwrap_err().status(), 400);
        }
        assert!(check(b"G ET", b"/").is_err());
        let refused = check(b"DELETE", b"/api/delete").unwrap_err();
        assert_eq!(refused.status(), 403);
        assert_eq!(refused.code(), "endpoint_not_allowed");
        assert_eq!(
            check(b"POST", b"/v1/%2e%2e/%2e%2e/admin")
                .unwrap_err()
                .code(),
            "path_not_allowed"
        );
    }

    #[test]
    fn forwarding_and_credential_headers_never_reach_the_backend() {
        let mut request = head(b"POST", b"/v1/chat/completions");
        for name in [
            "authorization",
            "x-api-key",
            "cookie",
            "forwarded",
            "x-forwarded-for",
            "x-real-ip",
            "via",
            "content-type",
        ] {
            request.fields.push(Field {
                name: name.as_bytes().to_vec(),
                value: b"v".to_vec(),
            });
        }
        let checked =
            BackendRequest::from_bhttp(&request, Bytes::new(), &EndpointPolicy::default()).unwrap();
        let names: Vec<_> = checked.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-a", "content-type"]);
    }

    #[test]
    fn urls_stay_below_the_base_path() {
        let backend = Backend::new(&BackendConfig {
            url: "http://127.0.0.1:9/base/".parse().unwrap(),
            headers: crate::roles::exit::config::RedactedHeaders::default(),
            idle_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            allow: EndpointPolicy::default(),
        })
        .unwrap();
        assert_eq!(
            backend.url("/v1/models?x=1").unwrap().as_str(),
            "http://127.0.0.1:9/base/v1/models?x=1"
        );
        // What the policy refuses anyway, the URL check refuses on its own too.
        for escaping in ["/v1/../../admin", "/v1/%2e%2e/%2e%2e/admin", "/v1/.%2E/x"] {
            assert_eq!(
                backend.url(escaping).unwrap_err().status(),
                403,
                "{escaping}"
            );
        }
    }
}
