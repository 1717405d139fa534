//! The controller: watches BackupMx objects (and the children they own) and reconciles each.
//!
//! The top-level [`reconcile`] only does tracing, metrics and the finalizer wrap; the work is in
//! [`apply`] (a list of steps that make the children match the spec, then report status; each
//! hands back its events and requeue time in a [`step::StepOutcome`], which the pass folds) and
//! [`cleanup`] (deletion). [`error_policy`] counts the failure and requeues. Alerts for the
//! webhook and the email are only queued by a pass; a task of their own delivers them
//! ([`alerts::AlertQueue`]).
//!
//! # Guarantees
//! - Nothing is applied from a spec that fails [`crate::validate`]: the objects keep their last
//!   good state and `Ready=False` (reason `InvalidSpec`) says why.
//! - Every child is written by server-side apply with one field manager
//!   ([`crate::render::FIELD_MANAGER`]); a pass that changes nothing writes nothing, so a second
//!   reconcile leaves every `resourceVersion` as it was.
//! - Deletion (with `deletionPolicy: Drain`) completes only once every pod reports an empty
//!   queue; volume claims are never deleted.

pub mod alerts;
pub mod apply;
pub mod cleanup;
pub mod dns;
pub mod drill;
pub mod replay;
pub mod status;
pub mod step;
#[cfg(test)]
mod tests;
pub mod trust;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{ConfigMap, Pod, Secret, Service},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder},
        finalizer::{Event, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use serde_json::json;
use tracing::{Instrument, field, info, info_span, warn};

use crate::{
    capabilities::Capabilities,
    crd::{BackupMx, BackupMxStatus},
    error::{Error, ErrorKind, Result},
    metrics::Metrics,
    pod_admin::PodAdmin,
    render::{FIELD_MANAGER, selector_string},
};

/// Finalizer the operator puts on every BackupMx.
pub const FINALIZER: &str = "backupmx.io/cleanup";
/// How often a settled object is reconciled again (refreshes the queue figures in status).
pub const RESYNC: Duration = Duration::from_secs(30);
/// How often deletion checks whether the queues are empty yet.
pub const DRAIN_POLL: Duration = Duration::from_secs(5);

/// What every reconcile pass needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub caps: Capabilities,
    /// Default mx-pod image (a BackupMx may name its own).
    pub mxpod_image: String,
    /// The operator's own namespace (`POD_NAMESPACE`): the pods' NetworkPolicy admits it to
    /// their admin port unless `spec.networkPolicy.adminFromNamespaces` says otherwise.
    pub operator_namespace: String,
    pub pods: PodAdmin,
    /// How DNS providers are made (from the spec, or a fixed one in tests).
    pub dns: dns::DnsFactory,
    /// How often published records are compared with the provider when nothing changed.
    pub dns_resync: Duration,
    /// One prober of the primary per BackupMx.
    pub probers: Arc<crate::health::Probers>,
    /// Alerts due for the webhook and the email; a task of their own delivers them, so a slow
    /// webhook or relay never holds up a reconcile pass.
    pub alerts: alerts::AlertQueue,
}

/// Which namespaces the controller watches.
#[derive(Debug, Clone)]
pub enum Scope {
    Cluster,
    Namespace(String),
}

impl Scope {
    fn api<K>(&self, client: Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Scope::Cluster => Api::all(client),
            Scope::Namespace(ns) => Api::namespaced(client, ns),
        }
    }
}

