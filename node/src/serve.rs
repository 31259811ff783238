//! `tokengo serve`: relay, exit and client in one process for local use. They talk over real
//! QUIC on loopback with the same certificate checks as separate processes; the relay's
//! port is chosen by the system and never leaves loopback, accepts only this process's exit,
//! and the client is pinned to that exit.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, RoleProbe},
    client::Client,
    config::ServeConfig,
    exit::Exit,
    identity,
    relay::Relay,
};

/// Runs all three roles until shutdown.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.data_dir.ensure()?;
    let (relay_identity, _) =
        identity::load_or_create(&config.data_dir.file("relay_identity.key"))?;
    let mut exit = Exit::load(&config.data_dir, &config.backend, config.limits.clone())?;
    exit.set_key_rotation(config.key_rotation);
    // The internal relay takes only this exit's registration, and the client sends only to
    // it: another local process cannot slip its own exit into the path.
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
        crate::access::ExitTokens::default(),
        config.limits.clone(),
        config.policy.clone(),
        crate::metrics::DhtMetrics::default(),
    )
    .await?;

    // Stop order: the client stops taking requests, then the exit drains, then the relay.
    let relay_stop = CancellationToken::new();
    let exit_stop = CancellationToken::new();
    let (registered, mut on_registered) = watch::channel(false);
    // One admin endpoint for the three roles; it starts before the exit registers, so a
    // liveness probe answers while the node comes up (and readiness says why not yet).
    let admin_stop = CancellationToken::new();
    let admin = admin::start(
        config.observability.admin_listen,
        admin::Role::Serve,
        vec![
            RoleProbe::Relay(relay.probe()),
            RoleProbe::Exit(exit.probe(relay_addr.clone(), registered.subscribe())),
            RoleProbe::Client(client.probe()),
        ],
        admin_stop.clone(),
    )
    .await?;
    let relay_task = tokio::spawn(relay.run(relay_stop.clone()));
    let mut exit_task = tokio::spawn(exit.run(relay_addr, registered, exit_stop.clone()));

    tokio::select! {
        () = shutdown.cancelled() => {
            exit_stop.cancel();
            relay_stop.cancel();
            admin_stop.cancel();
            return Ok(());
        }
        ready = on_registered.wait_for(|r| *r) => {
            ready.context("the exit stopped before registering")?;
        }
        // The exit gave up before registering: its error says why.
        finished = &mut exit_task => {
            relay_stop.cancel();
            admin_stop.cancel();
            finished.context("exit task panicked")??;
            anyhow::bail!("the exit stopped before registering");
        }
    }
    println!(
        "tokengo serving on http://{} (backend {})",
        client.local_addr(),
        config.backend.url
    );
    let served = client.run(shutdown).await;
    exit_stop.cancel();
    let exited = exit_task.await.context("exit task panicked")?;
    relay_stop.cancel();
    relay_task.await.context("relay task panicked")?;
    admin_stop.cancel();
    admin.stopped().await;
    served.and(exited)
}
