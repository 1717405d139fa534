//! The apply path: validate, then make every child match the spec, then report status.
//!
//! Order matters only for the first pass: the Secret and ConfigMap exist before the StatefulSet
//! whose pods mount them, and the NetworkPolicy before the pods it fences. Children are applied
//! with `force`: the operator owns them, and a field changed by hand is taken back (that is what
//! reconciling means); the BackupMx status is applied without force.

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{ConfigMap, Pod, Secret, Service},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions},
    runtime::{controller::Action, events::EventType},
};
use tracing::{debug, info};

use super::{
    Context, RESYNC, publish,
    status::{self, Observed, READY},
    write_status,
};
use crate::{
    crd::{BackupMx, ConditionStatus, DrillResult},
    error::{Error, Result},
    render::{
        FIELD_MANAGER, Names,
        config::{config_hash, configmap, mxpod_config},
        network::{headless_service, network_policy, smtp_service},
        secret::{new_token, secret, token_of},
        selector_string,
        workload::{apply_body, pdb, statefulset},
    },
    validate::validate,
};

/// Applies `bmx`'s children and updates its status.
pub async fn apply(bmx: &BackupMx, ctx: &Context) -> Result<Action> {
    let ns = bmx.namespace().ok_or(Error::NoNamespace)?;
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
    let names = Names::of(bmx);
    let client = &ctx.client;
    let pp = PatchParams::apply(FIELD_MANAGER).force();

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

    sync_network_policy(bmx, ctx, &ns, &names.network_policy, &pp).await?;

    // Observe the pods first: a scale-down waits for the pods it removes to drain.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods
        .list(&ListParams::default().labels(&selector_string(bmx)))
        .await
        .map_err(Error::kube("list mx-pods"))?
        .items;
    let queues = ctx.pods.queues(&pods, Some(&token)).await;
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let current_replicas = sts_api
        .get_opt(&names.statefulset)
        .await
        .map_err(Error::kube(format!(
            "get StatefulSet {}",
            names.statefulset
        )))?
        .and_then(|s| s.spec.replicas)
        .unwrap_or(bmx.spec.replicas);
    let hash = config_hash(&toml);
    let replay = super::replay::control(
        bmx,
        &valid,
        ctx,
        &pods,
        &queues,
        Some(&token),
        &hash,
        current_replicas,
        &bundle,
    )
    .await;
    ctx.metrics.replay_state(
        &ns,
        &bmx.name_any(),
        replay.healthy,
        replay.decision.workers,
    );
    let replicas = if current_replicas > bmx.spec.replicas && !replay.drained {
        current_replicas
    } else {
        bmx.spec.replicas
    };
    if current_replicas > bmx.spec.replicas && replay.drained {
        publish(
            ctx,
            bmx,
            EventType::Normal,
            "ScaledDown",
            format!(
                "pods {}..{} drained (their volumes are kept): scaling down to {}",
                bmx.spec.replicas,
                current_replicas - 1,
                bmx.spec.replicas
            ),
        )
        .await;
    }

    let image = bmx.spec.image.as_deref().unwrap_or(&ctx.mxpod_image);
    let mut desired = statefulset(bmx, image, &hash, &ctx.caps);
    desired.spec.replicas = Some(replicas);
    let sts = sts_api
        .patch(&names.statefulset, &pp, &Patch::Apply(apply_body(&desired)))
        .await
        .map_err(Error::kube(format!(
            "apply StatefulSet {}",
            names.statefulset
        )))?;

    let pdb_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &ctx.caps.pdb_resource());
    pdb_api
        .patch(&names.pdb, &pp, &Patch::Apply(pdb(bmx, &ctx.caps)))
        .await
        .map_err(Error::kube(format!(
            "apply PodDisruptionBudget {}",
            names.pdb
        )))?;

    let dns = super::dns::sync(bmx, &lb_addresses, ctx, &bundle.trust).await;
    let mut requeue = RESYNC;
    if let Some(outcome) = &dns {
        for (reason, message, warning) in &outcome.events {
            let t = if *warning {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(ctx, bmx, t, reason, message).await;
        }
        if let Some(r) = outcome.retry {
            requeue = requeue.min(r);
        }
    }
    if let Some(r) = replay.requeue {
        requeue = requeue.min(r);
    }
    if !replay.draining.is_empty() {
        requeue = requeue.min(std::time::Duration::from_secs(2));
    }

    // alerts: each change told once
    let queue = status::queue_status(&queues);
    let disk: Vec<(String, u64)> = queues
        .iter()
        .filter_map(|q| {
            q.result
                .as_ref()
                .ok()
                .map(|s| (q.pod.clone(), s.disk_bytes))
        })
        .collect();
    let before = bmx
        .status
        .as_ref()
        .and_then(|s| s.alerts.clone())
        .unwrap_or_default();
    let now_alerts = super::alerts::state(&valid, replay.healthy, &queue, &disk);
    for alert in super::alerts::changes(
        bmx,
        &before,
        &now_alerts,
        &queue,
        replay.primary.last_error.as_deref(),
        &disk,
    ) {
        let t = if alert.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, bmx, t, alert.reason, &alert.message).await;
        if alert.notify {
            for failure in super::alerts::notify(bmx, &alert, &bundle.trust).await {
                publish(ctx, bmx, EventType::Warning, "AlertNotDelivered", failure).await;
            }
        }
    }

    // the failover drill, if one is asked for
    let drill = super::drill::step(bmx, ctx, &pods, Some(&token), &replay.decision).await;
    if let Some(d) = &drill {
        let was = bmx.status.as_ref().and_then(|s| s.drill.as_ref());
        let changed = was.is_none_or(|w| w.request != d.request || w.result != d.result);
        if changed && d.result != DrillResult::Running {
            let t = if d.result == DrillResult::Passed {
                EventType::Normal
            } else {
                EventType::Warning
            };
            publish(ctx, bmx, t, &format!("Drill{}", d.result), &d.message).await;
        }
        if d.result == DrillResult::Running {
            requeue = requeue.min(std::time::Duration::from_secs(2));
        }
    }

    let seen = Observed {
        replicas: bmx.spec.replicas,
        ready_replicas: sts
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
        queues,
        dns: dns.map(|o| (o.status, o.condition)),
        replay: Some(replay),
        alerts: Some(now_alerts),
        drill,
    };
    let new = status::applied(bmx, &seen);
    announce_transition(bmx, &new, ctx).await;
    write_status(bmx, new, ctx).await?;
    Ok(Action::requeue(requeue.min(
        ctx.dns_resync.max(std::time::Duration::from_secs(1)),
    )))
}

