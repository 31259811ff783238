//! Configuration shared by the roles. A role's configuration comes in two layers: raw inputs
//! (flags, `TOKENGO_*` environment variables and a YAML file, merged in that order of
//! precedence) and the checked, typed configuration it runs with. Each role's file schema and
//! checked configuration live beside the role (`roles::<role>::config`); this module holds
//! what several roles share: the errors, the YAML loading (`file`), [`Limits`], the admin
//! endpoint and trace export (`observability`), the DHT inputs (`dht`), the worker threads and
//! data directory, and every default and limit ([`defaults`]). It never names a role: roles
//! import it, not the other way round. Every error names the field that is wrong and what
//! would be right.

use std::{
    num::NonZeroUsize,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{cli::CommonArgs, store::data_dir::DataDir};

pub mod defaults;
mod dht;
mod file;
mod limits;
mod observability;

pub(crate) use dht::{DhtFile, dht_config, dht_listen, parse_external, relay_addrs};
#[cfg(test)]
pub(crate) use file::examples;
pub(crate) use file::{OneOrMany, Schema, load};
pub use limits::Limits;
pub(crate) use limits::LimitsFile;
pub(crate) use observability::observability;
pub use observability::{ObservabilityConfig, OtelEnv, TraceExport};

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
    /// The YAML file has keys the role it was given to does not take (another role's key, or
    /// a typo): refused rather than ignored, so a setting never silently does nothing.
    #[error(
        "config file {path}: {}",
        file::describe_unknown(unknown, command, accepted)
    )]
    UnknownKeys {
        /// The file.
        path: PathBuf,
        /// The keys refused, in the file's order.
        unknown: Vec<String>,
        /// The command that read the file, e.g. `tokengo relay`.
        command: &'static str,
        /// Every key that command takes.
        accepted: &'static [&'static str],
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
    DataDir(#[from] crate::store::data_dir::DataDirError),
}

/// An error naming `field` and what is wrong with it.
pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// "must be START to END UNIT" for a value of `field` outside `range`.
pub(crate) fn out_of<T: std::fmt::Display>(
    field: &'static str,
    range: &RangeInclusive<T>,
    unit: &str,
) -> ConfigError {
    let message = format!("must be {} to {}", range.start(), range.end());
    invalid(
        field,
        if unit.is_empty() {
            message
        } else {
            format!("{message} {unit}")
        },
    )
}

/// `value` seconds when within `range`, `default` when absent; otherwise an error naming `field`.
pub(crate) fn seconds_within(
    field: &'static str,
    value: Option<u64>,
    range: RangeInclusive<u64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(secs) if range.contains(&secs) => Ok(Duration::from_secs(secs)),
        Some(_) => Err(out_of(field, &range, "seconds")),
    }
}

/// A rate per second: finite and not negative.
pub(crate) fn rate(field: &'static str, value: Option<f64>) -> Result<Option<f64>, ConfigError> {
    match value {
        Some(v) if !v.is_finite() || v < 0.0 => Err(invalid(
            field,
            "must be a number of at least 0 (0 turns the limit off)",
        )),
        other => Ok(other),
    }
}

/// A size that must not be zero.
pub(crate) fn positive(
    field: &'static str,
    value: Option<usize>,
) -> Result<Option<usize>, ConfigError> {
    match value {
        Some(0) => Err(invalid(field, "must be greater than zero")),
        other => Ok(other),
    }
}

/// An `IP:port` socket address.
pub(crate) fn parse_listen(
    field: &'static str,
    raw: &str,
) -> Result<std::net::SocketAddr, ConfigError> {
    raw.trim().parse().map_err(|_| {
        invalid(
            field,
            format!("`{raw}` is not an IP:port address, e.g. 127.0.0.1:8080"),
        )
    })
}

/// A list flag (or its environment variable) when given, else the file's list: flags replace
/// the file's list rather than extend it.
pub(crate) fn flags_or_file<'a>(flags: &'a [String], file: &'a [String]) -> &'a [String] {
    if flags.is_empty() { file } else { flags }
}

/// The data directory: the flag, else the file's `data_dir`, else the platform default.
pub(crate) fn data_dir(common: &CommonArgs, file: Option<&Path>) -> Result<DataDir, ConfigError> {
    let explicit = common
        .data_dir
        .clone()
        .or_else(|| file.map(Path::to_path_buf));
    Ok(DataDir::resolve(explicit)?)
}

