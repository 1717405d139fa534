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

/// Runs the server until a signal; returns after a clean shutdown.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
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
        corrupt_segments = report.corrupt_segments.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "queue recovered"
    );
    for c in &report.corrupt_segments {
        error!(segment = %c, "corrupt queue segment kept for inspection");
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
            let app = admin::router(state);
            if let Err(e) = axum::serve(admin_listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
            {
                error!(error = %e, "admin API failed");
            }
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
