//! OpenTelemetry traces of the node's own work, exported over OTLP (HTTP/protobuf) to a
//! collector the operator runs. Off unless configured (`--otlp-endpoint`, or the standard
//! `OTEL_*` environment variables; see [`crate::config::TraceExport`]).
//!
//! Trace context never crosses the privacy boundary: each role starts its own root spans and
//! nothing is injected into what travels between client, relay and exit (the client also
//! strips trace headers the user's tool sent). The exporter's HTTP client is built on the
//! workspace's reqwest, so no second HTTP stack comes in with it.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{Layer, filter::Targets, registry::LookupSpan};

use crate::config::TraceExport;

/// Largest response body accepted from a collector (the SDK's own clients use the same).
const MAX_RESPONSE_BODY: usize = 4 << 20;
/// How long shutdown waits for the last spans to be exported.
const FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// Why trace export could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter's HTTP client could not be built.
    #[error("building the OTLP HTTP client: {0}")]
    Client(String),
    /// The exporter rejected its configuration.
    #[error("configuring the OTLP exporter: {0}")]
    Exporter(String),
}

/// A running trace pipeline: spans are batched on a background thread and exported.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Starts exporting traces as `config` says (nothing when it is off). Export requests run
    /// on `runtime`, so the batch thread needs no runtime of its own.
    pub fn start(
        config: &TraceExport,
        runtime: tokio::runtime::Handle,
    ) -> Result<Option<Self>, TelemetryError> {
        let TraceExport::Otlp {
            endpoint,
            timeout,
            service_name,
        } = config
        else {
            return Ok(None);
        };
        let client = ExportClient::new(*timeout, runtime)?;
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(*timeout);
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint.as_str());
        }
        let exporter = builder
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the SDK's detectors; the
        // role's name only fills in when they name no service.
        let mut resource = Resource::builder();
        if let Some(name) = service_name {
            resource = resource.with_service_name(name.clone());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(Some(Self { provider }))
    }

    /// The provider, for building the tracing layer.
    #[must_use]
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    /// Exports what is still queued, waiting at most a few seconds. Call it while the runtime
    /// given to [`Tracing::start`] still runs.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown_with_timeout(FLUSH_DEADLINE) {
            eprintln!("warning: exporting the last traces failed: {error}");
        }
    }
}

/// The tracing layer that turns the node's spans into OpenTelemetry spans. Only spans of this
/// crate at info level and above are exported (not the HTTP or QUIC libraries'), whatever
/// `RUST_LOG` says about the log output.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tokengo"))
        .with_location(false)
        .with_threads(false)
        .with_filter(Targets::new().with_target("tokengo", tracing::Level::INFO))
}

/// The OTLP exporter's HTTP client: our reqwest, with each request run on the node's runtime
/// (the SDK's batch thread has none).
#[derive(Debug)]
struct ExportClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    /// Whether an export failure was already logged at warn level.
    warned: std::sync::atomic::AtomicBool,
}

impl ExportClient {
    fn new(timeout: Duration, runtime: tokio::runtime::Handle) -> Result<Self, TelemetryError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| TelemetryError::Client(e.to_string()))?;
        Ok(Self {
            client,
            runtime,
            warned: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let exchange = async move {
            let mut response = client.execute(request).await?;
            let status = response.status();
            let headers = std::mem::take(response.headers_mut());
            let mut body = bytes::BytesMut::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_RESPONSE_BODY {
                    return Err::<_, HttpError>(Box::new(
                        opentelemetry_http::ResponseBodyTooLarge::new(),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            let mut answer = http::Response::new(body.freeze());
            *answer.status_mut() = status;
            *answer.headers_mut() = headers;
            Ok(answer)
        };
        let outcome = self.runtime.spawn(exchange).await?;
        let failed = match &outcome {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("collector answered {}", response.status())),
            Err(error) => Some(error.to_string()),
        };
        if let Some(reason) = failed {
            // The SDK drops the batch and carries on; say so once, so an operator who expects
            // traces learns why there are none, without a line every few seconds.
            if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(%reason, "exporting traces failed (later failures are logged at debug)");
            } else {
                tracing::debug!(%reason, "exporting traces failed");
            }
        }
        outcome
    }
}
