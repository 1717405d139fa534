//! Checks of a `BackupMx` spec that the OpenAPI schema cannot express (no CEL, so the CRD works
//! on API servers from 1.20 on): values that must parse, names that must be valid, and rules
//! across fields. A spec that fails is not applied at all: the reconciler sets `Ready=False`
//! with reason `InvalidSpec` and a message listing every problem with its field path.
//!
//! A spec that passes comes back as a [`ValidSpec`]: its durations, sizes and windows parsed
//! once, here, so rendering, replay, alerts and maintenance read typed values and cannot
//! disagree with validation (nor fall back to a default of their own on a bad string).

use std::{net::SocketAddr, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use croner::Cron;
use mx_pod::config::is_domain_name;

use crate::{
    crd::{BackupMxSpec, MaintenanceWindow},
    maintenance::{When, Window},
};

/// The values of a spec that passed [`validate`], parsed. Fields the CRD gives a default hold
/// the parsed field (the default is the CRD's, never repeated here).
#[derive(Debug, Clone)]
pub struct ValidSpec {
    /// `spec.retention`.
    pub retention: Duration,
    /// `spec.delayWarning`.
    pub delay_warning: Duration,
    /// `spec.storage.size` in bytes.
    pub storage_bytes: u64,
    /// `spec.primary.healthCheck`.
    pub health_check: ValidHealthCheck,
    /// `spec.replay`.
    pub replay: ValidReplay,
    /// `spec.maintenanceWindows`, in order.
    pub maintenance_windows: Vec<Window>,
    /// `spec.alerts`.
    pub alerts: ValidAlerts,
    /// `spec.recipients`.
    pub recipients: ValidRecipients,
    /// `spec.filter`.
    pub filter: ValidFilter,
}

/// `spec.primary.healthCheck`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidHealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
}

/// `spec.replay`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidReplay {
    pub ramp_up: Duration,
}

/// `spec.alerts`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidAlerts {
    /// `spec.alerts.queueAgeWarning`; without `spec.alerts`, the CRD's default (the age alert
    /// is an event even with nowhere else to send it).
    pub queue_age_warning: Duration,
}

/// `spec.recipients`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidRecipients {
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
}

/// `spec.filter`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ValidFilter {
    /// `spec.filter.rspamd.timeout`, when rspamd is set.
    pub rspamd_timeout: Option<Duration>,
    /// `spec.filter.resolver`.
    pub resolver: Option<SocketAddr>,
}

/// Every problem found in a spec, each naming its field (`spec.retention: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct InvalidSpec(pub Vec<String>);

/// Parses a humane duration (`30s`, `4h`, `5d`) as mx-pod does.
pub fn duration(field: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<mx_pod::config::HumanDuration>()
        .map(|d| d.0)
        .map_err(|e| format!("{field}: {e}"))
}

/// Parses a Kubernetes storage quantity (`10Gi`, `500M`) into bytes.
pub fn quantity_bytes(value: &str) -> Result<u64, String> {
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (num, suffix) = value.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{value:?} is not a quantity such as \"10Gi\""))?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        other => return Err(format!("{value:?} has an unknown unit {other:?}")),
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{value:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Parses a maintenance window; errors name the field inside the window (`start: ...`).
pub fn window(w: &MaintenanceWindow) -> Result<Window, String> {
    let duration = duration("duration", &w.duration)?;
    let reason = w
        .reason
        .clone()
        .unwrap_or_else(|| "maintenance window".into());
    let when = match (&w.start, &w.schedule) {
        (Some(start), None) => When::Once(
            DateTime::parse_from_rfc3339(start)
                .map_err(|e| format!("start: {start:?} is not an RFC 3339 time: {e}"))?
                .with_timezone(&Utc),
        ),
        (None, Some(schedule)) => {
            let tz: chrono_tz::Tz = w
                .time_zone
                .as_deref()
                .unwrap_or("UTC")
                .parse()
                .map_err(|_| format!("timeZone: {:?} is not an IANA time zone", w.time_zone))?;
            let cron = Cron::from_str(schedule)
                .map_err(|e| format!("schedule: {schedule:?} is not a cron expression: {e}"))?;
            When::Every(Box::new(cron), tz)
        }
        _ => return Err("start: give either start or schedule (one of them)".into()),
    };
    Ok(Window {
        when,
        duration,
        reason,
    })
}

/// Smallest volume mx-pod is given: below this the queue is too small to be useful.
pub const MIN_STORAGE_BYTES: u64 = 64 << 20;

/// A label name or value part: at most 63 characters, alphanumerics with `-`, `_`, `.` inside.
fn label_name(s: &str) -> Result<(), &'static str> {
    let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if s.len() > 63 {
        Err("longer than 63 characters")
    } else if !s.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !s.ends_with(|c: char| c.is_ascii_alphanumeric())
        || !s.chars().all(inner)
    {
        Err("must be alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric")
    } else {
        Ok(())
    }
}