/// How many threads run a role's async tasks. Default: one per CPU core the process may use.
///
/// A role's own work per request is tens of microseconds, so one thread carries thousands of
/// requests a second, and on a host that many processes share (all roles on one small
/// machine) one thread each is faster: every extra thread costs cross-thread wake-ups at low
/// load. README "Performance" has the measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerThreads(NonZeroUsize);

impl WorkerThreads {
    /// One thread.
    pub const ONE: Self = Self(NonZeroUsize::MIN);

    /// One per CPU core the process may use (cgroup limits included), at least one.
    #[must_use]
    pub fn per_core() -> Self {
        Self(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
    }

    /// The count.
    #[must_use]
    pub fn get(self) -> usize {
        self.0.get()
    }

    /// The flag, else the file's `worker_threads`, else one per core; at most
    /// [`defaults::MAX_WORKER_THREADS`].
    pub(crate) fn resolve(common: &CommonArgs, file: Option<usize>) -> Result<Self, ConfigError> {
        match common.worker_threads.or(file).map(NonZeroUsize::new) {
            None => Ok(Self::per_core()),
            Some(Some(n)) if n.get() <= defaults::MAX_WORKER_THREADS => Ok(Self(n)),
            Some(_) => Err(invalid(
                "worker_threads",
                format!("must be 1 to {}", defaults::MAX_WORKER_THREADS),
            )),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! What the configuration tests of every role share: temporary files and the common
    //! flags pointing at them.

    use std::io::Write as _;

    use crate::cli::CommonArgs;

    /// A temporary file holding `text`.
    pub(crate) fn file_with(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    /// Common flags reading `path` and keeping keys in `dir`.
    pub(crate) fn common(path: &std::path::Path, dir: &std::path::Path) -> CommonArgs {
        CommonArgs {
            config: Some(path.to_path_buf()),
            data_dir: Some(dir.to_path_buf()),
            ..CommonArgs::default()
        }
    }

    /// Asserts that `resolve` refuses the YAML of each case, naming the case's key, the
    /// command and the keys the command takes (`takes`, the start of that list).
    pub(crate) fn assert_refused<C: std::fmt::Debug>(
        resolve: impl Fn(&str) -> Result<C, super::ConfigError>,
        cases: &[(&str, &str)],
        command: &str,
        takes: &str,
    ) {
        for (yaml, key) in cases {
            let error = resolve(yaml).unwrap_err().to_string();
            assert!(
                error.contains(&format!("unknown key `{key}` for `{command}`"))
                    && error.contains(&format!("keys it takes: {takes}")),
                "{yaml} -> {error}"
            );
        }
    }

    /// A random relay multiaddr on loopback.
    pub(crate) fn relay_addr() -> String {
        format!(
            "/ip4/127.0.0.1/udp/4433/quic-v1/p2p/{}",
            libp2p_identity::Keypair::generate_ed25519()
                .public()
                .to_peer_id()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_default_per_core_and_the_flag_wins_over_the_file() {
        let none = CommonArgs::default();
        assert_eq!(
            WorkerThreads::resolve(&none, None).unwrap(),
            WorkerThreads::per_core()
        );
        assert_eq!(WorkerThreads::resolve(&none, Some(3)).unwrap().get(), 3);
        let flag = CommonArgs {
            worker_threads: Some(2),
            ..CommonArgs::default()
        };
        assert_eq!(WorkerThreads::resolve(&flag, Some(3)).unwrap().get(), 2);
    }

    #[test]
    fn worker_threads_out_of_range_name_the_field() {
        let none = CommonArgs::default();
        for n in [0, 5000] {
            let error = WorkerThreads::resolve(&none, Some(n))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("worker_threads") && error.contains("1 to 1024"),
                "{error}"
            );
        }
    }

    #[test]
    fn ranges_and_sizes_name_their_field() {
        let range = 1..=60;
        let error = seconds_within("tunnel_liveness_secs", Some(61), range, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "invalid `tunnel_liveness_secs`: must be 1 to 60 seconds"
        );
        assert!(positive("max_request_body_bytes", Some(0)).is_err());
        assert!(rate("source_connections_per_sec", Some(f64::NAN)).is_err());
        assert_eq!(rate("x", Some(0.0)).unwrap(), Some(0.0));
    }
}
