//! The `tokengo-operator` binary: `crd` prints the CustomResourceDefinitions; `run` (the
//! default) serves the admin endpoint, applies the CRDs (with `--apply-crds`), checks that they
//! are served and that its RBAC lets it list what it watches (exiting with a message saying what
//! to do when not), waits for the leader lease and runs the controllers until SIGTERM, then
//! drains and releases the lease.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokengo_operator::{
    admin::{self, Health},
    lease::{Elector, LeaseTiming},
    manifest::{PullPolicy, Settings},
    metrics::Metrics,
    reconcile::{self, Context, WatchScope},
    resource,
    startup::{self, CrdDecision},
};
use tokio_util::sync::CancellationToken;

/// Kubernetes operator for TokenGo relays and exits.
#[derive(Debug, Parser)]
#[command(
    name = "tokengo-operator",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
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
    /// Run the controllers (the default; the same flags work without `run`).
    Run(Box<RunArgs>),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Node image for resources that name none (default: this release's image).
    #[arg(
        long,
        env = "TOKENGO_NODE_IMAGE",
        default_value = concat!("ghcr.io/tokengo/tokengo-node:", env!("CARGO_PKG_VERSION"))
    )]
    node_image: String,
    /// Watch only these namespaces (repeatable, or comma-separated); default: every namespace.
    /// With namespaces, a Role in each of them is all the RBAC the controllers need.
    #[arg(
        long = "namespace",
        env = "TOKENGO_WATCH_NAMESPACES",
        value_delimiter = ',',
        value_name = "NS"
    )]
    namespaces: Vec<String>,
    /// Apply the CRDs this operator was built with at start (server-side apply, field manager
    /// `tokengo-operator`), unless a newer operator's are in place; needs the chart's CRD RBAC.
    /// Default off for the binary; the chart turns it on (`applyCrds`), since Helm never
    /// upgrades a chart's `crds/`.
    #[arg(
        long,
        env = "TOKENGO_APPLY_CRDS",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    apply_crds: bool,
    /// Leader election: seconds a lease is valid after its last renewal; a standby takes an
    /// unrenewed lease after this long by its own clock.
    #[arg(
        long,
        env = "TOKENGO_LEASE_DURATION",
        default_value_t = 15,
        value_name = "SECONDS"
    )]
    lease_duration: u32,
    /// Leader election: seconds the leader keeps acting without a successful renewal (then it
    /// stops and exits); shorter than the lease duration.
    #[arg(
        long,
        env = "TOKENGO_LEASE_RENEW_DEADLINE",
        default_value_t = 10.0,
        value_name = "SECONDS"
    )]
    lease_renew_deadline: f64,
    /// Leader election: seconds between renewals (and between a standby's attempts); shorter
    /// than the renew deadline. Each lease API call times out after half the renew deadline.
    #[arg(
        long,
        env = "TOKENGO_LEASE_RETRY_PERIOD",
        default_value_t = 2.0,
        value_name = "SECONDS"
    )]
    lease_retry_period: f64,
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
        Some(Command::Run(args)) => run(*args),
        None => run(cli.run),
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

fn seconds(what: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("{what}: {value} is not a number of seconds"))
}

fn lease_timing(args: &RunArgs) -> anyhow::Result<LeaseTiming> {
    Ok(LeaseTiming::new(
        Duration::from_secs(u64::from(args.lease_duration)),
        seconds("--lease-renew-deadline", args.lease_renew_deadline)?,
        seconds("--lease-retry-period", args.lease_retry_period)?,
    )?)
}

async fn operate(args: RunArgs) -> anyhow::Result<()> {
    let timing = lease_timing(&args).context("leader election timings")?;
    let scope = WatchScope::new(&args.namespaces).context("--namespace")?;
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
    if args.apply_crds {
        for outcome in startup::apply_crds(&client).await? {
            match outcome.decision {
                CrdDecision::Apply => tracing::info!(crd = %outcome.name, "CRD applied"),
                CrdDecision::KeepNewer(version) => tracing::warn!(
                    crd = %outcome.name,
                    %version,
                    ours = env!("CARGO_PKG_VERSION"),
                    "a newer operator applied this CRD; leaving it (upgrade this operator)"
                ),
            }
        }
    }
    // Before the election, so a misconfigured standby fails as loudly as a leader would.
    startup::check_crds(&client).await?;
    startup::check_access(&client, &scope).await?;
    tracing::info!(%scope, "CRDs served and RBAC sufficient");
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
        timing,
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
    let ctx =
        Arc::new(Context::new(client, settings, metrics.clone(), Some(identity)).watching(scope));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(
            std::iter::once("tokengo-operator")
                .chain(std::iter::once("run"))
                .chain(args.iter().copied()),
        )?;
        match cli.command {
            Some(Command::Run(args)) => Ok(*args),
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn flags_work_with_and_without_run() {
        let bare = Cli::try_parse_from(["tokengo-operator", "--namespace", "a"]).unwrap();
        assert!(bare.command.is_none());
        assert_eq!(bare.run.namespaces, ["a"]);
        assert_eq!(run_args(&["--namespace", "a"]).unwrap().namespaces, ["a"]);
        assert!(Cli::try_parse_from(["tokengo-operator", "crd"]).is_ok());
    }

    #[test]
    fn namespaces_repeat_or_come_comma_separated() {
        let args = run_args(&["--namespace", "a,b", "--namespace", "c"]).unwrap();
        assert_eq!(args.namespaces, ["a", "b", "c"]);
        assert_eq!(
            WatchScope::new(&args.namespaces).unwrap(),
            WatchScope::Namespaces(vec!["a".into(), "b".into(), "c".into()])
        );
    }

    #[test]
    fn apply_crds_is_a_flag_or_a_boolean() {
        assert!(run_args(&["--apply-crds"]).unwrap().apply_crds);
        assert!(run_args(&["--apply-crds=true"]).unwrap().apply_crds);
        assert!(!run_args(&["--apply-crds=false"]).unwrap().apply_crds);
        assert!(run_args(&["--apply-crds=maybe"]).is_err());
    }

    #[test]
    fn lease_timings_default_to_client_gos_and_are_checked() {
        let args = run_args(&[]).unwrap();
        assert_eq!(lease_timing(&args).unwrap(), LeaseTiming::default());
        let fast = run_args(&[
            "--lease-duration",
            "4",
            "--lease-renew-deadline",
            "2.5",
            "--lease-retry-period",
            "0.5",
        ])
        .unwrap();
        let timing = lease_timing(&fast).unwrap();
        assert_eq!(timing.renew_deadline(), Duration::from_millis(2500));
        assert_eq!(timing.retry_period(), Duration::from_millis(500));
        let bad = run_args(&["--lease-duration", "10", "--lease-renew-deadline", "10"]).unwrap();
        assert!(lease_timing(&bad).is_err());
        let negative = run_args(&["--lease-retry-period=-1"]).unwrap();
        assert!(lease_timing(&negative).is_err());
    }

    #[test]
    fn the_default_node_image_is_this_releases() {
        let args = run_args(&[]).unwrap();
        assert_eq!(
            args.node_image,
            format!("ghcr.io/tokengo/tokengo-node:{}", env!("CARGO_PKG_VERSION"))
        );
    }
}