/// A label key as the API server accepts it: `[prefix/]name`, the prefix a DNS subdomain.
pub fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let subdomain = p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !subdomain {
            return Err(format!(
                "prefix {p:?} is not a lowercase DNS subdomain (e.g. example.com)"
            ));
        }
    }
    label_name(name).map_err(|e| format!("name {name:?} {e}"))
}

/// A label value as the API server accepts it (empty, or like a label name).
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    label_name(value).map_err(str::to_string)
}

/// Checks `spec` and parses it in the same pass: its typed values, or every problem found.
pub fn validate(spec: &BackupMxSpec) -> Result<ValidSpec, InvalidSpec> {
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    if spec.domains.is_empty() {
        problems.push("spec.domains: at least one domain is needed".to_string());
    }
    for (i, d) in spec.domains.iter().enumerate() {
        if !is_domain_name(d) || !d.contains('.') {
            problems.push(format!(
                "spec.domains[{i}]: {d:?} is not a valid mail domain (a dotted host name such as example.com)"
            ));
        }
        if !seen.insert(d.to_ascii_lowercase()) {
            problems.push(format!("spec.domains[{i}]: {d:?} is listed twice"));
        }
    }

    let retention = duration("spec.retention", &spec.retention);
    let delay = duration("spec.delayWarning", &spec.delay_warning);
    match (&retention, &delay) {
        (Ok(r), Ok(d)) => {
            if r.is_zero() {
                problems.push("spec.retention: must be more than 0s".into());
            }
            if d > r {
                problems.push(format!(
                    "spec.delayWarning: {} is longer than spec.retention {}; the warning would \
                     come after the bounce",
                    spec.delay_warning, spec.retention
                ));
            }
        }
        _ => {
            problems.extend(retention.clone().err());
            problems.extend(delay.clone().err());
        }
    }

    let hc = &spec.primary.health_check;
    let interval = duration("spec.primary.healthCheck.interval", &hc.interval);
    let timeout = duration("spec.primary.healthCheck.timeout", &hc.timeout);
    match (&interval, &timeout) {
        (Ok(i), Ok(t)) => {
            if i < &Duration::from_secs(1) {
                problems.push("spec.primary.healthCheck.interval: must be at least 1s".into());
            }
            if t.is_zero() || t > i {
                problems.push(format!(
                    "spec.primary.healthCheck.timeout: {} must be more than 0s and at most the \
                     interval {}",
                    hc.timeout, hc.interval
                ));
            }
        }
        _ => {
            problems.extend(interval.clone().err());
            problems.extend(timeout.clone().err());
        }
    }

    let host = spec
        .primary
        .host
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_err() && !is_domain_name(host) {
        problems.push(format!(
            "spec.primary.host: {:?} is neither a host name nor an IP address",
            spec.primary.host
        ));
    }
    if spec.primary.port == 0 {
        problems.push("spec.primary.port: must be 1-65535".into());
    }

    if !is_domain_name(&spec.mx.hostname) || !spec.mx.hostname.contains('.') {
        problems.push(format!(
            "spec.mx.hostname: {:?} is not a fully qualified host name",
            spec.mx.hostname
        ));
    }
    if spec.mx.hostname.eq_ignore_ascii_case(host) {
        problems.push(format!(
            "spec.mx.hostname: {:?} is the primary's own name; the backup MX needs a name of its own",
            spec.mx.hostname
        ));
    }

    let storage_bytes = match quantity_bytes(&spec.storage.size) {
        Ok(b) if b < MIN_STORAGE_BYTES => {
            problems.push(format!(
                "spec.storage.size: {} is smaller than the minimum 64Mi",
                spec.storage.size
            ));
            None
        }
        Ok(b) => Some(b),
        Err(e) => {
            problems.push(format!("spec.storage.size: {e}"));
            None
        }
    };
    if spec.replicas < 1 {
        problems.push("spec.replicas: must be at least 1".into());
    }
    if spec.replay.max_workers == 0 {
        problems.push(
            "spec.replay.maxWorkers: must be at least 1 (use spec.replay.paused to hold mail)"
                .into(),
        );
    }
    let ramp_up = ok(
        &mut problems,
        duration("spec.replay.rampUp", &spec.replay.ramp_up),
    );
    let mut windows = Vec::new();
    for (i, w) in spec.maintenance_windows.iter().enumerate() {
        match window(w) {
            Ok(w) => windows.push(w),
            Err(e) => problems.push(format!("spec.maintenanceWindows[{i}].{e}")),
        }
    }
    let queue_age_warning = match &spec.alerts {
        Some(a) => &a.queue_age_warning,
        None => &crate::crd::default_queue_age_warning(),
    };
    let queue_age_warning = ok(
        &mut problems,
        duration("spec.alerts.queueAgeWarning", queue_age_warning),
    );
    if let Some(a) = &spec.alerts {
        if a.email.is_some() && a.smtp_relay.is_none() {
            problems
                .push("spec.alerts.smtpRelay: needed to send alerts to spec.alerts.email".into());
        }
        if let Some(r) = &a.smtp_relay
            && let Err(e) = mx_pod::config::parse_host_port(r)
        {
            problems.push(format!("spec.alerts.smtpRelay: {e}"));
        }
    }
    let r = &spec.recipients;
    let cache_ttl = ok(
        &mut problems,
        duration("spec.recipients.cacheTtl", &r.cache_ttl),
    );
    let negative_ttl = ok(
        &mut problems,
        duration("spec.recipients.negativeTtl", &r.negative_ttl),
    );
    for (i, a) in r.addresses.iter().enumerate() {
        let domain_ok = a.rsplit_once('@').is_some_and(|(local, d)| {
            !local.is_empty() && spec.domains.iter().any(|x| x.eq_ignore_ascii_case(d))
        });
        if !domain_ok {
            problems.push(format!(
                "spec.recipients.addresses[{i}]: {a:?} is not user@domain or *@domain for one of spec.domains"
            ));
        }
    }
    if r.mode == crate::crd::RecipientMode::List {
        for d in &spec.domains {
            let any = r.addresses.iter().any(|a| {
                a.rsplit_once('@')
                    .is_some_and(|(_, ad)| ad.eq_ignore_ascii_case(d))
            });
            if !any {
                problems.push(format!(
                    "spec.recipients.addresses: mode list but no address for domain {d:?} (use \"*@{d}\" to accept all of it)"
                ));
            }
        }
    }
    let mut filter = ValidFilter::default();
    if let Some(f) = &spec.filter {
        if let Some(r) = &f.rspamd {
            filter.rspamd_timeout = ok(
                &mut problems,
                duration("spec.filter.rspamd.timeout", &r.timeout),
            );
        }
        if let Some(res) = &f.resolver {
            match res.parse::<SocketAddr>() {
                Ok(a) => filter.resolver = Some(a),
                Err(_) => problems.push(format!(
                    "spec.filter.resolver: {res:?} is not ip:port (e.g. \"10.0.0.10:53\")"
                )),
            }
        }
        for (i, z) in f.dnsbl.iter().enumerate() {
            if !is_domain_name(z) {
                problems.push(format!("spec.filter.dnsbl[{i}]: {z:?} is not a DNS zone"));
            }
        }
    }
    for (i, selector) in spec.network_policy.admin_from_namespaces.iter().enumerate() {
        let field = format!("spec.networkPolicy.adminFromNamespaces[{i}]");
        if selector.is_empty() {
            problems.push(format!(
                "{field}: no labels: it would admit every namespace to the admin port; name the \
                 labels of the namespaces to admit"
            ));
        }
        for (k, v) in selector {
            if let Err(e) = label_key(k) {
                problems.push(format!("{field}: label {k:?}: {e}"));
            }
            if let Err(e) = label_value(v) {
                problems.push(format!("{field}: value {v:?} of {k:?}: {e}"));
            }
        }
    }
    for k in spec.pod_labels.keys() {
        if k.starts_with("app.kubernetes.io/") {
            problems.push(format!(
                "spec.podLabels: {k:?} is set by the operator and cannot be overridden"
            ));
        }
    }

    // every value that did not parse left a problem, so all are there when none is
    match (
        retention,
        delay,
        interval,
        timeout,
        storage_bytes,
        ramp_up,
        queue_age_warning,
        cache_ttl,
        negative_ttl,
    ) {
        (
            Ok(retention),
            Ok(delay_warning),
            Ok(interval),
            Ok(timeout),
            Some(storage_bytes),
            Some(ramp_up),
            Some(queue_age_warning),
            Some(cache_ttl),
            Some(negative_ttl),
        ) if problems.is_empty() => Ok(ValidSpec {
            retention,
            delay_warning,
            storage_bytes,
            health_check: ValidHealthCheck { interval, timeout },
            replay: ValidReplay { ramp_up },
            maintenance_windows: windows,
            alerts: ValidAlerts { queue_age_warning },
            recipients: ValidRecipients {
                cache_ttl,
                negative_ttl,
            },
            filter,
        }),
        _ => Err(InvalidSpec(problems)),
    }
}

