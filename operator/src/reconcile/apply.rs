//! The apply path: validate, then run the steps of the pass in order, each making its part of
//! the world match the spec and saying what it saw; then publish their events and write status.
//!
//! | step | what | function |
//! |---|---|---|
//! | objects | admin-token Secret, ConfigMap, Services, NetworkPolicy | [`objects`] |
//! | pods | the mx-pods, their queues, the StatefulSet's current replicas | [`pods`] |
//! | probe | the primary's prober, and what it knows | [`super::replay::probe`] |
//! | replay push | the replay decision, pushed to the pods; drains before a scale-down | [`super::replay::step`] |
//! | workload | StatefulSet (scaled down once drained), PodDisruptionBudget | [`workload`] |
//! | DNS | the MX records, when due | [`super::dns::step`] |
//! | alerts | an event per change; webhook/email queued for their own task | [`super::alerts::step`] |
//! | drill | the failover drill, if one is asked for | [`super::drill::step`] |
//! | status | the new status, and the `Ready` transition event | [`super::status::step`] |
//!
//! Each step hands back its events and how soon it wants another look ([`StepOutcome`]); the
//! pass folds them in step order (events concatenated, the earliest requeue wins, capped at the
//! resync and `--dns-resync`), publishes the events — those of the steps before a failed one
//! too — and then writes the status. A spec that cannot be served stops the pass before any
//! step ([`refuse`]).
//!
//! Order matters only for the first pass: the Secret and ConfigMap exist before the StatefulSet
//! whose pods mount them, and the NetworkPolicy before the pods it fences. Children are applied
//! with `force`: the operator owns them, and a field changed by hand is taken back (that is what
//! reconciling means); the BackupMx status is applied without force.

use std::{net::IpAddr, time::Duration};

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{ConfigMap, Pod, Secret, Service},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, Preconditions},
    runtime::controller::Action,
};
use tracing::{debug, info};

use super::{
    Context, RESYNC,
    replay::ReplayOutcome,
    status::{self, Observed},
    step::{Note, StepOutcome},
    trust::Bundle,
    write_status,
};
use crate::{
    crd::{BackupMx, BackupMxStatus},
    error::{Error, Result},
    pod_admin::PodQueue,
    render::{
        FIELD_MANAGER, Names,
        config::{config_hash, configmap, mxpod_config},
        network::{headless_service, network_policy, smtp_service},
        secret::{new_token, secret, token_of},
        workload::{apply_body, pdb, statefulset},
    },
    validate::{ValidSpec, validate},
};

/// Applies `bmx`'s children and updates its status.
pub async fn apply(bmx: &BackupMx, ctx: &Context) -> Result<Action> {
    bmx.namespace().ok_or(Error::NoNamespace)?;
    let rendered = validate(&bmx.spec).and_then(|valid| Ok((mxpod_config(bmx, &valid)?, valid)));
    let (config, valid) = match rendered {
        Ok(r) => r,
        Err(invalid) => return refuse(bmx, ctx, "InvalidSpec", &invalid.to_string()).await,
    };
    let bundle = match super::trust::load(bmx, ctx).await {
        Ok(b) => b,
        Err(message) => {
            return refuse(bmx, ctx, super::trust::CA_BUNDLE_INVALID, &message).await;
        }
    };
    let mut pass = StepOutcome::default();
    let status = steps(bmx, ctx, &valid, &config, &bundle, &mut pass).await;
    pass.publish(ctx, bmx).await;
    write_status(bmx, status?, ctx).await?;
    let requeue = pass.requeue.map_or(RESYNC, |r| r.min(RESYNC));
    Ok(Action::requeue(
        requeue.min(ctx.dns_resync.max(Duration::from_secs(1))),
    ))
}

/// The steps of one pass, in order, each folding its outcome into `pass`; the status to write.
async fn steps(
    bmx: &BackupMx,
    ctx: &Context,
    valid: &ValidSpec,
    config: &mx_pod::config::Config,
    bundle: &Bundle,
    pass: &mut StepOutcome,
) -> Result<BackupMxStatus> {
    let objects = pass.take(objects(bmx, ctx, config).await?);
    let pods = pods(bmx, ctx, &objects).await?;
    let health = super::replay::probe(bmx, valid, ctx, bundle);
    let replay = pass.take(super::replay::step(bmx, valid, ctx, &objects, &pods, health).await);
    let sts = pass.take(workload(bmx, ctx, &objects, &pods, &replay).await?);
    let dns = super::dns::step(bmx, &objects.lb_addresses, ctx, &bundle.trust).await;
    let dns = pass.take(dns);
    let alerts = super::alerts::step(
        bmx,
        valid,
        &ctx.alerts,
        &pods.queues,
        &replay,
        &bundle.trust,
    );
    let alerts = pass.take(alerts);
    let drill = pass.take(super::drill::step(bmx, ctx, &objects, &pods, &replay.decision).await);
    let seen = Observed {
        replicas: bmx.spec.replicas,
        ready_replicas: sts
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
        queues: pods.queues,
        dns,
        replay: Some(replay),
        alerts: Some(alerts),
        drill,
    };
    Ok(pass.take(status::step(bmx, &seen)))
}

