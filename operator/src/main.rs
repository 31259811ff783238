//! The `tokengo-operator` binary: `crd` prints the CustomResourceDefinitions; `run` (the
//! default) serves the admin endpoint, waits for the leader lease and runs the controllers
//! until SIGTERM, then drains and releases the lease.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokengo_operator::{
    admin::{self, Health},
    lease::{Elector, LeaseTiming},
    manifest::{PullPolicy, Settings},
    metrics::Metrics,
    reconcile::{self, Context},
    resource,
};
use tokio_util::sync::CancellationToken;

/// Kubernetes operator for TokenGo relays and exits.
#[derive(Debug, Parser)]
#[command(name = "tokengo-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crd,
    /// Run the controllers (the default).
    Run,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Node image for resources that name none.
    #[arg(
        long,
        env = "TOKENGO_NODE_IMAGE",
        default_value = "tokengo/node:latest"
    )]
    node_image: String,
    /// The cluster's DNS domain (for in-cluster relay addresses).
    #[arg(long, env = "TOKENGO_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "TOKENGO_ADMIN_LISTEN", default_value = "0.0.0.0:8081")]
    admin_listen: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "TOKENGO_LEASE_NAME", default_value = "tokengo-operator")]
    lease_name: String,
    /// This replica's name in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    // --- Node pods (h-opwork): how the operator's relay and exit pods pull their image.
    /// `imagePullPolicy` of node containers: Always, IfNotPresent or Never. Default:
    /// Kubernetes' own (Always for `:latest` or untagged images, else IfNotPresent).
    #[arg(long, env = "TOKENGO_NODE_IMAGE_PULL_POLICY")]
    node_image_pull_policy: Option<PullPolicy>,
    /// Secrets node pods pull their image with (comma-separated names, each in the pods'
    /// namespace). Default: none.
    #[arg(long, env = "TOKENGO_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    image_pull_secrets: Vec<String>,
    // --- End of node pods.
    /// Log format on stderr.
    #[arg(long, env = "TOKENGO_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Crd) => print_crds(),
        Some(Command::Run) | None => run(cli.run),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_crds() -> anyhow::Result<()> {
    for crd in resource::definitions() {
        print!("---\n{}", resource::definition_yaml(&crd)?);
    }
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    // One TLS provider for the whole process (the workspace's: aws-lc-rs).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(operate(args))
}

async fn operate(args: RunArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signals(shutdown.clone()));

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let listener = admin::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin endpoint {}", args.admin_listen))?;
    let admin_task = tokio::spawn(admin::serve(
        listener,
        health.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    client
        .apiserver_version()
        .await
        .context("reaching the Kubernetes API server")?;
    health.set_ready(true);

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("tokengo-operator-{}", std::process::id()));
    let elector = Elector::new(
        Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
        &args.lease_name,
        &identity,
        LeaseTiming::default(),
    );
    tracing::info!(%identity, lease = %args.lease_name, "waiting for the leader lease");
    if !elector.acquire(&shutdown).await {
        tracing::info!("shut down before becoming leader");
        return finish(admin_task).await;
    }
    metrics.set_leader(true);
    tracing::info!(%identity, "leading: starting the controllers");

    let settings = Settings {
        node_image: args.node_image,
        cluster_domain: args.cluster_domain,
        // h-opwork: node pods' image pulling.
        node_image_pull_policy: args.node_image_pull_policy,
        image_pull_secrets: args
            .image_pull_secrets
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    let ctx = Arc::new(Context::new(
        client,
        settings,
        metrics.clone(),
        Some(identity),
    ));
    let stop = shutdown.child_token();
    let controllers = tokio::spawn(reconcile::run(ctx, stop.clone()));
    let kept = elector.hold(&shutdown).await;
    // Lost or shutting down: stop acting, let reconciliations in flight finish.
    stop.cancel();
    controllers.await.context("controller task")?;
    metrics.set_leader(false);
    if !kept {
        shutdown.cancel();
        let _ = finish(admin_task).await;
        anyhow::bail!("lost the leader lease; exiting so a restart re-enters the election");
    }
    if let Err(error) = elector.release().await {
        tracing::warn!(%error, "could not release the leader lease; it expires by itself");
    }
    tracing::info!("stopped");
    finish(admin_task).await
}

async fn finish(admin_task: tokio::task::JoinHandle<std::io::Result<()>>) -> anyhow::Result<()> {
    admin_task
        .await
        .context("admin task")?
        .context("admin endpoint")
}

/// Cancels `token` on SIGTERM (Kubernetes stopping the pod) or SIGINT.
async fn on_signals(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}
