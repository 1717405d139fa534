//! `backupmx-operator check-mx DOMAIN`: checks a domain's MX setup the way a sender sees it —
//! the MX records with priorities and TTL, each target's addresses, whether each answers SMTP
//! (banner, EHLO, STARTTLS) — and warns about what makes a backup MX useless or harmful.
//!
//! Errors (exit status 1): no MX, a target that does not resolve or does not answer SMTP, a
//! target that is an IP address or an alias. Warnings: a single MX (no backup), equal
//! priorities (load sharing, not backup), a priority gap under 10, MX hosts in the same /24 or
//! /48, a TTL over an hour, a target without STARTTLS.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::proto::rr::RData as HRData;
use serde::Serialize;

use crate::dns::{normalize_name, plan::same_network};

/// One MX target as checked.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub priority: u16,
    pub host: String,
    pub addresses: Vec<IpAddr>,
    /// Per address: the banner, or why it did not answer.
    pub smtp: Vec<SmtpCheck>,
}

/// What one address said.
#[derive(Debug, Clone, Serialize)]
pub struct SmtpCheck {
    pub address: IpAddr,
    pub ok: bool,
    /// The banner, or the error.
    pub answer: String,
    pub starttls: bool,
    pub esmtp_features: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub domain: String,
    pub ttl: Option<u32>,
    pub targets: Vec<Target>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let mut out = format!(
            "MX records of {} (TTL {})\n",
            self.domain,
            self.ttl.map_or("-".to_string(), |t| format!("{t} s"))
        );
        out.push_str(&format!(
            "{:<6} {:<32} {:<40} {:<5} {:<8} {}\n",
            "PRIO", "HOST", "ADDRESS", "SMTP", "STARTTLS", "BANNER / ERROR"
        ));
        for t in &self.targets {
            if t.smtp.is_empty() {
                out.push_str(&format!(
                    "{:<6} {:<32} {:<40} {:<5}\n",
                    t.priority, t.host, "-", "-"
                ));
            }
            for s in &t.smtp {
                out.push_str(&format!(
                    "{:<6} {:<32} {:<40} {:<5} {:<8} {}\n",
                    t.priority,
                    t.host,
                    s.address,
                    if s.ok { "ok" } else { "FAIL" },
                    if s.starttls { "yes" } else { "no" },
                    s.answer
                ));
            }
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        for e in &self.errors {
            out.push_str(&format!("error: {e}\n"));
        }
        out.push_str(if self.ok() {
            "result: ok\n"
        } else {
            "result: FAILED\n"
        });
        out
    }
}

