//! The admin endpoint's address and whether and where traces are exported: the flag or the
//! file's `admin_listen` / `otlp_endpoint`, and the standard `OTEL_*` environment variables.

use std::{net::SocketAddr, time::Duration};

use super::{ConfigError, defaults::DEFAULT_OTLP_TIMEOUT, invalid, parse_listen};
use crate::cli::CommonArgs;

/// The standard OpenTelemetry environment variables that decide whether and how traces are
/// exported (raw input; the exporter and SDK read the rest, such as headers, sampler and
/// resource attributes, themselves).
#[derive(Debug, Clone, Default)]
pub struct OtelEnv {
    /// `OTEL_SDK_DISABLED`.
    pub sdk_disabled: Option<String>,
    /// `OTEL_TRACES_EXPORTER`.
    pub traces_exporter: Option<String>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
    pub traces_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub protocol: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`.
    pub traces_protocol: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds).
    pub timeout: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` (milliseconds).
    pub traces_timeout: Option<String>,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`.
    pub resource_attributes: Option<String>,
}

impl OtelEnv {
    /// Reads the variables from this process's environment (empty values count as unset,
    /// as the specification says).
    #[must_use]
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self {
            sdk_disabled: var("OTEL_SDK_DISABLED"),
            traces_exporter: var("OTEL_TRACES_EXPORTER"),
            endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT"),
            traces_endpoint: var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            protocol: var("OTEL_EXPORTER_OTLP_PROTOCOL"),
            traces_protocol: var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            timeout: var("OTEL_EXPORTER_OTLP_TIMEOUT"),
            traces_timeout: var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
            service_name: var("OTEL_SERVICE_NAME"),
            resource_attributes: var("OTEL_RESOURCE_ATTRIBUTES"),
        }
    }
}

/// Whether and where traces are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceExport {
    /// No export (the default).
    Off,
    /// OTLP over HTTP/protobuf.
    Otlp {
        /// Full URL of the traces endpoint from `--otlp-endpoint` (its base URL with
        /// `/v1/traces` appended); `None` lets the exporter read
        /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` (default
        /// `http://localhost:4318/v1/traces`).
        endpoint: Option<String>,
        /// Time one export request may take. Default 10 s (`OTEL_EXPORTER_OTLP_TIMEOUT`).
        timeout: Duration,
        /// `service.name` to use when `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
        /// name none: `tokengo-<role>`.
        service_name: Option<String>,
    },
}

/// The admin endpoint and trace export of a long-running role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservabilityConfig {
    /// Address of the admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`).
    /// Default: off. Loopback is expected; Kubernetes probes need the pod's address.
    pub admin_listen: Option<SocketAddr>,
    /// Trace export. Default: off.
    pub traces: TraceExport,
}

impl ObservabilityConfig {
    /// Checks the admin address and decides trace export for `role` from the flag or file
    /// (`otlp_endpoint`) and the `OTEL_*` variables: `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none` turn export off whatever else is set; otherwise an
    /// endpoint from either source (or `OTEL_TRACES_EXPORTER=otlp`) turns it on.
    pub fn resolve(
        common: &CommonArgs,
        file_admin: Option<&str>,
        file_otlp: Option<&str>,
        env: &OtelEnv,
        role: &'static str,
    ) -> Result<Self, ConfigError> {
        let admin_listen = common
            .admin_listen
            .as_deref()
            .or(file_admin)
            .map(|raw| parse_listen("admin_listen", raw))
            .transpose()?;
        let endpoint = common
            .otlp_endpoint
            .as_deref()
            .or(file_otlp)
            .map(traces_url)
            .transpose()?;
        Ok(Self {
            admin_listen,
            traces: trace_export(endpoint, env, role)?,
        })
    }
}

fn traces_url(raw: &str) -> Result<String, ConfigError> {
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| {
        invalid(
            "otlp_endpoint",
            format!("`{raw}` is not a URL ({e}); expected e.g. http://127.0.0.1:4318"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            "otlp_endpoint",
            format!("`{raw}` must be an http:// or https:// URL of an OTLP/HTTP collector"),
        ));
    }
    // The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: the signal's path is appended.
    Ok(format!("{}/v1/traces", url.as_str().trim_end_matches('/')))
}

