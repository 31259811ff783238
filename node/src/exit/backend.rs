//! The exit's HTTP client for the AI backend: pooled connections, idle (not absolute)
//! timeouts, and the mapping of backend failures to the errors a user's tool understands.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use tokengo_proto::bhttp::RequestHead;

use crate::{api_error::ApiError, config::BackendConfig, http_message};

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
    /// Checks a BHTTP request head from the client. Anything unusable becomes a 400 for the
    /// user, never a panic or a request to somewhere other than the configured backend.
    pub fn from_bhttp(head: &RequestHead, body: Bytes) -> Result<Self, ApiError> {
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
        Ok(Self {
            method,
            path_and_query: path.to_owned(),
            headers: http_message::to_header_map(&head.fields),
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
}

impl Backend {
    /// Builds the pooled client.
    pub fn new(config: &BackendConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Per read, so a generation that keeps streaming is never cut.
            .read_timeout(config.idle_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(Self {
            client,
            base: config.url.as_str().trim_end_matches('/').to_owned(),
            headers: config.headers.0.clone(),
            idle_timeout: config.idle_timeout,
        })
    }

    /// The idle timeout applied between body chunks.
    #[must_use]
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Sends `request` and returns the response once its head arrived.
    pub async fn send(&self, request: BackendRequest) -> Result<reqwest::Response, ApiError> {
        let url = format!("{}{}", self.base, request.path_and_query);
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
#[allow(clippy::unwrap_used)]
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
        let ok = BackendRequest::from_bhttp(&head(b"POST", b"/v1/chat?x=1"), Bytes::new()).unwrap();
        assert_eq!(ok.path_and_query, "/v1/chat?x=1");
        assert_eq!(ok.headers.get("x-a").unwrap(), "1");
        for path in [&b"http://evil/"[..], b"//evil/x", b"", b"v1/x", b"/\xff"] {
            assert!(BackendRequest::from_bhttp(&head(b"GET", path), Bytes::new()).is_err());
        }
        assert!(BackendRequest::from_bhttp(&head(b"G ET", b"/"), Bytes::new()).is_err());
    }
}