/// Checks `domain`, asking `resolver` (the system's when `None`), probing SMTP on `port`.
pub async fn check(
    domain: &str,
    resolver: Option<SocketAddr>,
    port: u16,
    timeout: Duration,
) -> Report {
    let domain = normalize_name(domain);
    let mut report = Report {
        domain: domain.clone(),
        ttl: None,
        targets: Vec::new(),
        warnings: Vec::new(),
        errors: Vec::new(),
    };
    let r = match mx_pod::resolver::resolver(resolver, timeout) {
        Ok(r) => r,
        Err(e) => {
            report.errors.push(e);
            return report;
        }
    };
    let mx = match r.mx_lookup(format!("{domain}.")).await {
        Ok(mx) => mx,
        Err(e) if e.is_no_records_found() => {
            report.errors.push(format!(
                "{domain} has no MX records: senders fall back to its A/AAAA record, and there is no backup"
            ));
            return report;
        }
        Err(e) => {
            report
                .errors
                .push(format!("MX lookup of {domain} failed: {e}"));
            return report;
        }
    };
    let mut records: Vec<(u16, String, u32)> = mx
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            HRData::MX(m) => Some((
                m.preference,
                normalize_name(&m.exchange.to_ascii()),
                rec.ttl,
            )),
            _ => None,
        })
        .collect();
    records.sort();
    report.ttl = records.iter().map(|r| r.2).min();
    if report.ttl.is_some_and(|t| t > 3600) {
        report.warnings.push(format!(
            "MX TTL is {} s: a change (cutover, adding or removing the backup) takes over an hour to reach senders",
            report.ttl.unwrap_or(0)
        ));
    }
    for (priority, host, _) in &records {
        let mut target = Target {
            priority: *priority,
            host: host.clone(),
            addresses: Vec::new(),
            smtp: Vec::new(),
        };
        if host.parse::<IpAddr>().is_ok() {
            report.errors.push(format!(
                "MX {priority} {host} is an IP address; an MX must name a host"
            ));
        }
        if let Ok(c) = r
            .lookup(
                format!("{host}."),
                hickory_resolver::proto::rr::RecordType::CNAME,
            )
            .await
            && c.answers()
                .iter()
                .any(|a| matches!(a.data, HRData::CNAME(_)))
        {
            report.errors.push(format!(
                "MX target {host} is an alias (CNAME), which RFC 2181 forbids"
            ));
        }
        match r.lookup_ip(format!("{host}.")).await {
            Ok(ips) => target.addresses = ips.iter().collect(),
            Err(e) => report
                .errors
                .push(format!("MX target {host} does not resolve: {e}")),
        }
        for ip in target.addresses.clone() {
            let addr = SocketAddr::new(ip, port).to_string();
            let check =
                match mx_pod::probe::probe(&addr, "check-mx.backupmx.invalid", timeout).await {
                    Ok(p) => SmtpCheck {
                        address: ip,
                        ok: true,
                        answer: p.banner.clone(),
                        starttls: p.capabilities.starttls,
                        esmtp_features: p.capabilities.keywords.clone(),
                    },
                    Err(e) => {
                        report.errors.push(format!(
                            "{host} [{ip}] does not answer SMTP on port {port}: {e}"
                        ));
                        SmtpCheck {
                            address: ip,
                            ok: false,
                            answer: e.to_string(),
                            starttls: false,
                            esmtp_features: Vec::new(),
                        }
                    }
                };
            if check.ok && !check.starttls {
                report
                    .warnings
                    .push(format!("{host} [{ip}] does not offer STARTTLS"));
            }
            target.smtp.push(check);
        }
        report.targets.push(target);
    }
    // backup-specific advice
    let prefs: Vec<u16> = records.iter().map(|r| r.0).collect();
    match prefs.as_slice() {
        [] => report
            .errors
            .push(format!("{domain} has no usable MX record")),
        [_] => report.warnings.push(format!(
            "{domain} has a single MX: no backup takes its mail while it is down"
        )),
        _ => {
            let lowest = prefs[0];
            let backups: Vec<&(u16, String, u32)> =
                records.iter().filter(|r| r.0 > lowest).collect();
            if backups.is_empty() {
                report.warnings.push(format!(
                    "every MX of {domain} has priority {lowest}: they share the load, none is a backup"
                ));
            }
            for b in backups {
                if b.0 - lowest < 10 {
                    report.warnings.push(format!(
                        "backup {} has priority {}, less than 10 above the primary's {lowest}",
                        b.1, b.0
                    ));
                }
            }
        }
    }
    let primaries: Vec<&Target> = report
        .targets
        .iter()
        .filter(|t| Some(t.priority) == prefs.first().copied())
        .collect();
    let backups: Vec<&Target> = report
        .targets
        .iter()
        .filter(|t| Some(t.priority) != prefs.first().copied())
        .collect();
    let mut shared = Vec::new();
    for b in &backups {
        for p in &primaries {
            for ba in &b.addresses {
                for pa in &p.addresses {
                    if same_network(*ba, *pa) {
                        shared.push(format!(
                            "backup {} [{ba}] and primary {} [{pa}] are in the same {}: one network outage takes both down",
                            b.host,
                            p.host,
                            if ba.is_ipv4() { "/24" } else { "/48" }
                        ));
                    }
                }
            }
        }
    }
    report.warnings.extend(shared);
    report
}
