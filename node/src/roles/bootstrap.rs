//! `tokengo bootstrap`: a Kademlia DHT server for a private TokenGo network. Relays announce
//! on it, clients and exits look relays up through it. Its identity is persisted in the data
//! directory (`bootstrap_identity.key`), so its multiaddr (printed at start, with
//! `/p2p/<PeerId>`) stays valid across restarts and can be written into configs.

use tokio_util::sync::CancellationToken;

use crate::{
    config::BootstrapConfig,
    net::discovery::{DhtServer, DialGuard},
    store::identity,
};

/// Identity file of a bootstrap node inside its data directory.
pub const IDENTITY_FILE: &str = tokengo_proto::data_dir::BOOTSTRAP_IDENTITY_FILE;

/// Runs the DHT server until shutdown.
pub async fn run(config: BootstrapConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.data_dir.ensure()?;
    let (key, created) = identity::load_or_create(&config.data_dir.file(IDENTITY_FILE))?;
    if created {
        tracing::info!(peer_id = %identity::peer_id(&key), "created bootstrap identity");
    }
    let server = DhtServer::start(
        &config.dht,
        key,
        config.listen,
        &config.external_ips,
        DialGuard::default(),
    )
    .await?;
    tracing::info!(
        protocol = %config.dht.protocol,
        policy = %config.dht.policy,
        peers = config.dht.bootstrap.len(),
        "DHT server running (kad server mode)"
    );
    if config.dht.protocol.as_ref() == crate::net::discovery::DEFAULT_DHT_PROTOCOL {
        tracing::warn!(
            "this DHT server speaks the public IPFS protocol name; a private network should choose its own with --dht-protocol (e.g. /mynet/kad/1.0.0)"
        );
    }
    if config.listen.ip().is_unspecified() && config.external_ips.is_empty() {
        tracing::info!(
            "listening on all interfaces; give other nodes this address with your public IP in place of 127.0.0.1 (or set --external-addr)"
        );
    }
    for addr in server.addrs() {
        println!("bootstrap listening on {addr}");
    }
    server.run(shutdown).await;
    Ok(())
}
