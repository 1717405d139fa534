//! `mx-pod serve`: wires the queue, SMTP, replay and admin API together and runs them until
//! SIGTERM/SIGINT.
//!
//! Shutdown order: readiness goes false and SMTP stops accepting (new connections get
//! `421 4.3.2`, idle sessions are closed, transactions in flight finish, up to
//! `smtp.shutdown_grace`); then replay stops at a message boundary; the queue log is synced;
//! the admin API stops last; exit 0. A second signal aborts at once (exit 1).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use anyhow::Context;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminState},
    config::Config,
    metrics::Metrics,
    policy::Filters,
    queue::Queue,
    replay::Replay,
    smtp::{listener, session::SessionContext, tls::Tls},
    trust::Trust,
};

/// Reads the admin token file (trimmed); a configured but unreadable or empty file is an error,
/// and so is one that others may read ([`crate::config::check_token_file`]).
pub fn read_token(config: &Config) -> anyhow::Result<Option<Arc<str>>> {
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    crate::config::check_token_file(path)?;
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("admin.token_file: cannot read {}", path.display()))?;
    let token = token.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "admin.token_file: {} is empty",
        path.display()
    );
    Ok(Some(Arc::from(token)))
}

/// Descriptors kept free beyond SMTP sessions and admin connections: the queue's segments,
/// replay and DSN connections, DNS, rspamd, the listeners.
const FD_RESERVE: u64 = 256;

/// Raises the soft open-files limit to the hard one (each SMTP session holds a descriptor),
/// and says so when `smtp.max_connections` plus the admin API's cap and a reserve would not
/// fit: then a flood of sessions could starve the queue of descriptors. Returns the limit.
fn raise_fd_limit(config: &Config) -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    if current < maximum
        && let Err(e) = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: maximum,
                maximum,
            },
        )
    {
        warn!(error = %e, ?current, ?maximum, "cannot raise the open-files limit");
    }
    let limit = getrlimit(Resource::Nofile).current;
    let needed =
        config.smtp.max_connections as u64 + admin::serve::MAX_CONNECTIONS as u64 + FD_RESERVE;
    if let Some(limit) = limit
        && limit < needed
    {
        warn!(
            limit,
            needed,
            max_connections = config.smtp.max_connections,
            "the open-files limit is below smtp.max_connections + the admin API's connections + a reserve: lower smtp.max_connections or raise the limit (ulimit -n, LimitNOFILE=)"
        );
    }
    limit
}

/// Runs the server until a signal; returns after a clean shutdown.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let fd_limit = raise_fd_limit(&config);
    let config = Arc::new(config);
    let token = read_token(&config)?;
    if token.is_none() {
        warn!(
            "admin.token_file is not set: every admin call but /healthz, /readyz and /metrics is refused"
        );
    }
    let trust = Trust::load(config.trust.ca_file.as_deref())
        .map_err(|e| anyhow::anyhow!("trust.ca_file: {e}"))?;
    let (queue, report) = Queue::open(&config.queue)
        .with_context(|| format!("cannot open the queue in {}", config.queue.dir.display()))?;
    let (messages, bytes) = queue.totals();
    info!(
        dir = %config.queue.dir.display(),
        messages,
        bytes,
        segments = report.segments,
        records = report.records,
        torn_tails = report.torn_tails,
        missing_segments = report.missing_segments.len(),
        new_damage = report.damage.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "queue recovered"
    );
    let damage = queue.damage();
    if !damage.is_empty() {
        // each was logged when found; this says where to look and what to do
        error!(
            damage = damage.len(),
            "the queue directory is damaged: see GET /v1/queue (damage), then mx-pod queue repair"
        );
    }

    let smtp_listeners = listener::bind(&config.smtp.listen)?;
    let admin_listener = crate::listen::bind_one(config.admin.listen, "the admin API")?;

    let metrics = Arc::new(Metrics::new());
    let replay = Replay::new(
        config.clone(),
        queue.clone(),
        metrics.clone(),
        trust.clone(),
    );
    let smtp_stop = CancellationToken::new();
    let replay_stop = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let draining = Arc::new(AtomicBool::new(false));

    let state = AdminState {
        config: config.clone(),
        queue: queue.clone(),
        replay: replay.clone(),
        metrics: metrics.clone(),
        token,
        ready: ready.clone(),
        draining: draining.clone(),
        smtp_stop: smtp_stop.clone(),
    };
    let admin_task = {
        let stop = admin_stop.clone();
        tokio::spawn(async move {
            admin::serve::serve(admin_listener, admin::router(state), stop).await;
        })
    };

    let filters = Arc::new(Filters::new(&config, &trust).map_err(|e| anyhow::anyhow!(e))?);
    let tls = match &config.smtp.tls {
        Some(t) => Some(Arc::new(
            Tls::new(t).map_err(|e| anyhow::anyhow!("smtp.tls: {e}"))?,
        )),
        None => None,
    };
    let cache_stop = CancellationToken::new();
    let cache_flusher = tokio::spawn(filters.recipients.clone().run_flusher(cache_stop.clone()));
    let ctx = Arc::new(SessionContext {
        config: config.clone(),
        queue: queue.clone(),
        metrics: metrics.clone(),
        filters,
        tls,
        data_budget: Arc::new(crate::smtp::budget::DataBudget::new(
            config.smtp.max_inflight_data.0,
            config.smtp.max_message_size.0,
        )),
    });
    let smtp = listener::serve(smtp_listeners, ctx, smtp_stop.clone());
    let tasks = TaskTracker::new();
    replay.spawn(&tasks, replay_stop.clone());
    tasks.close();

    ready.store(true, Ordering::Relaxed);
    info!(
        hostname = %config.hostname,
        smtp = ?config.smtp.listen,
        admin = %config.admin.listen,
        workers = replay.settings().workers,
        auto = config.replay.auto,
        fd_limit,
        startup_ms = started.elapsed().as_millis() as u64,
        "mx-pod ready"
    );

    wait_for_signal().await;
    info!("shutting down: no longer accepting mail");
    ready.store(false, Ordering::Relaxed);
    // a second signal aborts
    tokio::spawn(async {
        wait_for_signal().await;
        error!("second signal: aborting without a clean shutdown");
        std::process::exit(1);
    });
    smtp_stop.cancel();
    smtp.drained().await;
    smtp.close().await;
    info!("SMTP sessions finished; stopping replay");
    replay_stop.cancel();
    tasks.wait().await;
    if let Err(e) = queue.sync().await {
        error!(error = %e, "final queue sync failed");
    }
    cache_stop.cancel();
    let _ = cache_flusher.await;
    admin_stop.cancel();
    let _ = admin_task.await;
    let (messages, _) = queue.totals();
    info!(queued = messages, "mx-pod stopped");
    Ok(())
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
