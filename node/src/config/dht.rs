//! The network inputs the discovering and announcing roles share: which DHT to join
//! (`bootstrap`, `dht_protocol`, `address_policy`, `discovery_timeout_secs`), a node's own DHT
//! address and public IPs (`dht_listen`, `external_addrs`), and lists of relay multiaddrs
//! (`relay`, `fallback_relays`).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use libp2p::{Multiaddr, StreamProtocol};

use super::{
    ConfigError,
    defaults::{
        DEFAULT_DHT_LISTEN, DEFAULT_DHT_PROTOCOL, DEFAULT_DISCOVERY_TIMEOUT, DISCOVERY_TIMEOUT_SECS,
    },
    flags_or_file, invalid, out_of, parse_listen,
};
use crate::{
    cli::DhtArgs,
    net::discovery::{AddressPolicy, DhtConfig},
    net::transport::RelayAddr,
};

/// The DHT keys of a role's file.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DhtFile<'a> {
    /// `bootstrap`: DHT bootstrap peers (multiaddrs with /p2p/).
    pub(crate) bootstrap: &'a [String],
    /// `dht_protocol`: the Kademlia protocol name.
    pub(crate) dht_protocol: Option<&'a str>,
    /// `address_policy`: the addresses discovery may dial (public, loopback, any).
    pub(crate) address_policy: Option<&'a str>,
    /// `discovery_timeout_secs`: how long discovery may take at start.
    pub(crate) discovery_timeout_secs: Option<u64>,
}

/// The DHT to join: flags win over the file; no bootstrap peers given means the public IPFS
/// DHT with the `public` address policy; given ones with a protocol name of their own mean a
/// private network (policy `any` unless set). Given ones on the public protocol name keep
/// `public`: they are entry points into the public DHT, whose records must not steer dials
/// into the local network.
pub(crate) fn dht_config(args: &DhtArgs, file: &DhtFile<'_>) -> Result<DhtConfig, ConfigError> {
    let mut config = DhtConfig::public();
    let raw = flags_or_file(&args.bootstrap, file.bootstrap);
    if !raw.is_empty() {
        config.bootstrap = raw
            .iter()
            .map(|a| parse_bootstrap(a))
            .collect::<Result<_, _>>()?;
    }
    if let Some(name) = args.dht_protocol.as_deref().or(file.dht_protocol) {
        let name = name.trim();
        if !name.starts_with('/') {
            return Err(invalid(
                "dht_protocol",
                format!("`{name}` must start with `/`, e.g. /ipfs/kad/1.0.0 or /mynet/kad/1.0.0"),
            ));
        }
        config.protocol = StreamProtocol::try_from_owned(name.to_owned())
            .map_err(|e| invalid("dht_protocol", e.to_string()))?;
    }
    let private = !raw.is_empty() && config.protocol.as_ref() != DEFAULT_DHT_PROTOCOL;
    if private {
        config.policy = AddressPolicy::Any;
    }
    if let Some(policy) = args.address_policy.as_deref().or(file.address_policy) {
        config.policy = policy
            .parse()
            .map_err(|e: String| invalid("address_policy", e))?;
    } else if let Some(refused) = config
        .bootstrap
        .iter()
        .find(|a| crate::net::discovery::policy::ip_of(a).is_some() && !config.policy.allows(a))
    {
        return Err(invalid(
            "bootstrap",
            format!(
                "`{refused}` is not a public address, and on the public DHT protocol name ({DEFAULT_DHT_PROTOCOL}) only public addresses are dialled; a private network names its own protocol (--dht-protocol /mynet/kad/1.0.0), or set --address-policy any"
            ),
        ));
    }
    config.timeout = match file.discovery_timeout_secs {
        None => DEFAULT_DISCOVERY_TIMEOUT,
        Some(secs) if DISCOVERY_TIMEOUT_SECS.contains(&secs) => Duration::from_secs(secs),
        Some(_) => {
            return Err(out_of(
                "discovery_timeout_secs",
                &DISCOVERY_TIMEOUT_SECS,
                "seconds",
            ));
        }
    };
    Ok(config)
}

fn parse_bootstrap(raw: &str) -> Result<Multiaddr, ConfigError> {
    let addr: Multiaddr = raw.trim().parse().map_err(|_| {
        invalid(
            "bootstrap",
            format!("`{raw}` is not a multiaddr; expected /ip4/HOST/udp/4001/quic-v1/p2p/PEERID"),
        )
    })?;
    if !matches!(
        addr.iter().last(),
        Some(libp2p::multiaddr::Protocol::P2p(_))
    ) {
        return Err(invalid(
            "bootstrap",
            format!("`{raw}` has no /p2p/PEERID (`tokengo bootstrap` prints its full address)"),
        ));
    }
    Ok(addr)
}

/// External addresses as IPs: `/ip4/X`, `/ip6/X` (anything after the IP is ignored: the
/// ports are the node's own) or a bare IP.
pub(crate) fn parse_external(raw: &[String]) -> Result<Vec<IpAddr>, ConfigError> {
    raw.iter()
        .map(|a| {
            let a = a.trim();
            if let Ok(ip) = a.parse::<IpAddr>() {
                return Ok(ip);
            }
            a.parse::<Multiaddr>()
                .ok()
                .and_then(|m| crate::net::discovery::policy::ip_of(&m))
                .filter(|ip| !ip.is_unspecified())
                .ok_or_else(|| {
                    invalid(
                        "external_addrs",
                        format!("`{a}` is not /ip4/IP or /ip6/IP (the node's public address)"),
                    )
                })
        })
        .collect()
}

