//! TokenGo node: the client, relay, exit and serve roles of a private AI API gateway.
//!
//! Every request is encrypted end to end with Oblivious HTTP from the local client to an exit,
//! through a relay that only ever sees ciphertext. The wire formats live in `tokengo-proto`;
//! this crate holds the async shells that drive them over QUIC and HTTP.

pub mod access;
pub mod admin;
pub mod api_error;
pub mod bootstrap;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod data_dir;
pub mod discovery;
pub mod exit;
pub mod http_message;
pub mod identity;
pub mod keygen;
pub mod keyring;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod serve;
pub mod shutdown;
pub mod status;
pub mod stream;
pub mod telemetry;
pub mod transport;

use anyhow::Context as _;

/// A command with its checked configuration.
enum Resolved {
    Relay(config::RelayConfig),
    /// Boxed: an exit's configuration is the largest by far.
    Exit(Box<config::ExitConfig>),
    Client(config::ClientConfig),
    Serve(config::ServeConfig),
    Bootstrap(config::BootstrapConfig),
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
        cli::Command::Relay(args) => Resolved::Relay(config::RelayConfig::resolve(args)?),
        cli::Command::Exit(args) => Resolved::Exit(Box::new(config::ExitConfig::resolve(args)?)),
        cli::Command::Client(args) => Resolved::Client(config::ClientConfig::resolve(args)?),
        cli::Command::Serve(args) => Resolved::Serve(config::ServeConfig::resolve(args)?),
        cli::Command::Bootstrap(args) => {
            Resolved::Bootstrap(config::BootstrapConfig::resolve(args)?)
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
            Resolved::Relay(config) => relay::run(config, shutdown()).await,
            Resolved::Exit(config) => exit::run(*config, shutdown()).await,
            Resolved::Client(config) => client::run(config, shutdown()).await,
            Resolved::Serve(config) => serve::run(config, shutdown()).await,
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