/// What the objects step made or found.
pub struct Objects {
    /// The pods' admin token, as its Secret holds it.
    pub token: String,
    /// The hash of the rendered config (the pods' `backupmx.io/config-hash`).
    pub config_hash: String,
    /// What a cloud load balancer gave the SMTP Service.
    pub lb_addresses: Vec<IpAddr>,
}

/// What the pods step saw.
pub struct Pods {
    pub pods: Vec<Pod>,
    /// Each pod's queue, read from its admin API.
    pub queues: Vec<PodQueue>,
    /// The StatefulSet's replicas as they are (`spec.replicas` before it exists).
    pub current_replicas: i32,
}

/// Server-side apply of a child the operator owns.
fn owned() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// The objects step: the admin-token Secret, the ConfigMap with `config`, the Services and the
/// NetworkPolicy (an event when it is deleted).
async fn objects(
    bmx: &BackupMx,
    ctx: &Context,
    config: &mx_pod::config::Config,
) -> Result<(Objects, StepOutcome)> {
    let ns = bmx.namespace().ok_or(Error::NoNamespace)?;
    let names = Names::of(bmx);
    let client = &ctx.client;
    let pp = owned();

    // The admin token: made once, then read back and re-applied unchanged.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let existing = secrets
        .get_opt(&names.secret)
        .await
        .map_err(Error::kube(format!("get Secret {}", names.secret)))?;
    let token = existing.as_ref().and_then(token_of);
    if token.is_none() {
        info!(secret = %names.secret, "generating the admin token");
    }
    let token = token.unwrap_or_else(new_token);
    secrets
        .patch(&names.secret, &pp, &Patch::Apply(secret(bmx, &token)))
        .await
        .map_err(Error::kube(format!("apply Secret {}", names.secret)))?;

    let toml = config.to_toml();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.patch(&names.configmap, &pp, &Patch::Apply(configmap(bmx, &toml)))
        .await
        .map_err(Error::kube(format!("apply ConfigMap {}", names.configmap)))?;

    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let mut lb_addresses = Vec::new();
    for svc in [headless_service(bmx), smtp_service(bmx)] {
        let name = svc.name_any();
        let applied = svcs
            .patch(&name, &pp, &Patch::Apply(svc))
            .await
            .map_err(Error::kube(format!("apply Service {name}")))?;
        if name == names.smtp_service {
            lb_addresses = load_balancer_addresses(&applied);
        }
    }

    let deleted = sync_network_policy(bmx, ctx, &ns, &names.network_policy, &pp).await?;
    let objects = Objects {
        token,
        config_hash: config_hash(&toml),
        lb_addresses,
    };
    Ok((objects, StepOutcome::events(deleted)))
}

/// The pods step: the mx-pods and their queues, and the StatefulSet's current replicas (a
/// scale-down waits for the pods it removes to drain).
async fn pods(bmx: &BackupMx, ctx: &Context, objects: &Objects) -> Result<Pods> {
    let ns = bmx.namespace().ok_or(Error::NoNamespace)?;
    let statefulset = Names::of(bmx).statefulset;
    let pods = super::mx_pods(bmx, ctx, &ns).await?;
    let queues = ctx.pods.queues(&pods, Some(&objects.token)).await;
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let current_replicas = sts_api
        .get_opt(&statefulset)
        .await
        .map_err(Error::kube(format!("get StatefulSet {statefulset}")))?
        .and_then(|s| s.spec.replicas)
        .unwrap_or(bmx.spec.replicas);
    Ok(Pods {
        pods,
        queues,
        current_replicas,
    })
}

