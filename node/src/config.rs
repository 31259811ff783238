//! Configuration in two layers: raw inputs (flags, `TOKENGO_*` environment variables and a YAML
//! file, merged in that order of precedence) and the checked, typed configuration each role
//! runs with. Every error names the field that is wrong and what would be right.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::{
    cli::{BackendArgs, ClientArgs, CommonArgs, ExitArgs, RelayArgs, ServeArgs},
    data_dir::DataDir,
    transport::RelayAddr,
};

/// Default local HTTP endpoint: loopback only, so nothing on the network can use it.
pub const DEFAULT_CLIENT_LISTEN: &str = "127.0.0.1:8080";
/// Default relay QUIC address: all interfaces, since a relay exists to be reached.
pub const DEFAULT_RELAY_LISTEN: &str = "0.0.0.0:4433";
/// Default backend: a local Ollama, as in the original TokenGo.
pub const DEFAULT_BACKEND: &str = "http://localhost:11434";

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The YAML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML file is not valid for TokenGo.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the field and line.
        message: String,
    },
    /// A field has a value that cannot be used.
    #[error("invalid `{field}`: {message}")]
    Invalid {
        /// The field (flag and YAML key share the name).
        field: &'static str,
        /// What is wrong and what would be right.
        message: String,
    },
    /// A required field is missing.
    #[error("missing `{field}`: {hint}")]
    Missing {
        /// The field.
        field: &'static str,
        /// How to provide it.
        hint: &'static str,
    },
    /// The data directory cannot be used.
    #[error(transparent)]
    DataDir(#[from] crate::data_dir::DataDirError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// The YAML file: every key optional, unknown keys rejected so typos do not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    relay: Option<String>,
    backend: Option<String>,
    api_key: Option<String>,
    #[serde(default)]
    headers: Vec<String>,
    data_dir: Option<PathBuf>,
    /// Seconds without any byte from the backend before a request is abandoned.
    backend_idle_timeout_secs: Option<u64>,
    /// Seconds a backend connection may take to establish.
    backend_connect_timeout_secs: Option<u64>,
    /// Largest request body accepted, in bytes.
    max_request_body_bytes: Option<usize>,
    /// Largest non-streamed response body accepted, in bytes.
    max_response_body_bytes: Option<usize>,
    /// Seconds without any packet before a QUIC connection is considered dead.
    quic_idle_timeout_secs: Option<u64>,
}

impl FileConfig {
    fn load(path: Option<&PathBuf>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })
    }
}

/// Timeouts and size limits shared by the roles.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body the client accepts and the exit decodes. Default 32 MiB.
    pub max_request_body: usize,
    /// Largest non-streamed (single-message) response body. Default 64 MiB.
    pub max_response_body: usize,
    /// QUIC idle timeout; keep-alives are sent at a third of it. Default 30 s.
    pub quic_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_body: 32 << 20,
            max_response_body: 64 << 20,
            quic_idle_timeout: Duration::from_secs(30),
        }
    }
}

impl Limits {
    fn from_file(file: &FileConfig) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let quic_idle_timeout = match file.quic_idle_timeout_secs {
            None => defaults.quic_idle_timeout,
            Some(secs @ 3..=600) => Duration::from_secs(secs),
            Some(_) => {
                return Err(invalid(
                    "quic_idle_timeout_secs",
                    "must be 3 to 600 seconds",
                ));
            }
        };
        Ok(Self {
            max_request_body: positive("max_request_body_bytes", file.max_request_body_bytes)?
                .unwrap_or(defaults.max_request_body),
            max_response_body: positive("max_response_body_bytes", file.max_response_body_bytes)?
                .unwrap_or(defaults.max_response_body),
            quic_idle_timeout,
        })
    }
}

fn positive(field: &'static str, value: Option<usize>) -> Result<Option<usize>, ConfigError> {
    match value {
        Some(0) => Err(invalid(field, "must be greater than zero")),
        other => Ok(other),
    }
}

/// Where and how the exit calls the AI backend.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Base URL; request paths are appended to it.
    pub url: reqwest::Url,
    /// Headers added to every backend request (including `Authorization` from `api_key`).
    /// Kept out of `Debug` output by [`RedactedHeaders`].
    pub headers: RedactedHeaders,
    /// Abandon a request after this long without a byte from the backend. Idle, not absolute:
    /// a long generation that keeps streaming is never cut. Default 300 s (a large model may
    /// think that long before its first token).
    pub idle_timeout: Duration,
    /// Give up connecting after this long. Default 10 s.
    pub connect_timeout: Duration,
}