fn trace_export(
    endpoint: Option<String>,
    env: &OtelEnv,
    role: &'static str,
) -> Result<TraceExport, ConfigError> {
    if env
        .sdk_disabled
        .as_deref()
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        return Ok(TraceExport::Off);
    }
    let exporters: Vec<String> = env
        .traces_exporter
        .as_deref()
        .map(|v| {
            v.split(',')
                .map(|e| e.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    if exporters.iter().any(|e| e == "none") {
        return Ok(TraceExport::Off);
    }
    if let Some(other) = exporters.iter().find(|e| e.as_str() != "otlp") {
        return Err(invalid(
            "OTEL_TRACES_EXPORTER",
            format!("`{other}` is not supported; only `otlp` (or `none`)"),
        ));
    }
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", &env.traces_protocol),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", &env.protocol),
    ] {
        if let Some(value) = value.as_deref()
            && value.trim() != "http/protobuf"
        {
            return Err(invalid(
                name,
                format!("`{value}` is not supported; tokengo exports OTLP as http/protobuf"),
            ));
        }
    }
    let wanted = endpoint.is_some()
        || env.endpoint.is_some()
        || env.traces_endpoint.is_some()
        || !exporters.is_empty();
    if !wanted {
        return Ok(TraceExport::Off);
    }
    let timeout = match env.traces_timeout.as_deref().or(env.timeout.as_deref()) {
        None => DEFAULT_OTLP_TIMEOUT,
        Some(raw) => match raw.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                return Err(invalid(
                    "OTEL_EXPORTER_OTLP_TIMEOUT",
                    format!("`{raw}` is not a positive number of milliseconds"),
                ));
            }
        },
    };
    let named = env.service_name.is_some()
        || env.resource_attributes.as_deref().is_some_and(|attrs| {
            attrs
                .split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    Ok(TraceExport::Otlp {
        endpoint,
        timeout,
        service_name: (!named).then(|| format!("tokengo-{role}")),
    })
}

/// The admin endpoint and trace export of `role` from the flags, the file's `admin_listen`
/// and `otlp_endpoint`, and this process's `OTEL_*` variables.
pub(crate) fn observability(
    common: &CommonArgs,
    file_admin: Option<&str>,
    file_otlp: Option<&str>,
    role: &'static str,
) -> Result<ObservabilityConfig, ConfigError> {
    ObservabilityConfig::resolve(
        common,
        file_admin,
        file_otlp,
        &OtelEnv::from_process(),
        role,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_and_traces_are_off_by_default_and_the_flag_wins_over_the_file() {
        let env = OtelEnv::default();
        let off = ObservabilityConfig::resolve(&CommonArgs::default(), None, None, &env, "relay")
            .unwrap();
        assert_eq!(off.admin_listen, None);
        assert_eq!(off.traces, TraceExport::Off);
        let flags = CommonArgs {
            admin_listen: Some("127.0.0.1:9091".into()),
            otlp_endpoint: Some("http://127.0.0.1:4318/".into()),
            ..CommonArgs::default()
        };
        let on = ObservabilityConfig::resolve(
            &flags,
            Some("127.0.0.1:9000"),
            Some("http://file:1"),
            &env,
            "exit",
        )
        .unwrap();
        assert_eq!(on.admin_listen, Some("127.0.0.1:9091".parse().unwrap()));
        assert_eq!(
            on.traces,
            TraceExport::Otlp {
                endpoint: Some("http://127.0.0.1:4318/v1/traces".into()),
                timeout: DEFAULT_OTLP_TIMEOUT,
                service_name: Some("tokengo-exit".into()),
            }
        );
        let error = ObservabilityConfig::resolve(
            &CommonArgs::default(),
            Some("localhost"),
            None,
            &env,
            "exit",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("admin_listen"), "{error}");
    }

    #[test]
    fn otel_environment_turns_traces_on_and_off() {
        let none = CommonArgs::default();
        let resolve = |env: &OtelEnv| {
            ObservabilityConfig::resolve(&none, None, None, env, "client").map(|c| c.traces)
        };
        let on = OtelEnv {
            endpoint: Some("http://127.0.0.1:4318".into()),
            service_name: Some("mine".into()),
            timeout: Some("2500".into()),
            ..OtelEnv::default()
        };
        assert_eq!(
            resolve(&on).unwrap(),
            TraceExport::Otlp {
                endpoint: None,
                timeout: Duration::from_millis(2500),
                service_name: None,
            }
        );
        let disabled = OtelEnv {
            sdk_disabled: Some("TRUE".into()),
            ..on.clone()
        };
        assert_eq!(resolve(&disabled).unwrap(), TraceExport::Off);
        let exporter_none = OtelEnv {
            traces_exporter: Some("none".into()),
            ..on.clone()
        };
        assert_eq!(resolve(&exporter_none).unwrap(), TraceExport::Off);
        let grpc = OtelEnv {
            protocol: Some("grpc".into()),
            ..on.clone()
        };
        let error = resolve(&grpc).unwrap_err().to_string();
        assert!(error.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{error}");
        let zipkin = OtelEnv {
            traces_exporter: Some("zipkin".into()),
            ..OtelEnv::default()
        };
        assert!(resolve(&zipkin).is_err());
        let named_by_attributes = OtelEnv {
            traces_endpoint: Some("http://127.0.0.1:4318/v1/traces".into()),
            resource_attributes: Some("deployment.environment=test, service.name=x".into()),
            ..OtelEnv::default()
        };
        assert!(matches!(
            resolve(&named_by_attributes).unwrap(),
            TraceExport::Otlp {
                service_name: None,
                ..
            }
        ));
    }
}