/// Applies the pods' NetworkPolicy; with `spec.networkPolicy.enabled: false`, deletes the one
/// this BackupMx owns (an object of that name made by someone else is left alone).
async fn sync_network_policy(
    bmx: &BackupMx,
    ctx: &Context,
    ns: &str,
    name: &str,
    pp: &PatchParams,
) -> Result<()> {
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(policy) = network_policy(bmx, &ctx.operator_namespace) {
        api.patch(name, pp, &Patch::Apply(policy))
            .await
            .map_err(Error::kube(format!("apply NetworkPolicy {name}")))?;
        return Ok(());
    }
    let Some(existing) = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get NetworkPolicy {name}")))?
    else {
        return Ok(());
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
        return Ok(());
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
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(Error::kube(format!("delete NetworkPolicy {name}"))(e)),
    }
    info!(
        networkpolicy = name,
        "spec.networkPolicy.enabled is false: deleted"
    );
    publish(
        ctx,
        bmx,
        EventType::Normal,
        "NetworkPolicyDeleted",
        format!(
            "spec.networkPolicy.enabled is false: NetworkPolicy {name} deleted; the pods' admin \
             port is reachable from any pod (its /v1 calls still need the token)"
        ),
    )
    .await;
    Ok(())
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
    announce_transition(bmx, &new, ctx).await;
    write_status(bmx, new, ctx).await?;
    Ok(if reason == "InvalidSpec" {
        Action::await_change()
    } else {
        Action::requeue(RESYNC)
    })
}

/// Publishes an event when the Ready condition changes status or reason.
async fn announce_transition(bmx: &BackupMx, new: &crate::crd::BackupMxStatus, ctx: &Context) {
    let Some(now) = new.condition(READY) else {
        return;
    };
    let before = bmx.status.as_ref().and_then(|s| s.condition(READY));
    let changed = before.is_none_or(|b| {
        b.status != now.status
            || b.reason != now.reason
            || ((b.reason == "InvalidSpec" || b.reason == super::trust::CA_BUNDLE_INVALID)
                && b.message != now.message)
    });
    if changed {
        // pods that are still starting are news, not a warning; a refused spec is
        let type_ = if now.status == ConditionStatus::False
            && (now.reason == "InvalidSpec" || now.reason == super::trust::CA_BUNDLE_INVALID)
        {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, bmx, type_, &now.reason, &now.message).await;
    }
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
