//! DNS in the reconcile loop: build the provider from the spec and its Secret, read what is
//! published, plan, apply, verify against the authoritative servers; and on deletion remove
//! exactly the records this BackupMx owns.
//!
//! A sync runs when the spec's generation or the addresses changed, when the last one was not
//! verified, and otherwise every `--dns-resync` (drift repair: a deleted MX is put back, with an
//! event). Provider errors become `DNSReady=False` with the error kind as reason and are retried
//! after the provider's own delay (e.g. `Retry-After`).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use mx_pod::trust::Trust;

use super::{
    Context,
    status::{self, DNS_READY},
    step::{Note, StepOutcome},
};
use crate::{
    crd::{BackupMx, ConditionStatus, DnsPolicy, DnsProviderKind, DnsSpec, DnsStatus},
    dns::{
        Changes, DnsError, DnsProvider, Record, RecordType, cloudflare::Cloudflare, normalize_name,
        ownership, plan, powerdns::PowerDns, rfc2136::Rfc2136, route53::Route53, verify,
    },
};

/// How the provider is chosen: from the spec (production) or a fixed one (tests).
#[derive(Clone, Default)]
pub enum DnsFactory {
    #[default]
    FromSpec,
    Fixed(Arc<dyn DnsProvider>),
}

/// What a DNS pass produced.
pub struct DnsOutcome {
    pub status: DnsStatus,
    pub condition: crate::crd::Condition,
    /// Events to publish.
    pub events: Vec<Note>,
    /// Retry sooner than the usual resync.
    pub retry: Option<Duration>,
}

/// A problem building the provider: reason and message.
type Problem = (&'static str, String);

/// The provider `spec` names, with credentials from its Secret; an HTTPS API is verified
/// against `trust` (the BackupMx's CA bundle and the Mozilla roots).
pub async fn provider(
    bmx: &BackupMx,
    spec: &DnsSpec,
    ctx: &Context,
    trust: &Trust,
) -> Result<Arc<dyn DnsProvider>, Problem> {
    if let DnsFactory::Fixed(p) = &ctx.dns {
        return Ok(p.clone());
    }
    let ns = bmx.namespace().unwrap_or_default();
    let secret = match &spec.credentials_secret_ref {
        Some(r) => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            match api.get_opt(&r.name).await {
                Ok(Some(s)) => Some(s),
                Ok(None) => {
                    return Err((
                        "CredentialsMissing",
                        format!(
                            "Secret {}/{} (spec.dns.credentialsSecretRef) does not exist",
                            ns, r.name
                        ),
                    ));
                }
                Err(e) => {
                    return Err((
                        "CredentialsMissing",
                        format!("cannot read Secret {}: {e}", r.name),
                    ));
                }
            }
        }
        None => None,
    };
    let key = |k: &str| -> Result<String, Problem> {
        secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(k))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                (
                    "CredentialsMissing",
                    format!(
                        "key {k:?} missing from the Secret named in spec.dns.credentialsSecretRef"
                    ),
                )
            })
    };
    let missing = |what: &str| {
        (
            "InvalidSpec",
            format!("spec.dns.{what} is required for this provider"),
        )
    };
    Ok(match spec.provider {
        DnsProviderKind::Powerdns => {
            let p = spec.powerdns.as_ref().ok_or_else(|| missing("powerdns"))?;
            Arc::new(PowerDns::new(&p.url, &p.server_id, &key("apiKey")?, trust))
        }
        DnsProviderKind::Rfc2136 => {
            let p = spec.rfc2136.as_ref().ok_or_else(|| missing("rfc2136"))?;
            let server = p.server.parse().map_err(|_| {
                (
                    "InvalidSpec",
                    format!("spec.dns.rfc2136.server: {:?} is not ip:port", p.server),
                )
            })?;
            Arc::new(
                Rfc2136::new(server, &p.key_name, &p.algorithm, &key("tsigSecret")?)
                    .map_err(|e| ("InvalidSpec", e.to_string()))?,
            )
        }
        DnsProviderKind::Cloudflare => {
            let p = spec.cloudflare.clone().unwrap_or_default();
            Arc::new(Cloudflare::new(
                p.api_url.as_deref(),
                &key("apiToken")?,
                p.zone_id.as_deref(),
                trust,
            ))
        }
        DnsProviderKind::Route53 => {
            let p = spec.route53.as_ref().ok_or_else(|| missing("route53"))?;
            let session = key("sessionToken").ok();
            Arc::new(Route53::new(
                p.endpoint.as_deref(),
                &p.region,
                &p.hosted_zone_id,
                &key("accessKeyId")?,
                &key("secretAccessKey")?,
                session.as_deref(),
                trust,
            ))
        }
    })
}

