//! TokenGo node: the client, relay, exit and serve roles of a private AI API gateway.
//!
//! Every request is encrypted end to end with Oblivious HTTP from the local client to an exit,
//! through a relay that only ever sees ciphertext. The wire formats live in `tokengo-proto`;
//! this crate holds the async shells that drive them over QUIC and HTTP.

pub mod api_error;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod data_dir;
pub mod exit;
pub mod http_message;
pub mod identity;
pub mod keygen;
pub mod keyring;
pub mod logging;
pub mod relay;
pub mod serve;
pub mod shutdown;
pub mod stream;
pub mod transport;

use anyhow::Context as _;

/// Runs the command the user chose until it finishes or a shutdown signal drains it.
pub fn run(cli: cli::Cli) -> anyhow::Result<()> {
    transport::install_crypto_provider();
    if let cli::Command::Keygen(args) = &cli.command {
        return keygen::run(args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = shutdown::on_signals();
        match cli.command {
            cli::Command::Relay(args) => {
                let config = config::RelayConfig::resolve(args)?;
                relay::run(config, shutdown).await
            }
            cli::Command::Exit(args) => {
                let config = config::ExitConfig::resolve(args)?;
                exit::run(config, shutdown).await
            }
            cli::Command::Client(args) => {
                let config = config::ClientConfig::resolve(args)?;
                client::run(config, shutdown).await
            }
            cli::Command::Serve(args) => {
                let config = config::ServeConfig::resolve(args)?;
                serve::run(config, shutdown).await
            }
            cli::Command::Keygen(_) => Ok(()),
        }
    })
}
