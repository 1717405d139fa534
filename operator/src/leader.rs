//! Lease-based leader election: several operator replicas run, one reconciles.
//!
//! The lease is a `coordination.k8s.io/v1` Lease held through the kube-lease-manager crate
//! (server-side apply on the Lease, so two candidates cannot both win a race). The leader renews
//! it well before it expires; when the leader dies, the lease expires after
//! [`LEASE_SECONDS`] and a waiting replica takes it and starts its controller. When leadership
//! is lost (an API outage long enough for the lease to expire), the controller is stopped at
//! once, so two replicas never write at the same time for longer than the renewal margin.
//! On shutdown the lease is released, so a rolling update hands over without waiting.

use std::future::Future;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::Metrics;

/// How long a lease is valid after its last renewal.
pub const LEASE_SECONDS: u64 = 15;
/// The holder renews this long before the lease would expire.
pub const RENEW_MARGIN_SECONDS: u64 = 5;

/// Where the lease lives and who we are.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
}

/// Runs `work` whenever this replica holds the lease, until `shutdown` is cancelled.
/// `work` gets a token that is cancelled when leadership is lost or on shutdown; it must return
/// soon after.
pub async fn run_when_leading<F, Fut>(
    client: Client,
    lease: LeaseConfig,
    metrics: &Metrics,
    shutdown: CancellationToken,
    work: F,
) -> anyhow::Result<()>
where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let manager = LeaseManagerBuilder::new(client, &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(RENEW_MARGIN_SECONDS)
        .with_field_manager(format!("backupmx-operator-lease/{}", lease.identity))
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("cannot use Lease {}/{}: {e}", lease.namespace, lease.name))?;
    let (mut leading, task) = manager.watch().await;
    info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity,
        "waiting for leadership");
    let result = loop {
        // wait to lead
        while !*leading.borrow_and_update() {
            tokio::select! {
                changed = leading.changed() => if changed.is_err() {
                    break;
                },
                _ = shutdown.cancelled() => break,
            }
        }
        if shutdown.is_cancelled() {
            break Ok(());
        }
        if !*leading.borrow() {
            break Err(anyhow::anyhow!("the lease manager stopped"));
        }
        info!(identity = %lease.identity, "became the leader: starting the controller");
        metrics.leader.set(1);
        let stop = shutdown.child_token();
        let mut running = tokio::spawn(work(stop.clone()));
        let lost = loop {
            tokio::select! {
                changed = leading.changed() => {
                    if changed.is_err() || !*leading.borrow_and_update() {
                        break true;
                    }
                }
                _ = shutdown.cancelled() => break false,
                _ = &mut running => break false,
            }
        };
        stop.cancel();
        if !running.is_finished() {
            let _ = running.await;
        }
        metrics.leader.set(0);
        if lost {
            error!(identity = %lease.identity, "lost the lease: controller stopped; waiting to lead again");
            continue;
        }
        break Ok(());
    };
    // dropping the receiver makes the manager release the lease
    drop(leading);
    match task.await {
        Ok(Ok(_)) => info!("lease released"),
        Ok(Err(e)) => error!(error = %e, "releasing the lease failed"),
        Err(e) => error!(error = %e, "lease task panicked"),
    }
    result
}