/// The zone of `name` among the spec's zones (the longest suffix), if any.
pub fn zone_of(spec: &DnsSpec, name: &str) -> Option<String> {
    let name = normalize_name(name);
    std::iter::once(&spec.zone)
        .chain(&spec.additional_zones)
        .map(|z| normalize_name(z))
        .filter(|z| name == *z || name.ends_with(&format!(".{z}")))
        .max_by_key(|z| z.len())
}

/// Everything published at the names this BackupMx manages, per zone.
async fn read(
    provider: &dyn DnsProvider,
    names: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<Record>, DnsError> {
    let mut found = Vec::new();
    for (zone, names) in names {
        for n in names {
            found.extend(provider.records(zone, n).await?);
            found.extend(provider.records(zone, &ownership::claim_name(n)).await?);
        }
    }
    Ok(found)
}

/// The names to read, grouped by zone.
fn names_by_zone(spec: &DnsSpec, bmx: &BackupMx) -> BTreeMap<String, Vec<String>> {
    let mut by_zone: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in bmx
        .spec
        .domains
        .iter()
        .chain(std::iter::once(&bmx.spec.mx.hostname))
    {
        if let Some(z) = zone_of(spec, n) {
            let list = by_zone.entry(z).or_default();
            let n = normalize_name(n);
            if !list.contains(&n) {
                list.push(n);
            }
        }
    }
    by_zone
}

/// Applies `changes`, split by zone.
async fn apply(
    provider: &dyn DnsProvider,
    spec: &DnsSpec,
    changes: &Changes,
) -> Result<(), DnsError> {
    let mut by_zone: BTreeMap<String, Changes> = BTreeMap::new();
    for r in &changes.add {
        if let Some(z) = zone_of(spec, &r.name) {
            by_zone.entry(z).or_default().add.push(r.clone());
        }
    }
    for r in &changes.remove {
        if let Some(z) = zone_of(spec, &r.name) {
            by_zone.entry(z).or_default().remove.push(r.clone());
        }
    }
    for (zone, c) in by_zone {
        provider.apply(&zone, &c).await?;
    }
    Ok(())
}

fn owner(bmx: &BackupMx) -> String {
    format!("{}/{}", bmx.namespace().unwrap_or_default(), bmx.name_any())
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Whether a sync is due (see the module docs).
pub fn due(previous: Option<&DnsStatus>, synced_for: &str, resync: Duration) -> bool {
    let Some(p) = previous else { return true };
    if p.synced_for.as_deref() != Some(synced_for) || !p.verified {
        return true;
    }
    let last = p
        .last_sync
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
    match last {
        Some(t) => {
            Utc::now()
                .signed_duration_since(t)
                .to_std()
                .unwrap_or_default()
                >= resync
        }
        None => true,
    }
}

/// The DNS step of an apply pass: [`sync`]'s status and condition (`None`: the previous ones
/// stand), its events, and its retry as the requeue.
pub async fn step(
    bmx: &BackupMx,
    lb_addresses: &[IpAddr],
    ctx: &Context,
    trust: &Trust,
) -> (Option<(DnsStatus, crate::crd::Condition)>, StepOutcome) {
    match sync(bmx, lb_addresses, ctx, trust).await {
        Some(o) => (
            Some((o.status, o.condition)),
            StepOutcome {
                events: o.events,
                requeue: o.retry,
            },
        ),
        None => (None, StepOutcome::default()),
    }
}

/// One DNS pass for `bmx`, whose LoadBalancer has `lb_addresses`, reaching the provider with
/// `trust`. `None` when the spec asks for no DNS management, or when nothing is due (the
/// previous status stands).
pub async fn sync(
    bmx: &BackupMx,
    lb_addresses: &[IpAddr],
    ctx: &Context,
    trust: &Trust,
) -> Option<DnsOutcome> {
    let spec = bmx.spec.dns.as_ref()?;
    let previous = bmx.status.as_ref().and_then(|s| s.dns.as_ref());
    let mut addresses: Vec<IpAddr> = if bmx.spec.mx.addresses.is_empty() {
        lb_addresses.to_vec()
    } else {
        bmx.spec
            .mx
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    };
    addresses.sort();
    addresses.dedup();
    let synced_for = format!(
        "{}/{}",
        bmx.metadata.generation.unwrap_or(0),
        addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    if !due(previous, &synced_for, ctx.dns_resync) {
        return None;
    }
    let fail = |reason: &str, message: String, retry: Option<Duration>| DnsOutcome {
        status: DnsStatus {
            records: previous.map(|p| p.records.clone()).unwrap_or_default(),
            verified: false,
            last_sync: Some(now()),
            warnings: Vec::new(),
            synced_for: Some(synced_for.clone()),
        },
        condition: status::condition(
            bmx,
            DNS_READY,
            ConditionStatus::False,
            reason,
            message.clone(),
        ),
        events: vec![Note::warning(static_reason(reason), message)],
        retry,
    };
    let provider = match provider(bmx, spec, ctx, trust).await {
        Ok(p) => p,
        Err((reason, message)) => {
            return Some(fail(reason, message, Some(Duration::from_secs(30))));
        }
    };
    let names = names_by_zone(spec, bmx);
    let found = match read(provider.as_ref(), &names).await {
        Ok(f) => f,
        Err(e) => {
            return Some(fail(
                e.kind.reason(),
                e.to_string(),
                Some(e.kind.retry_after()),
            ));
        }
    };
    let mx_host = normalize_name(&bmx.spec.mx.hostname);
    let primary_addresses: Vec<IpAddr> = {
        let hosts: Vec<String> = found
            .iter()
            .filter_map(|r| match &r.data {
                crate::dns::RData::Mx(_, h) if *h != mx_host => Some(h.clone()),
                _ => None,
            })
            .collect();
        found
            .iter()
            .filter(|r| hosts.contains(&r.name))
            .filter_map(|r| match &r.data {
                crate::dns::RData::A(a) => Some(IpAddr::V4(*a)),
                crate::dns::RData::Aaaa(a) => Some(IpAddr::V6(*a)),
                _ => None,
            })
            .collect()
    };
    let wanted = plan::Wanted {
        owner: owner(bmx),
        domains: bmx.spec.domains.iter().map(|d| normalize_name(d)).collect(),
        mx_host: mx_host.clone(),
        priority: bmx.spec.mx.priority,
        ttl: bmx.spec.mx.ttl,
        addresses,
        manage_host: zone_of(spec, &mx_host).is_some(),
        adopt: spec.adopt,
        policy: match spec.policy {
            DnsPolicy::UpsertOnly => plan::Policy::UpsertOnly,
            DnsPolicy::Sync => plan::Policy::Sync,
        },
        primary_addresses,
    };
    let p = plan::plan(&wanted, &found);
    if let Some(first) = p.refusals.first() {
        let message = p
            .refusals
            .iter()
            .map(|r| r.message.clone())
            .collect::<Vec<_>>()
            .join("; ");
        let mut out = fail(first.reason, message, None);
        out.status.warnings = p.warnings.clone();
        return Some(out);
    }
    let mut events = Vec::new();
    let owned_before = previous
        .map(|p| !p.records.is_empty() && p.verified)
        .unwrap_or(false);
    if !p.changes.is_empty() {
        if let Err(e) = apply(provider.as_ref(), spec, &p.changes).await {
            return Some(fail(
                e.kind.reason(),
                e.to_string(),
                Some(e.kind.retry_after()),
            ));
        }
        let reason = if owned_before
            && previous
                .map(|x| x.synced_for.as_deref() == Some(synced_for.as_str()))
                .unwrap_or(false)
        {
            "DriftRepaired"
        } else {
            "DNSUpdated"
        };
        events.push(Note::normal(
            reason,
            format!(
                "added: {}; removed: {}",
                list_but_txt(&p.changes.add),
                list_but_txt(&p.changes.remove)
            ),
        ));
    }
    for w in &p.warnings {
        if !previous.is_some_and(|x| x.warnings.contains(w)) {
            events.push(Note::warning("DNSWarning", w.clone()));
        }
    }
    // verify at the authoritative servers
    let servers: Result<Vec<std::net::SocketAddr>, String> = if spec.nameservers.is_empty() {
        verify::authoritative_servers(&spec.zone, None).await
    } else {
        spec.nameservers
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|_| format!("spec.dns.nameservers: {s:?} is not ip:port"))
            })
            .collect()
    };
    // no servers to ask, or asking them failed: both are a failed verification
    let missing = match servers {
        Ok(servers) => verify::missing(&servers, &p.published).await,
        Err(e) => Err(e),
    };
    let (verified, condition) = match missing {
        Ok(m) if m.is_empty() => (
            true,
            status::condition(
                bmx,
                DNS_READY,
                ConditionStatus::True,
                "Published",
                format!(
                    "{} record(s) published and answered by the authoritative servers",
                    p.published.len()
                ),
            ),
        ),
        Ok(m) => (
            false,
            status::condition(
                bmx,
                DNS_READY,
                ConditionStatus::False,
                "Propagating",
                format!(
                    "not yet answered by the authoritative servers: {}",
                    list(&m.iter().map(|r| r.to_string()).collect::<Vec<_>>())
                ),
            ),
        ),
        Err(e) => (
            false,
            status::condition(
                bmx,
                DNS_READY,
                ConditionStatus::False,
                "VerificationFailed",
                e,
            ),
        ),
    };
    Some(DnsOutcome {
        retry: (!verified).then_some(Duration::from_secs(5)),
        status: DnsStatus {
            records: p.published.iter().map(|r| r.to_string()).collect(),
            verified,
            last_sync: Some(now()),
            warnings: p.warnings,
            synced_for: Some(synced_for),
        },
        condition,
        events,
    })
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// The records of a change as its event lists them: without the ownership TXT records, which
/// only mirror the others.
fn list_but_txt(records: &[Record]) -> String {
    let shown: Vec<String> = records
        .iter()
        .filter(|r| r.record_type() != RecordType::Txt)
        .map(|r| r.to_string())
        .collect();
    list(&shown)
}

/// The event reason for a condition reason: one of the known ones, `DNSError` for any other.
fn static_reason(reason: &str) -> &'static str {
    const KNOWN: [&str; 17] = [
        "CredentialsMissing",
        "InvalidSpec",
        "WaitingForAddress",
        "MxTargetIsAlias",
        "Conflict",
        "NoPrimaryMx",
        "PriorityNotHigherThanPrimary",
        "ProviderAuthFailed",
        "ProviderRateLimited",
        "ZoneNotFound",
        "ProviderUnreachable",
        "ProviderTlsFailed",
        "ProviderRejected",
        "ProviderError",
        "Propagating",
        "VerificationFailed",
        "Published",
    ];
    KNOWN
        .iter()
        .find(|k| **k == reason)
        .copied()
        .unwrap_or("DNSError")
}

/// Removes exactly the records `bmx` owns (deletion), reaching the provider with `trust`.
/// `Err` keeps the finalizer.
pub async fn remove(bmx: &BackupMx, ctx: &Context, trust: &Trust) -> Result<Vec<String>, String> {
    let Some(spec) = bmx.spec.dns.as_ref() else {
        return Ok(Vec::new());
    };
    let provider = provider(bmx, spec, ctx, trust)
        .await
        .map_err(|(r, m)| format!("{r}: {m}"))?;
    let names = names_by_zone(spec, bmx);
    let found = read(provider.as_ref(), &names)
        .await
        .map_err(|e| e.to_string())?;
    let changes = plan::cleanup(&owner(bmx), &found);
    apply(provider.as_ref(), spec, &changes)
        .await
        .map_err(|e| e.to_string())?;
    Ok(changes
        .remove
        .iter()
        .filter(|r| r.record_type() != RecordType::Txt)
        .map(|r| r.to_string())
        .collect())
}