/// The value, or `None` with its problem recorded.
fn ok<T>(problems: &mut Vec<String>, r: Result<T, String>) -> Option<T> {
    r.map_err(|e| problems.push(e)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::spec;

    #[test]
    fn example_spec_is_valid() {
        assert_eq!(validate(&spec()).err(), None);
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mut s = spec();
        s.retention = "1h".into();
        s.delay_warning = "4h".into();
        s.domains = vec!["example.com".into(), "EXAMPLE.com".into(), "local".into()];
        s.mx.hostname = s.primary.host.to_uppercase();
        s.storage.size = "1Mi".into();
        s.primary.health_check.interval = "5 fortnights".into();
        let err = validate(&s).unwrap_err();
        let text = err.to_string();
        for needle in [
            "spec.delayWarning",
            "spec.domains[1]",
            "spec.domains[2]",
            "spec.mx.hostname",
            "spec.storage.size",
            "spec.primary.healthCheck.interval",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        assert_eq!(err.0.len(), 6, "{text}");
    }

    #[test]
    fn recipient_lists_and_filters_are_checked() {
        let mut s = spec();
        s.recipients = serde_json::from_value(serde_json::json!({
            "mode": "list", "addresses": ["alice@example.com", "bob@elsewhere.test"]
        }))
        .unwrap();
        s.filter = Some(
            serde_json::from_value(
                serde_json::json!({"resolver": "dns-server", "dnsbl": ["bad zone"]}),
            )
            .unwrap(),
        );
        let text = validate(&s).unwrap_err().to_string();
        for needle in [
            "spec.recipients.addresses[1]",
            "no address for domain \"example.org\"",
            "spec.filter.resolver",
            "spec.filter.dnsbl[0]",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
    }

    #[test]
    fn admin_namespace_selectors_must_be_labels_the_api_server_accepts() {
        let mut s = spec();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        s.network_policy.admin_from_namespaces = vec![
            labels(&[("kubernetes.io/metadata.name", "monitoring"), ("team", "")]),
            labels(&[]),
            labels(&[("Bad_Prefix/name", "x")]),
            labels(&[("team", "-ops")]),
            labels(&[(&"k".repeat(64), "x")]),
        ];
        let err = validate(&s).unwrap_err();
        let text = err.to_string();
        for needle in [
            "spec.networkPolicy.adminFromNamespaces[1]: no labels",
            "spec.networkPolicy.adminFromNamespaces[2]: label \"Bad_Prefix/name\"",
            "spec.networkPolicy.adminFromNamespaces[3]: value \"-ops\"",
            "spec.networkPolicy.adminFromNamespaces[4]: label",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        assert_eq!(err.0.len(), 4, "entry 0 is valid: {text}");
    }

    #[test]
    fn every_example_backupmx_passes_validation() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for v in serde_saphyr::from_multiple::<serde_json::Value>(&text).unwrap() {
                if v["kind"] != "BackupMx" {
                    continue;
                }
                let bmx: crate::crd::BackupMx = serde_json::from_value(v).unwrap();
                assert_eq!(validate(&bmx.spec).err(), None, "{}", path.display());
                checked += 1;
            }
        }
        assert!(
            checked >= 6,
            "{checked} BackupMx examples in {}",
            dir.display()
        );
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(quantity_bytes("10Gi"), Ok(10 << 30));
        assert_eq!(quantity_bytes("500M"), Ok(500_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Ok(3 << 29));
        assert!(quantity_bytes("10GB").is_err());
        assert!(quantity_bytes("lots").is_err());
    }

    #[test]
    fn bad_windows_are_explained() {
        let mut w = MaintenanceWindow {
            start: Some("tomorrow".into()),
            schedule: None,
            time_zone: None,
            duration: "2h".into(),
            reason: Some("upgrade".into()),
        };
        assert!(window(&w).unwrap_err().contains("RFC 3339"));
        w.start = None;
        assert!(window(&w).unwrap_err().contains("either start or schedule"));
        w.schedule = Some("every saturday".into());
        assert!(window(&w).unwrap_err().contains("cron"));
        w.schedule = Some("0 2 * * 6".into());
        w.time_zone = Some("Mars/Olympus".into());
        assert!(window(&w).unwrap_err().contains("time zone"));
    }

    #[test]
    fn a_valid_spec_yields_its_values_parsed() {
        let mut s = spec();
        s.retention = "3d".into();
        s.replay.ramp_up = "5m".into();
        s.maintenance_windows = vec![
            MaintenanceWindow {
                start: Some("2026-12-01T02:00:00Z".into()),
                schedule: None,
                time_zone: None,
                duration: "2h".into(),
                reason: None,
            },
            MaintenanceWindow {
                start: None,
                schedule: Some("0 2 * * 6".into()),
                time_zone: Some("Europe/Berlin".into()),
                duration: "30m".into(),
                reason: Some("upgrade".into()),
            },
        ];
        s.filter = Some(
            serde_json::from_value(serde_json::json!({
                "rspamd": {"url": "http://rspamd:11333"}, "resolver": "10.0.0.10:53"
            }))
            .unwrap(),
        );
        let v = validate(&s).unwrap();
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(v.retention, h(72));
        assert_eq!(v.delay_warning, h(4), "the CRD's default, parsed");
        assert_eq!(v.storage_bytes, 1 << 30);
        assert_eq!(
            v.health_check,
            ValidHealthCheck {
                interval: Duration::from_secs(10),
                timeout: Duration::from_secs(5)
            }
        );
        assert_eq!(v.replay.ramp_up, Duration::from_secs(300));
        assert_eq!(
            v.alerts.queue_age_warning,
            h(1),
            "the CRD's default without spec.alerts"
        );
        assert_eq!(
            v.recipients,
            ValidRecipients {
                cache_ttl: h(7 * 24),
                negative_ttl: h(1)
            }
        );
        assert_eq!(v.filter.rspamd_timeout, Some(Duration::from_secs(10)));
        assert_eq!(v.filter.resolver, Some("10.0.0.10:53".parse().unwrap()));
        let [once, every] = &v.maintenance_windows[..] else {
            panic!("two windows: {:?}", v.maintenance_windows)
        };
        assert!(
            matches!(once.when, When::Once(t) if t.to_rfc3339() == "2026-12-01T02:00:00+00:00")
        );
        assert_eq!(
            (once.duration, once.reason.as_str()),
            (h(2), "maintenance window")
        );
        assert!(matches!(
            every.when,
            When::Every(_, chrono_tz::Europe::Berlin)
        ));
        assert_eq!(
            (every.duration, every.reason.as_str()),
            (Duration::from_secs(1800), "upgrade")
        );
    }
}
