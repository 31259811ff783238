//! The wiring at the top: for each command, the role is built from its checked configuration,
//! its probes handed to the admin endpoint, and both run until a signal drains them. Roles
//! know nothing of the admin endpoint; the admin endpoint knows roles only as [`Probe`]s.

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    cli, config,
    net::transport,
    ops::{
        admin::{self, Probe, Role},
        logging, shutdown, status,
        status::StatusReport,
        telemetry,
    },
    roles::{bootstrap, client, exit, relay, serve},
    store::keygen,
};

/// A command with its checked configuration.
enum Resolved {
    Relay(relay::config::RelayConfig),
    /// Boxed: an exit's configuration is the largest by far.
    Exit(Box<exit::config::ExitConfig>),
    Client(client::config::ClientConfig),
    Serve(serve::config::ServeConfig),
    Bootstrap(bootstrap::config::BootstrapConfig),
    Status(cli::StatusArgs),
}

impl Resolved {
    fn traces(&self) -> &config::TraceExport {
        match self {
            Self::Relay(c) => &c.observability.traces,
            Self::Exit(c) => &c.observability.traces,
            Self::Client(c) => &c.observability.traces,
            Self::Serve(c) => &c.observability.traces,
            Self::Bootstrap(_) | Self::Status(_) => &config::TraceExport::Off,
        }
    }

    fn worker_threads(&self) -> config::WorkerThreads {
        match self {
            Self::Relay(c) => c.worker_threads,
            Self::Exit(c) => c.worker_threads,
            Self::Client(c) => c.worker_threads,
            Self::Serve(c) => c.worker_threads,
            Self::Bootstrap(c) => c.worker_threads,
            Self::Status(_) => config::WorkerThreads::ONE,
        }
    }
}

/// Runs the command the user chose until it finishes or a shutdown signal drains it.
pub fn run(cli: cli::Cli) -> anyhow::Result<()> {
    transport::install_crypto_provider();
    let format = cli.log_format();
    let resolved = match cli.command {
        cli::Command::Keygen(args) => {
            logging::init(format, None);
            return keygen::run(&args);
        }
        cli::Command::Relay(args) => Resolved::Relay(relay::config::RelayConfig::resolve(args)?),
        cli::Command::Exit(args) => {
            Resolved::Exit(Box::new(exit::config::ExitConfig::resolve(args)?))
        }
        cli::Command::Client(args) => {
            Resolved::Client(client::config::ClientConfig::resolve(args)?)
        }
        cli::Command::Serve(args) => Resolved::Serve(serve::config::ServeConfig::resolve(args)?),
        cli::Command::Bootstrap(args) => {
            Resolved::Bootstrap(bootstrap::config::BootstrapConfig::resolve(args)?)
        }
        cli::Command::Status(args) => Resolved::Status(args),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(resolved.worker_threads().get())
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let tracing = telemetry::Tracing::start(resolved.traces(), runtime.handle().clone())?;
    logging::init(format, tracing.as_ref().map(telemetry::Tracing::provider));
    // The role runs in a spawned task, not in `block_on`: a future polled by `block_on` lives on
    // the main thread, outside the worker pool, so every wake-up of it (an exit's tunnel
    // accepting a request stream, say) would cross threads twice, out and back.
    let role = runtime.spawn(async move {
        let shutdown = || shutdown::on_signals();
        match resolved {
            Resolved::Relay(config) => run_relay(config, shutdown()).await,
            Resolved::Exit(config) => run_exit(*config, shutdown()).await,
            Resolved::Client(config) => run_client(config, shutdown()).await,
            Resolved::Serve(config) => run_serve(config, shutdown()).await,
            Resolved::Bootstrap(config) => bootstrap::run(config, shutdown()).await,
            Resolved::Status(args) => {
                let report = status::fetch(&args.admin).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", status::summary(&report));
                }
                Ok(())
            }
        }
    });
    let result = runtime
        .block_on(role)
        .unwrap_or_else(|panicked| Err(anyhow::anyhow!("the role's task failed: {panicked}")));
    // The batch exporter sends its last spans through this runtime, so flush before it goes.
    if let Some(tracing) = tracing {
        tracing.shutdown();
    }
    result
}

