//! `tokengo bootstrap`'s configuration: the keys its YAML file takes (`BootstrapFile`; any
//! other key is refused) and the checked [`BootstrapConfig`] merged from flags, environment
//! and that file.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::Deserialize;

use crate::{
    cli::BootstrapArgs,
    config::{self, ConfigError, DhtFile, Schema, WorkerThreads},
    net::discovery::{AddressPolicy, DhtConfig},
    store::data_dir::DataDir,
};

/// The keys of `tokengo bootstrap`'s YAML file. Each is also a flag except the one marked
/// file-only. A bootstrap node has no admin endpoint and exports no traces, so
/// `admin_listen` and `otlp_endpoint` are refused here (its `--admin-listen` and
/// `--otlp-endpoint` flags, shared with the other roles through `CommonArgs`, are ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BootstrapFile {
    /// UDP address of the DHT server.
    listen: Option<String>,
    /// Its public IPs (`/ip4/X`, `/ip6/X`).
    #[serde(default)]
    external_addrs: Vec<String>,
    /// The other servers of the private network (multiaddrs with /p2p/).
    #[serde(default)]
    bootstrap: Vec<String>,
    /// Kademlia protocol name.
    dht_protocol: Option<String>,
    /// Addresses the server may dial: public, loopback, any.
    address_policy: Option<String>,
    /// Seconds a DHT query may take (file-only).
    discovery_timeout_secs: Option<u64>,
    /// Where its identity lives.
    data_dir: Option<PathBuf>,
    /// Threads that run its tasks.
    worker_threads: Option<usize>,
}

impl Schema for BootstrapFile {
    const COMMAND: &'static str = "tokengo bootstrap";
}

/// Checked configuration of `tokengo bootstrap`.
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    /// The DHT (its bootstrap peers are the other servers of the private network). Default:
    /// no peers (the first server of a network) and the `any` address policy.
    pub dht: DhtConfig,
    /// UDP address of the DHT server. Default
    /// [`DEFAULT_DHT_LISTEN`](crate::config::defaults::DEFAULT_DHT_LISTEN) (`0.0.0.0:4001`).
    pub listen: SocketAddr,
    /// Its public IPs. Default none.
    pub external_ips: Vec<IpAddr>,
    /// Where its identity lives (`bootstrap_identity.key`).
    pub data_dir: DataDir,
    /// Threads that run its tasks. Default: one per CPU core.
    pub worker_threads: WorkerThreads,
}

impl BootstrapConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: BootstrapArgs) -> Result<Self, ConfigError> {
        let file: BootstrapFile = config::load(args.common.config.as_deref())?;
        let dht_file = DhtFile {
            bootstrap: &file.bootstrap,
            dht_protocol: file.dht_protocol.as_deref(),
            address_policy: file.address_policy.as_deref(),
            discovery_timeout_secs: file.discovery_timeout_secs,
        };
        let mut dht = config::dht_config(&args.dht, &dht_file)?;
        // A bootstrap node without peers is the first of a private network, never a member
        // of the public DHT.
        if args.dht.bootstrap.is_empty() && file.bootstrap.is_empty() {
            dht.bootstrap.clear();
            if args.dht.address_policy.is_none() && file.address_policy.is_none() {
                dht.policy = AddressPolicy::Any;
            }
        }
        let listen = args.listen.as_deref().or(file.listen.as_deref());
        Ok(Self {
            dht,
            listen: config::dht_listen(listen)?,
            external_ips: config::parse_external(config::flags_or_file(
                &args.external_addrs,
                &file.external_addrs,
            ))?,
            data_dir: config::data_dir(&args.common, file.data_dir.as_deref())?,
            worker_threads: WorkerThreads::resolve(&args.common, file.worker_threads)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::CommonArgs,
        config::{
            examples,
            test_support::{assert_refused, common, file_with},
        },
    };

    fn resolve(yaml: &str, dir: &std::path::Path) -> Result<BootstrapConfig, ConfigError> {
        let file = file_with(yaml);
        BootstrapConfig::resolve(BootstrapArgs {
            common: common(file.path(), dir),
            ..BootstrapArgs::default()
        })
    }

    #[test]
    fn the_example_config_loads() {
        assert!(examples::check::<BootstrapFile>("bootstrap") >= 1);
    }

    #[test]
    fn keys_it_does_not_apply_are_refused_naming_the_key_and_the_command() {
        let dir = tempfile::tempdir().unwrap();
        assert_refused(
            |yaml| resolve(yaml, dir.path()),
            &[
                ("backend: http://localhost:11434\n", "backend"),
                ("admin_listen: 127.0.0.1:9090\n", "admin_listen"),
                ("dht_announce: true\n", "dht_announce"),
                ("dht_listen: 0.0.0.0:4001\n", "dht_listen"),
            ],
            "tokengo bootstrap",
            "listen, external_addrs",
        );
    }

    #[test]
    fn the_first_server_of_a_network_has_no_peers_and_dials_any_address() {
        let dir = tempfile::tempdir().unwrap();
        let config = resolve("", dir.path()).unwrap();
        assert!(config.dht.bootstrap.is_empty());
        assert_eq!(config.dht.policy, AddressPolicy::Any);
        assert_eq!(config.listen, "0.0.0.0:4001".parse().unwrap());
        let peer = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let config = resolve(
            &format!(
                "listen: 127.0.0.1:4100\nexternal_addrs: ['/ip4/10.0.0.5']\n\
                 bootstrap: ['/ip4/10.0.0.6/udp/4001/quic-v1/p2p/{peer}']\n\
                 dht_protocol: /mynet/kad/1.0.0\naddress_policy: loopback\n\
                 discovery_timeout_secs: 5\nworker_threads: 1\n"
            ),
            dir.path(),
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:4100".parse().unwrap());
        assert_eq!(config.dht.bootstrap.len(), 1);
        assert_eq!(config.dht.policy, AddressPolicy::Loopback);
        assert_eq!(config.external_ips.len(), 1);
        assert_eq!(config.worker_threads.get(), 1);
    }

    #[test]
    fn worker_threads_out_of_range_name_the_field() {
        let error = BootstrapConfig::resolve(BootstrapArgs {
            common: CommonArgs {
                worker_threads: Some(0),
                ..CommonArgs::default()
            },
            ..BootstrapArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("worker_threads"), "{error}");
    }
}