/// Runs the controller until `shutdown` resolves; reconciles in flight finish first.
pub async fn run(
    ctx: Arc<Context>,
    scope: Scope,
    wake: tokio::sync::mpsc::UnboundedReceiver<()>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // a prober's verdict changed: decide again at once (every object: transitions are rare)
    let woken =
        futures::stream::unfold(
            wake,
            |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
        );
    let client = ctx.client.clone();
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=backupmx-operator");
    Controller::new(
        scope.api::<BackupMx>(client.clone()),
        watcher::Config::default(),
    )
    .owns(scope.api::<StatefulSet>(client.clone()), owned.clone())
    .owns(scope.api::<ConfigMap>(client.clone()), owned.clone())
    .owns(scope.api::<Service>(client.clone()), owned.clone())
    .owns(scope.api::<Secret>(client.clone()), owned.clone())
    // the admin port's fence: a policy deleted or loosened by hand is put back at once, not
    // after up to a resync period with the port open to every pod
    .owns(scope.api::<NetworkPolicy>(client.clone()), owned.clone())
    // pods belong to the StatefulSet, not to the BackupMx: map them back by label, so a pod
    // that becomes ready (or gets a new IP) refreshes the status at once
    .watches(scope.api::<Pod>(client.clone()), owned, |pod: Pod| {
        let ns = pod.namespace()?;
        let name = pod.labels().get("app.kubernetes.io/instance")?.clone();
        Some(ObjectRef::<BackupMx>::new(&name).within(&ns))
    })
    .reconcile_all_on(woken)
    .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_millis(500)))
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|res| async move {
        match res {
            Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
            Err(e) => tracing::debug!(error = %e, "reconcile stream"),
        }
    })
    .await;
}

/// One reconcile pass of one BackupMx.
pub async fn reconcile(bmx: Arc<BackupMx>, ctx: Arc<Context>) -> Result<Action> {
    let ns = bmx.namespace().ok_or(Error::NoNamespace)?;
    let name = bmx.name_any();
    let _timer = ctx.metrics.reconcile_started(&ns, &name);
    let span = info_span!("reconcile", namespace = %ns, name = %name, generation = field::Empty);
    if let Some(g) = bmx.metadata.generation {
        span.record("generation", g);
    }
    let api: Api<BackupMx> = Api::namespaced(ctx.client.clone(), &ns);
    async {
        finalizer(&api, FINALIZER, bmx, |event| async {
            match event {
                Event::Apply(bmx) => apply::apply(&bmx, &ctx).await,
                Event::Cleanup(bmx) => cleanup::cleanup(&bmx, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    }
    .instrument(span)
    .await
}

/// What to do after a failed pass: count it, log it, retry later.
pub fn error_policy(bmx: Arc<BackupMx>, error: &Error, ctx: Arc<Context>) -> Action {
    let ns = bmx.namespace().unwrap_or_default();
    let name = bmx.name_any();
    let kind = error.kind();
    ctx.metrics.reconcile_failed(&ns, &name, kind.as_str());
    let after = match kind {
        ErrorKind::WaitingForDelivery => {
            info!(namespace = %ns, name = %name, "{error}");
            return Action::requeue(DRAIN_POLL);
        }
        ErrorKind::Conflict => Duration::from_secs(2),
        _ => Duration::from_secs(15),
    };
    warn!(namespace = %ns, name = %name, kind = kind.as_str(), error = %error, "reconcile failed");
    Action::requeue(after)
}

/// Writes `status` unless it is what the object already has (so a quiet pass writes nothing).
pub async fn write_status(bmx: &BackupMx, status: BackupMxStatus, ctx: &Context) -> Result<()> {
    if bmx.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let ns = bmx.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<BackupMx> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": "backupmx.io/v1alpha1",
        "kind": "BackupMx",
        "status": status,
    });
    api.patch_status(
        &bmx.name_any(),
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(patch),
    )
    .await
    .map_err(Error::kube("patch BackupMx status"))?;
    Ok(())
}

/// The mx-pods of `bmx` in `ns` (by the labels its StatefulSet gives them): what the pods
/// step reads their queues from, and what deletion waits on.
pub async fn mx_pods(bmx: &BackupMx, ctx: &Context, ns: &str) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels(&selector_string(bmx)))
        .await
        .map_err(Error::kube("list mx-pods"))?
        .items)
}

/// Publishes an event about `bmx`; a failure to publish is logged, never fatal.
pub async fn publish(
    ctx: &Context,
    bmx: &BackupMx,
    type_: EventType,
    reason: &str,
    note: impl Into<String>,
) {
    publish_with(&ctx.recorder, bmx, type_, reason, note).await;
}

/// [`publish`] through `recorder` (the alert delivery task has no [`Context`]).
pub async fn publish_with(
    recorder: &Recorder,
    bmx: &BackupMx,
    type_: EventType,
    reason: &str,
    note: impl Into<String>,
) {
    let mut note: String = note.into();
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &bmx.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish event");
    }
}
