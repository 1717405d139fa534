//! `backupmx-operator`: `run` (the controller), `crdgen` (prints the CRD), `check-mx`.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::Context as _;
use backupmx_operator::{
    admin::{self, AdminState},
    capabilities::Capabilities,
    leader::{self, LeaseConfig},
    metrics::Metrics,
    pod_admin::PodAdmin,
    reconcile::{
        self, Context, Scope,
        alerts::{AlertQueue, SHUTDOWN_GRACE},
    },
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::runtime::events::{Recorder, Reporter};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "backupmx-operator",
    version,
    about = "Kubernetes operator for backup MX servers"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json, env = "BACKUPMX_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (with leader election, `/metrics` and `/healthz`).
    Run(RunArgs),
    /// Print the BackupMx CustomResourceDefinition (YAML).
    Crdgen,
    /// Check a domain's MX records and the SMTP servers they name.
    CheckMx(CheckMxArgs),
    /// Run a failover drill on a BackupMx and wait for its result (a test message through the
    /// backup to the primary's postmaster; the primary is not touched).
    Drill(DrillArgs),
}

#[derive(Args)]
struct CheckMxArgs {
    /// The mail domain.
    domain: String,
    /// DNS server (`ip:port`) to ask; the system's resolver otherwise.
    #[arg(long)]
    resolver: Option<std::net::SocketAddr>,
    /// SMTP port to probe on each MX host.
    #[arg(long, default_value_t = 25)]
    smtp_port: u16,
    /// Timeout of each lookup and probe.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// `table` for people, `json` for programs.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args)]
struct DrillArgs {
    /// The BackupMx.
    name: String,
    /// Its namespace (the kubeconfig's default when unset).
    #[arg(long, short)]
    namespace: Option<String>,
    /// How long to wait for the result.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// Watch only this namespace (namespace scope); all namespaces when unset (cluster scope).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// mx-pod container image for BackupMx objects that do not name one.
    #[arg(long, env = "MXPOD_IMAGE", default_value = concat!("backupmx/mx-pod:", env!("CARGO_PKG_VERSION")))]
    mxpod_image: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "BACKUPMX_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease so several replicas can run (one reconciles).
    #[arg(long, env = "BACKUPMX_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// The operator's own namespace: where the leader Lease is, and the namespace the mx-pods'
    /// NetworkPolicy admits to their admin port by default.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "BACKUPMX_LEASE_NAME", default_value = "backupmx-operator")]
    lease_name: String,
    /// This replica's identity in the Lease and in events (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How often published DNS records are compared with the provider when nothing changed
    /// (drift repair).
    #[arg(long, env = "BACKUPMX_DNS_RESYNC", default_value = "5m", value_parser = humantime::parse_duration)]
    dns_resync: std::time::Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => {
            print!("{}", backupmx_operator::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::CheckMx(a) => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let report = runtime.block_on(backupmx_operator::check_mx::check(
                &a.domain,
                a.resolver,
                a.smtp_port,
                a.timeout,
            ));
            match a.output {
                Output::Table => print!("{}", report.table()),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("the report serializes")
                ),
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Drill(a) => {
            init_logging(LogFormat::Text);
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(drill(a)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("drill: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run(args) => {
            init_logging(cli.log_format);
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = format!("{e:#}"), "backupmx-operator failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn,kube_lease_manager=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot configure the Kubernetes client (in-cluster or $KUBECONFIG)")?;
    let caps = Capabilities::discover(&client)
        .await
        .context("cannot reach the Kubernetes API server")?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "backupmx-operator".into());
        format!("{host}-{}", std::process::id())
    });
    let scope = match &args.namespace {
        Some(ns) => Scope::Namespace(ns.clone()),
        None => Scope::Cluster,
    };
    if !caps.namespace_name_label {
        warn!(
            server = %caps.server_version,
            namespace = %args.lease_namespace,
            "this API server does not label namespaces kubernetes.io/metadata.name: the mx-pods' \
             NetworkPolicy admits the operator to their admin port by that label, so label this \
             namespace with it or set spec.networkPolicy.adminFromNamespaces (docs/operator.md)"
        );
    }
    info!(
        server = %caps.server_version,
        pdb_v1 = caps.pdb_v1,
        pvc_retention_policy = caps.pvc_retention_policy,
        scope = ?scope,
        identity = %identity,
        "backupmx-operator starting"
    );

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    let shutdown = CancellationToken::new();
    let http = {
        let app = admin::router(AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            info!("signal received: finishing reconciles in flight, then exiting");
            shutdown.cancel();
            wait_for_signal().await;
            error!("second signal: exiting at once");
            std::process::exit(1);
        }
    });

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "backupmx-operator".into(),
            instance: Some(identity.clone()),
        },
    );
    // alert delivery stops once the controller has: what its last passes queued still goes out
    let alerts_stop = CancellationToken::new();
    let (alerts, alert_delivery) =
        AlertQueue::spawn(recorder.clone(), metrics.clone(), alerts_stop.clone());
    let ctx = Arc::new(Context {
        recorder,
        client: client.clone(),
        metrics: metrics.clone(),
        caps,
        mxpod_image: args.mxpod_image.clone(),
        operator_namespace: args.lease_namespace.clone(),
        pods: PodAdmin::default(),
        dns: backupmx_operator::reconcile::dns::DnsFactory::FromSpec,
        dns_resync: args.dns_resync,
        probers: Arc::new(backupmx_operator::health::Probers::new()),
        alerts,
    });
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let controller = |stop: CancellationToken| {
        let (ctx, scope) = (ctx.clone(), scope.clone());
        async move {
            let wake = ctx.probers.subscribe();
            reconcile::run(ctx, scope, wake, async move { stop.cancelled().await }).await
        }
    };
    let result = if args.leader_elect {
        let lease = LeaseConfig {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity,
        };
        leader::run_when_leading(client, lease, &metrics, shutdown.clone(), controller).await
    } else {
        metrics.leader.set(1);
        controller(shutdown.clone()).await;
        Ok(())
    };
    shutdown.cancel();
    alerts_stop.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, alert_delivery)
        .await
        .is_err()
    {
        warn!(
            grace = ?SHUTDOWN_GRACE,
            "exiting with alerts still queued: they were not sent to the webhook/email"
        );
    }
    let _ = http.await;
    info!("backupmx-operator stopped");
    result
}

