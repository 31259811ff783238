//! `tokengo serve`: relay, exit and client in one process for local use. They talk over real
//! QUIC on loopback with the same certificate checks as separate processes; the relay's
//! port is chosen by the system and never leaves loopback, accepts only this process's exit,
//! and the client is pinned to that exit.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    config::ServeConfig,
    net::transport::RelayAddr,
    ops::metrics::DhtMetrics,
    roles::{
        access::ExitTokens,
        client::{Client, ClientProbe},
        exit::{Exit, ExitProbe},
        relay::{Relay, RelayProbe},
    },
    store::identity,
};

/// The three roles of `tokengo serve`, bound and ready to run.
#[derive(Debug)]
pub struct Node {
    relay: Relay,
    exit: Exit,
    client: Client,
    relay_addr: RelayAddr,
    /// True once the exit's registration with the internal relay was taken.
    registered: watch::Sender<bool>,
    backend_url: String,
}

impl Node {
    /// Binds the internal relay on loopback, loads the exit and binds the client pinned to it.
    pub async fn start(config: ServeConfig) -> anyhow::Result<Self> {
        config.data_dir.ensure()?;
        let (relay_identity, _) = identity::load_or_create(
            &config
                .data_dir
                .file(tokengo_proto::data_dir::RELAY_IDENTITY_FILE),
        )?;
        let mut exit = Exit::load(&config.data_dir, &config.backend, config.limits.clone())?;
        exit.set_key_rotation(config.key_rotation);
        // The internal relay takes only this exit's registration, and the client sends only
        // to it: another local process cannot slip its own exit into the path.
        let relay = Relay::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &relay_identity,
            &config.limits,
        )?
        .only_exits(vec![exit.peer_id()]);
        let relay_addr = relay.addr().clone();
        tracing::info!(relay = %relay_addr, "internal relay listening on loopback");
        let client = Client::bind_pinned(
            config.listen,
            vec![relay_addr.clone()],
            vec![exit.peer_id()],
            ExitTokens::default(),
            config.limits.clone(),
            config.policy.clone(),
            DhtMetrics::default(),
        )
        .await?;
        Ok(Self {
            relay,
            exit,
            client,
            relay_addr,
            registered: watch::channel(false).0,
            backend_url: config.backend.url.to_string(),
        })
    }

    /// What the admin listener reads from each role. It starts before the exit registers, so
    /// a liveness probe answers while the node comes up (and readiness says why not yet).
    #[must_use]
    pub fn probes(&self) -> (RelayProbe, ExitProbe, ClientProbe) {
        (
            self.relay.probe(),
            self.exit
                .probe(self.relay_addr.clone(), self.registered.subscribe()),
            self.client.probe(),
        )
    }

    /// Runs all three roles until shutdown. Stop order: the client stops taking requests,
    /// then the exit drains, then the relay.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            relay,
            exit,
            client,
            relay_addr,
            registered,
            backend_url,
        } = self;
        let relay_stop = CancellationToken::new();
        let exit_stop = CancellationToken::new();
        let mut on_registered = registered.subscribe();
        let relay_task = tokio::spawn(relay.run(relay_stop.clone()));
        let mut exit_task = tokio::spawn(exit.run(relay_addr, registered, exit_stop.clone()));
        tokio::select! {
            () = shutdown.cancelled() => {
                exit_stop.cancel();
                relay_stop.cancel();
                return Ok(());
            }
            ready = on_registered.wait_for(|r| *r) => {
                ready.context("the exit stopped before registering")?;
            }
            // The exit gave up before registering: its error says why.
            finished = &mut exit_task => {
                relay_stop.cancel();
                finished.context("exit task panicked")??;
                anyhow::bail!("the exit stopped before registering");
            }
        }
        println!(
            "tokengo serving on http://{} (backend {backend_url})",
            client.local_addr(),
        );
        let served = client.run(shutdown).await;
        exit_stop.cancel();
        let exited = exit_task.await.context("exit task panicked")?;
        relay_stop.cancel();
        relay_task.await.context("relay task panicked")?;
        served.and(exited.map_err(anyhow::Error::from))
    }
}