/// A header map whose values never reach logs.
#[derive(Clone, Default)]
pub struct RedactedHeaders(pub HeaderMap);

impl std::fmt::Debug for RedactedHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl BackendConfig {
    fn resolve(args: BackendArgs, file: &FileConfig) -> Result<Self, ConfigError> {
        let raw = args
            .backend
            .or_else(|| file.backend.clone())
            .unwrap_or_else(|| DEFAULT_BACKEND.to_owned());
        let url = parse_backend_url(&raw)?;
        let mut headers = HeaderMap::new();
        let header_lines = if args.headers.is_empty() {
            file.headers.clone()
        } else {
            args.headers
        };
        for line in &header_lines {
            let (name, value) = parse_header(line)?;
            headers.append(name, value);
        }
        if let Some(key) = args.api_key.or_else(|| file.api_key.clone()) {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
                .map_err(|_| invalid("api_key", "contains characters not allowed in a header"))?;
            value.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, value);
        }
        let secs = |field, value: Option<u64>, default: u64| match value {
            None => Ok(Duration::from_secs(default)),
            Some(0) => Err(invalid(field, "must be at least 1 second")),
            Some(s) => Ok(Duration::from_secs(s)),
        };
        Ok(Self {
            url,
            headers: RedactedHeaders(headers),
            idle_timeout: secs(
                "backend_idle_timeout_secs",
                file.backend_idle_timeout_secs,
                300,
            )?,
            connect_timeout: secs(
                "backend_connect_timeout_secs",
                file.backend_connect_timeout_secs,
                10,
            )?,
        })
    }
}

fn parse_backend_url(raw: &str) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| {
        invalid(
            "backend",
            format!("`{raw}` is not a URL ({e}); expected e.g. http://localhost:11434"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            "backend",
            format!("`{raw}` must start with http:// or https://"),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("backend", "must not carry a query or fragment"));
    }
    Ok(url)
}

fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue), ConfigError> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| invalid("header", format!("`{line}` is not `Name: value`")))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
        invalid(
            "header",
            format!("`{}` is not a valid header name", name.trim()),
        )
    })?;
    let mut value = HeaderValue::from_str(value.trim()).map_err(|_| {
        invalid(
            "header",
            format!("value of `{name}` is not a valid header value"),
        )
    })?;
    value.set_sensitive(true);
    Ok((name, value))
}

fn parse_listen(field: &'static str, raw: &str) -> Result<SocketAddr, ConfigError> {
    raw.trim().parse().map_err(|_| {
        invalid(
            field,
            format!("`{raw}` is not an IP:port address, e.g. 127.0.0.1:8080"),
        )
    })
}

fn parse_relay(raw: Option<String>) -> Result<RelayAddr, ConfigError> {
    let raw = raw.ok_or(ConfigError::Missing {
        field: "relay",
        hint: "pass --relay /ip4/HOST/udp/4433/quic-v1/p2p/PEERID (the relay prints it at start)",
    })?;
    raw.parse()
        .map_err(|e: crate::transport::AddrError| invalid("relay", e.to_string()))
}

fn data_dir(common: &CommonArgs, file: &FileConfig) -> Result<DataDir, ConfigError> {
    let explicit = common.data_dir.clone().or_else(|| file.data_dir.clone());
    Ok(DataDir::resolve(explicit)?)
}

/// Checked configuration of `tokengo relay`.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// UDP address for QUIC. Default `0.0.0.0:4433`.
    pub listen: SocketAddr,
    /// Where the relay's identity key lives.
    pub data_dir: DataDir,
    /// Timeouts and sizes.
    pub limits: Limits,
}

impl RelayConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: RelayArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.common.config.as_ref())?;
        let listen = args.listen.or_else(|| file.listen.clone());
        Ok(Self {
            listen: parse_listen("listen", listen.as_deref().unwrap_or(DEFAULT_RELAY_LISTEN))?,
            data_dir: data_dir(&args.common, &file)?,
            limits: Limits::from_file(&file)?,
        })
    }
}

/// Checked configuration of `tokengo exit`.
#[derive(Debug, Clone)]
pub struct ExitConfig {
    /// The relay to register with.
    pub relay: RelayAddr,
    /// The AI backend.
    pub backend: BackendConfig,
    /// Where the identity and OHTTP keys live.
    pub data_dir: DataDir,
    /// Timeouts and sizes.
    pub limits: Limits,
}