/// Annotates the BackupMx and waits for the operator's verdict; true when it passed.
async fn drill(a: DrillArgs) -> anyhow::Result<bool> {
    use backupmx_operator::{crd::BackupMx, reconcile::drill::ANNOTATION};
    use kube::{
        Api,
        api::{Patch, PatchParams},
    };
    let client = kube::Client::try_default()
        .await
        .context("cannot configure the Kubernetes client")?;
    let api: Api<BackupMx> = match &a.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::default_namespaced(client),
    };
    let request = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    api.patch(
        &a.name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"annotations": {ANNOTATION: request}}})),
    )
    .await
    .with_context(|| format!("cannot annotate BackupMx {}", a.name))?;
    println!(
        "drill {request} requested on {}; waiting for the operator...",
        a.name
    );
    let deadline = std::time::Instant::now() + a.timeout;
    loop {
        let bmx = api.get(&a.name).await.context("cannot read the BackupMx")?;
        if let Some(d) = bmx
            .status
            .and_then(|s| s.drill)
            .filter(|d| d.request == request)
        {
            println!("{}: {}", d.result, d.message);
            if d.result != backupmx_operator::crd::DrillResult::Running {
                return Ok(d.result == backupmx_operator::crd::DrillResult::Passed);
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no result within {:?} (is the operator running?)",
            a.timeout
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