/// `tokengo relay`.
async fn run_relay(
    config: relay::config::RelayConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (node, identity) = relay::start(&config)?;
    let admin = admin::start(
        config.observability.admin_listen,
        Role::Relay,
        vec![RoleProbe::Relay(node.probe())],
        shutdown.clone(),
    )
    .await?;
    relay::serve(config, node, identity, shutdown).await;
    admin.stopped().await;
    Ok(())
}

/// `tokengo exit`.
async fn run_exit(
    config: exit::config::ExitConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let node = exit::prepare(&config, &shutdown)?;
    // The admin endpoint answers from the start (not ready while discovery runs), so a
    // liveness probe does not kill an exit that is still looking for relays.
    let (registered, _) = watch::channel(false);
    let admin = admin::start(
        config.observability.admin_listen,
        Role::Exit,
        vec![RoleProbe::Exit(node.probe_all(registered.subscribe()))],
        shutdown.clone(),
    )
    .await?;
    let result = exit::serve(config, node, registered, shutdown.clone()).await;
    // The exit may stop on its own (a relay that refuses it): the admin listener goes too.
    shutdown.cancel();
    admin.stopped().await;
    result
}

/// `tokengo client`.
async fn run_client(
    config: client::config::ClientConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let admin_listen = config.observability.admin_listen;
    let node = client::start(config, &shutdown).await?;
    let admin = admin::start(
        admin_listen,
        Role::Client,
        vec![RoleProbe::Client(node.probe())],
        shutdown.clone(),
    )
    .await?;
    let result = client::serve(node, shutdown.clone()).await;
    shutdown.cancel();
    admin.stopped().await;
    result
}

/// `tokengo serve`: one admin endpoint for the three roles, stopped after all of them.
async fn run_serve(
    config: serve::config::ServeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let admin_listen = config.observability.admin_listen;
    let node = serve::Node::start(config).await?;
    let (relay, exit, client) = node.probes();
    let admin_stop = CancellationToken::new();
    let admin = admin::start(
        admin_listen,
        Role::Serve,
        vec![
            RoleProbe::Relay(relay),
            RoleProbe::Exit(exit),
            RoleProbe::Client(client),
        ],
        admin_stop.clone(),
    )
    .await?;
    let result = node.run(shutdown).await;
    admin_stop.cancel();
    admin.stopped().await;
    result
}

/// A running role, as the admin listener sees it.
#[derive(Debug, Clone)]
pub enum RoleProbe {
    /// A relay.
    Relay(relay::RelayProbe),
    /// An exit.
    Exit(exit::ExitProbe),
    /// A client.
    Client(client::ClientProbe),
}

impl Probe for RoleProbe {
    async fn not_ready(&self) -> Vec<String> {
        match self {
            Self::Relay(probe) => probe.not_ready(),
            Self::Exit(probe) => probe.not_ready().await,
            Self::Client(probe) => probe.not_ready().await,
        }
    }

    fn dht_note(&self) -> Option<String> {
        let (role, dht) = match self {
            Self::Relay(probe) => ("relay", probe.status(None).dht),
            Self::Exit(probe) => ("exit", probe.status(None).dht),
            Self::Client(_) => return None,
        };
        dht.map(|dht| format!("{role} DHT: {}", status::dht_state(&dht)))
    }

    fn register(&self, registry: &mut Registry) {
        match self {
            Self::Relay(probe) => probe.metrics().register(registry),
            Self::Exit(probe) => probe.metrics().register(registry),
            Self::Client(probe) => probe.metrics().register(registry),
        }
    }

    async fn refresh(&self) {
        match self {
            Self::Relay(_) => {}
            Self::Exit(probe) => probe.refresh().await,
            Self::Client(probe) => probe.refresh(),
        }
    }

    fn requests_total(&self) -> u64 {
        match self {
            Self::Relay(probe) => probe.metrics().forwards_total(),
            Self::Exit(probe) => probe.metrics().requests_total(),
            Self::Client(probe) => probe.metrics().requests_total(),
        }
    }

    fn report(&self, requests_per_sec: Option<f64>, report: &mut StatusReport) {
        match self {
            Self::Relay(probe) => report.relay = Some(probe.status(requests_per_sec)),
            Self::Exit(probe) => report.exit = Some(probe.status(requests_per_sec)),
            Self::Client(probe) => report.client = Some(probe.status(requests_per_sec)),
        }
    }
}