/// The workload step: the StatefulSet, at the current replicas until the pods above
/// `spec.replicas` are drained (then scaled down, with an event), and the PodDisruptionBudget.
/// Returns the StatefulSet as applied (its status counts the ready pods).
async fn workload(
    bmx: &BackupMx,
    ctx: &Context,
    objects: &Objects,
    pods: &Pods,
    replay: &ReplayOutcome,
) -> Result<(StatefulSet, StepOutcome)> {
    let ns = bmx.namespace().ok_or(Error::NoNamespace)?;
    let names = Names::of(bmx);
    let pp = owned();
    let (current, wanted) = (pods.current_replicas, bmx.spec.replicas);
    let mut outcome = StepOutcome::default();
    let replicas = if current > wanted && !replay.drained {
        current
    } else {
        wanted
    };
    if current > wanted && replay.drained {
        outcome.events.push(Note::normal(
            "ScaledDown",
            format!(
                "pods {wanted}..{} drained (their volumes are kept): scaling down to {wanted}",
                current - 1
            ),
        ));
    }

    let image = bmx.spec.image.as_deref().unwrap_or(&ctx.mxpod_image);
    let mut desired = statefulset(bmx, image, &objects.config_hash, &ctx.caps);
    desired.spec.replicas = Some(replicas);
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sts = sts_api
        .patch(&names.statefulset, &pp, &Patch::Apply(apply_body(&desired)))
        .await
        .map_err(Error::kube(format!(
            "apply StatefulSet {}",
            names.statefulset
        )))?;

    let pdb_api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &ns, &ctx.caps.pdb_resource());
    pdb_api
        .patch(&names.pdb, &pp, &Patch::Apply(pdb(bmx, &ctx.caps)))
        .await
        .map_err(Error::kube(format!(
            "apply PodDisruptionBudget {}",
            names.pdb
        )))?;
    Ok((sts, outcome))
}

/// Applies the pods' NetworkPolicy; with `spec.networkPolicy.enabled: false`, deletes the one
/// this BackupMx owns (an object of that name made by someone else is left alone), and says so
/// in the event it returns.
async fn sync_network_policy(
    bmx: &BackupMx,
    ctx: &Context,
    ns: &str,
    name: &str,
    pp: &PatchParams,
) -> Result<Option<Note>> {
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(policy) = network_policy(bmx, &ctx.operator_namespace) {
        api.patch(name, pp, &Patch::Apply(policy))
            .await
            .map_err(Error::kube(format!("apply NetworkPolicy {name}")))?;
        return Ok(None);
    }
    let Some(existing) = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get NetworkPolicy {name}")))?
    else {
        return Ok(None);
    };
    let ours = existing
        .owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && bmx.uid().as_deref() == Some(r.uid.as_str()));
    if !ours {
        debug!(
            networkpolicy = name,
            "not made by this BackupMx: left alone"
        );
        return Ok(None);
    }
    // the uid precondition: a policy re-created by someone else meanwhile is not deleted
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
        Err(e) => return Err(Error::kube(format!("delete NetworkPolicy {name}"))(e)),
    }
    info!(
        networkpolicy = name,
        "spec.networkPolicy.enabled is false: deleted"
    );
    Ok(Some(Note::normal(
        "NetworkPolicyDeleted",
        format!(
            "spec.networkPolicy.enabled is false: NetworkPolicy {name} deleted; the pods' admin \
             port is reachable from any pod (its /v1 calls still need the token)"
        ),
    )))
}

/// The addresses a cloud load balancer gave the SMTP Service (`status.loadBalancer.ingress`).
fn load_balancer_addresses(svc: &Service) -> Vec<std::net::IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ingress| {
            ingress
                .iter()
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `Ready=False` with `reason`; nothing is applied. An invalid spec waits for a change of the
/// object; a CA bundle can be fixed in its Secret, which the operator does not watch, so that
/// is looked at again after the resync period.
async fn refuse(bmx: &BackupMx, ctx: &Context, reason: &str, message: &str) -> Result<Action> {
    let new = status::refused(bmx, reason, message);
    StepOutcome::events(status::transition(bmx, &new))
        .publish(ctx, bmx)
        .await;
    write_status(bmx, new, ctx).await?;
    Ok(if reason == "InvalidSpec" {
        Action::await_change()
    } else {
        Action::requeue(RESYNC)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::plan::{Policy, Wanted, plan};

    #[test]
    fn an_ipv6_load_balancer_ingress_is_published_as_aaaa() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "example-smtp"},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "2001:db8::25"}, {"ip": "192.0.2.25"}, {"hostname": "lb.example.net"}
            ]}}
        }))
        .unwrap();
        let addresses = load_balancer_addresses(&svc);
        assert_eq!(
            addresses,
            vec![
                "2001:db8::25".parse::<std::net::IpAddr>().unwrap(),
                "192.0.2.25".parse().unwrap()
            ]
        );
        let wanted = Wanted {
            owner: "mail/example".into(),
            domains: vec!["example.com".into()],
            mx_host: "mx2.example.com".into(),
            priority: 20,
            ttl: 300,
            addresses,
            manage_host: true,
            adopt: false,
            policy: Policy::UpsertOnly,
            primary_addresses: vec![],
        };
        let primary_mx = crate::dns::Record::new(
            "example.com",
            300,
            crate::dns::RData::Mx(10, "mail.example.com".into()),
        );
        let added: Vec<String> = plan(&wanted, &[primary_mx])
            .changes
            .add
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert!(
            added.contains(&"mx2.example.com AAAA 2001:db8::25".to_string()),
            "{added:?}"
        );
        assert!(
            added.contains(&"mx2.example.com A 192.0.2.25".to_string()),
            "{added:?}"
        );
    }
}