impl ExitConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: ExitArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.common.config.as_ref())?;
        Ok(Self {
            relay: parse_relay(args.relay.or_else(|| file.relay.clone()))?,
            backend: BackendConfig::resolve(args.backend, &file)?,
            data_dir: data_dir(&args.common, &file)?,
            limits: Limits::from_file(&file)?,
        })
    }
}

/// Checked configuration of `tokengo client`.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The relay to send requests through.
    pub relay: RelayAddr,
    /// Local HTTP endpoint. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Timeouts and sizes.
    pub limits: Limits,
}

impl ClientConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: ClientArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.common.config.as_ref())?;
        let listen = args.listen.or_else(|| file.listen.clone());
        Ok(Self {
            relay: parse_relay(args.relay.or_else(|| file.relay.clone()))?,
            listen: parse_listen("listen", listen.as_deref().unwrap_or(DEFAULT_CLIENT_LISTEN))?,
            limits: Limits::from_file(&file)?,
        })
    }
}

/// Checked configuration of `tokengo serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Local HTTP endpoint. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// The AI backend.
    pub backend: BackendConfig,
    /// Where the relay and exit keys live.
    pub data_dir: DataDir,
    /// Timeouts and sizes.
    pub limits: Limits,
}

impl ServeConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.common.config.as_ref())?;
        let listen = args.listen.or_else(|| file.listen.clone());
        Ok(Self {
            listen: parse_listen("listen", listen.as_deref().unwrap_or(DEFAULT_CLIENT_LISTEN))?,
            backend: BackendConfig::resolve(args.backend, &file)?,
            data_dir: data_dir(&args.common, &file)?,
            limits: Limits::from_file(&file)?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    fn common(path: &std::path::Path, dir: &std::path::Path) -> CommonArgs {
        CommonArgs {
            config: Some(path.to_path_buf()),
            data_dir: Some(dir.to_path_buf()),
        }
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("backend: http://file:1\nlisten: 127.0.0.1:9000\n");
        let args = ServeArgs {
            common: common(file.path(), dir.path()),
            backend: BackendArgs {
                backend: Some("http://flag:2".into()),
                ..BackendArgs::default()
            },
            listen: None,
        };
        let config = ServeConfig::resolve(args).unwrap();
        assert_eq!(config.backend.url.as_str(), "http://flag:2/");
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.backend.idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("backnd: http://x\n");
        let args = RelayArgs {
            common: common(file.path(), dir.path()),
            listen: None,
        };
        let error = RelayConfig::resolve(args).unwrap_err().to_string();
        assert!(error.contains("backnd"), "{error}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("backend: ftp://x\n", "backend"),
            ("listen: localhost\n", "listen"),
            ("headers: ['no colon']\n", "header"),
            ("quic_idle_timeout_secs: 1\n", "quic_idle_timeout_secs"),
            ("max_request_body_bytes: 0\n", "max_request_body_bytes"),
        ];
        for (yaml, field) in cases {
            let file = file_with(yaml);
            let args = ServeArgs {
                common: common(file.path(), dir.path()),
                ..ServeArgs::default()
            };
            let error = ServeConfig::resolve(args).unwrap_err().to_string();
            assert!(error.contains(field), "{yaml} -> {error}");
        }
    }

    #[test]
    fn exit_requires_a_relay_and_explains_how() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("");
        let args = ExitArgs {
            common: common(file.path(), dir.path()),
            ..ExitArgs::default()
        };
        let error = ExitConfig::resolve(args).unwrap_err().to_string();
        assert!(error.contains("--relay"), "{error}");
    }

    #[test]
    fn api_key_becomes_a_sensitive_bearer_header() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("api_key: sk-secret\nheaders: ['X-Org: acme']\n");
        let args = ServeArgs {
            common: common(file.path(), dir.path()),
            ..ServeArgs::default()
        };
        let config = ServeConfig::resolve(args).unwrap();
        let auth = config.backend.headers.0.get("authorization").unwrap();
        assert_eq!(auth, "Bearer sk-secret");
        assert!(auth.is_sensitive());
        assert_eq!(config.backend.headers.0.get("x-org").unwrap(), "acme");
        assert!(!format!("{config:?}").contains("sk-secret"));
    }
}
