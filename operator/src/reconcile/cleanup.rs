//! The deletion path (run by the finalizer while the BackupMx has a deletion timestamp).
//!
//! # Expected flow
//! 1. The user deletes the BackupMx; the API server sets its deletion timestamp.
//! 2. With `deletionPolicy: Drain` (the default) every pod is told to drain (`POST /v1/drain`:
//!    it stops accepting mail and delivers what it holds), and each pass reads every pod's queue.
//! 3. While any pod holds mail, or a pod that has run cannot be asked, the finalizer stays:
//!    condition `Deleting=True` (reason `WaitingForDelivery` or `PodUnreachable`) and an event
//!    say what deletion waits for; the pass is retried every few seconds.
//! 4. Once every queue is empty, the cleanup hooks run (DNS record removal arrives with the
//!    DNS providers) and the finalizer is removed; the API server then deletes the object and the
//!    garbage collector its children.
//!
//! # Guarantees
//! Volume claims are never deleted: they are not owned by the BackupMx. With
//! `deletionPolicy: Orphan` deletion does not wait, and mail still queued stays on those volumes.

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use tracing::{info, warn};

use super::{Context, publish, status, write_status};
use crate::{
    crd::{BackupMx, DeletionPolicy},
    error::{Error, Result},
    pod_admin::pod_ip,
    render::{Names, secret::token_of},
};

/// Cleans up before `bmx` is deleted; an `Err(WaitingForDelivery)` keeps the finalizer.
pub async fn cleanup(bmx: &BackupMx, ctx: &Context) -> Result<Action> {
    let ns = bmx.namespace().ok_or(Error::NoNamespace)?;
    // the CA bundle serves the DNS API and the primary's probe; an unusable one does not stop
    // deletion by itself: the Mozilla roots alone may still do, and a failure below says why
    let bundle = super::trust::load(bmx, ctx).await;
    let trust = bundle.as_ref().map(|b| b.trust.clone()).unwrap_or_default();
    // first stop pointing senders at the backup: remove exactly our DNS records
    match super::dns::remove(bmx, ctx, &trust).await {
        Ok(removed) if !removed.is_empty() => {
            publish(
                ctx,
                bmx,
                EventType::Normal,
                "DNSRemoved",
                format!("removed: {}", removed.join(", ")),
            )
            .await;
        }
        Ok(_) => {}
        Err(e) => {
            let mut message = format!("cannot remove the DNS records yet: {e}");
            if let Err(unusable) = &bundle {
                message.push_str(&format!(
                    " (spec.caBundle not used, the Mozilla roots alone were: {unusable})"
                ));
            }
            let changed = bmx
                .status
                .as_ref()
                .and_then(|s| s.condition(status::DELETING))
                .is_none_or(|c| c.reason != "DnsCleanupFailed");
            if changed {
                publish(ctx, bmx, EventType::Warning, "DnsCleanupFailed", &message).await;
            }
            write_status(
                bmx,
                status::deleting(bmx, "DnsCleanupFailed", &message, &[]),
                ctx,
            )
            .await?;
            return Err(Error::DnsCleanup(e));
        }
    }
    if bmx.spec.deletion_policy == DeletionPolicy::Orphan {
        publish(
            ctx,
            bmx,
            EventType::Normal,
            "Orphaned",
            "deletionPolicy Orphan: deleted without waiting for queued mail; volumes kept",
        )
        .await;
        return finish(bmx, ctx).await;
    }

    let pods = super::mx_pods(bmx, ctx, &ns).await?;
    let token = if pods.is_empty() {
        None
    } else {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        secrets
            .get_opt(&Names::of(bmx).secret)
            .await
            .map_err(Error::kube("get the admin-token Secret"))?
            .as_ref()
            .and_then(token_of)
    };
    // one read of every pod's queue serves the replay decision and the status below
    let queues = ctx.pods.queues(&pods, token.as_deref()).await;
    if !pods.is_empty() {
        match &token {
            Some(token) => {
                for pod in &pods {
                    if let Some(ip) = pod_ip(pod)
                        && let Err(e) = ctx.pods.drain(ip, token).await
                    {
                        warn!(pod = %pod.name_any(), error = %e, "could not start draining");
                    }
                }
            }
            None => warn!("no admin token: cannot tell the pods to drain"),
        }
        // keep replay going while deletion waits: the pods deliver as the primary allows
        // (only for a spec that validates: an invalid one is not acted on, as in apply)
        let rendered = crate::validate::validate(&bmx.spec)
            .and_then(|valid| Ok((crate::render::config::mxpod_config(bmx, &valid)?, valid)));
        if let Ok((config, valid)) = rendered {
            let hash = crate::render::config::config_hash(&config.to_toml());
            // an unreadable CA bundle only costs a verified probe: deletion goes on
            let bundle = bundle.clone().unwrap_or_default();
            let health = super::replay::probe(bmx, &valid, ctx, &bundle);
            super::replay::control(
                bmx,
                &valid,
                ctx,
                &pods,
                &queues,
                token.as_deref(),
                &hash,
                bmx.spec.replicas,
                health,
            )
            .await;
        }
    }
    let queue = status::queue_status(&queues);
    let unreachable: Vec<String> = queue
        .pods
        .iter()
        .filter_map(|p| p.error.as_ref().map(|e| format!("{} ({e})", p.pod)))
        .collect();
    if queue.messages == 0 && unreachable.is_empty() {
        publish(
            ctx,
            bmx,
            EventType::Normal,
            "Drained",
            "every pod's queue is empty; deleting (volumes kept)",
        )
        .await;
        return finish(bmx, ctx).await;
    }
    let holding: Vec<String> = queue
        .pods
        .iter()
        .filter(|p| p.messages.is_some_and(|m| m > 0))
        .map(|p| format!("{}: {}", p.pod, p.messages.unwrap_or(0)))
        .collect();
    let (reason, message) = if unreachable.is_empty() {
        (
            "WaitingForDelivery",
            format!(
                "deletion waits until {} queued message(s) are delivered or bounced ({}); set \
                 spec.deletionPolicy: Orphan to delete now and keep the volumes",
                queue.messages,
                holding.join(", ")
            ),
        )
    } else {
        (
            "PodUnreachable",
            format!(
                "deletion waits: cannot read the queue of {}; {} message(s) queued elsewhere; set \
                 spec.deletionPolicy: Orphan to delete now and keep the volumes",
                unreachable.join(", "),
                queue.messages
            ),
        )
    };
    let new = status::deleting(bmx, reason, &message, &queues);
    let changed = bmx
        .status
        .as_ref()
        .and_then(|s| s.condition(status::DELETING))
        .is_none_or(|c| c.reason != reason);
    if changed {
        publish(ctx, bmx, EventType::Warning, reason, &message).await;
    }
    write_status(bmx, new, ctx).await?;
    Err(Error::WaitingForDelivery(message))
}

/// Deletion may go ahead.
async fn finish(bmx: &BackupMx, ctx: &Context) -> Result<Action> {
    // the prober lives as long as deletion may still replay (a drain waits for the primary):
    // removing it on every pass would restart it from "unknown" and never reach healthy
    let ns = bmx.namespace().unwrap_or_default();
    ctx.probers.remove(&format!("{ns}/{}", bmx.name_any()));
    ctx.metrics.forget(&ns, &bmx.name_any());
    info!(name = %bmx.name_any(), "cleanup done; removing the finalizer");
    Ok(Action::await_change())
}