/// The UDP address of a node's DHT swarm; default [`DEFAULT_DHT_LISTEN`].
pub(crate) fn dht_listen(raw: Option<&str>) -> Result<SocketAddr, ConfigError> {
    parse_listen("dht_listen", raw.unwrap_or(DEFAULT_DHT_LISTEN))
}

/// Relay multiaddrs (with `/p2p/`): the flags (or their environment variable) when given,
/// else the file's list; errors name `field`.
pub(crate) fn relay_addrs(
    field: &'static str,
    flags: &[String],
    file: &[String],
) -> Result<Vec<RelayAddr>, ConfigError> {
    flags_or_file(flags, file)
        .iter()
        .map(|r| {
            r.trim()
                .parse()
                .map_err(|e: crate::net::transport::AddrError| invalid(field, e.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> libp2p_identity::PeerId {
        libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn bad_dht_values_name_their_field() {
        let no_p2p = ["/ip4/127.0.0.1/udp/4001/quic-v1".to_owned()];
        let cases = [
            (
                DhtFile {
                    bootstrap: &no_p2p,
                    ..DhtFile::default()
                },
                "bootstrap",
            ),
            (
                DhtFile {
                    dht_protocol: Some("kad"),
                    ..DhtFile::default()
                },
                "dht_protocol",
            ),
            (
                DhtFile {
                    address_policy: Some("lan"),
                    ..DhtFile::default()
                },
                "address_policy",
            ),
            (
                DhtFile {
                    discovery_timeout_secs: Some(601),
                    ..DhtFile::default()
                },
                "discovery_timeout_secs",
            ),
        ];
        for (file, field) in cases {
            let error = dht_config(&DhtArgs::default(), &file)
                .unwrap_err()
                .to_string();
            assert!(error.contains(field), "{file:?} -> {error}");
        }
        let error = parse_external(&["nowhere".to_owned()])
            .unwrap_err()
            .to_string();
        assert!(error.contains("external_addrs"), "{error}");
    }

    #[test]
    fn the_public_dht_by_default_and_flags_win_over_the_file() {
        let config = dht_config(&DhtArgs::default(), &DhtFile::default()).unwrap();
        assert_eq!(config.protocol.as_ref(), DEFAULT_DHT_PROTOCOL);
        assert_eq!(config.policy, AddressPolicy::Public);
        assert!(!config.bootstrap.is_empty());
        assert_eq!(config.timeout, DEFAULT_DISCOVERY_TIMEOUT);
        let file = DhtFile {
            address_policy: Some("any"),
            discovery_timeout_secs: Some(2),
            ..DhtFile::default()
        };
        let flags = DhtArgs {
            address_policy: Some("loopback".into()),
            ..DhtArgs::default()
        };
        let config = dht_config(&flags, &file).unwrap();
        assert_eq!(config.policy, AddressPolicy::Loopback);
        assert_eq!(config.timeout, Duration::from_secs(2));
    }

    #[test]
    fn bootstrap_peers_on_the_public_protocol_name_keep_the_public_policy() {
        let peer = peer();
        let policy = |bootstrap: &str, protocol: Option<&str>, policy: Option<&str>| {
            let args = DhtArgs {
                bootstrap: vec![format!("{bootstrap}/udp/4001/quic-v1/p2p/{peer}")],
                dht_protocol: protocol.map(str::to_owned),
                address_policy: policy.map(str::to_owned),
            };
            dht_config(&args, &DhtFile::default()).map(|c| c.policy)
        };
        // Own entry points into the public DHT: its records still must not steer dials
        // into the local network.
        assert_eq!(
            policy("/ip4/104.131.131.82", None, None).unwrap(),
            AddressPolicy::Public
        );
        // A private network names its own protocol.
        assert_eq!(
            policy("/ip4/10.0.0.5", Some("/mynet/kad/1.0.0"), None).unwrap(),
            AddressPolicy::Any
        );
        // A LAN peer on the public name would be refused at every dial: said at start.
        let error = policy("/ip4/10.0.0.5", None, None).unwrap_err().to_string();
        assert!(
            error.contains("--dht-protocol") && error.contains("--address-policy any"),
            "{error}"
        );
        assert_eq!(
            policy("/ip4/10.0.0.5", None, Some("any")).unwrap(),
            AddressPolicy::Any
        );
    }

    #[test]
    fn relay_lists_take_the_flags_over_the_file_and_need_a_peer_id() {
        let (a, b) = (peer(), peer());
        let addr = |p| format!("/ip4/127.0.0.1/udp/4433/quic-v1/p2p/{p}");
        let file = [addr(a)];
        let flags = [addr(b)];
        let from_file = relay_addrs("relay", &[], &file).unwrap();
        assert_eq!(from_file[0].peer_id(), a);
        let from_flags = relay_addrs("relay", &flags, &file).unwrap();
        assert_eq!(from_flags.len(), 1);
        assert_eq!(from_flags[0].peer_id(), b);
        let error = relay_addrs(
            "fallback_relays",
            &[],
            &["/ip4/1.2.3.4/udp/1/quic-v1".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("fallback_relays") && error.contains("/p2p/"),
            "{error}"
        );
    }
}
