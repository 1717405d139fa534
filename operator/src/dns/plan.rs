//! The DNS plan: a pure function from the records found and the records wanted to the changes
//! to make, the refusals that stop them, and the warnings worth telling.
//!
//! # Rules
//! - Only records this BackupMx owns (per [`super::ownership`]) are changed or removed. A wanted
//!   record that already exists unowned is a `Conflict` unless `adopt` (then it is claimed); one
//!   owned by another BackupMx is always a `Conflict`.
//! - The backup's MX goes into the domain's existing MX RRset beside the primary's, with the
//!   RRset's TTL (one RRset has one TTL: changing it would change the primary's records too).
//!   Its priority must be a higher number than every other MX of the domain
//!   (`PriorityNotHigherThanPrimary`); a domain with no other MX is refused (`NoPrimaryMx`):
//!   the backup would become the only MX and take all the mail.
//! - The MX target must not be a CNAME (RFC 2181 10.3): `MxTargetIsAlias`.
//! - Addresses of the MX host that exist unowned and are not wanted: `Conflict` with
//!   `upsert-only`; removed with `sync` (the operator then owns the host name).
//! - Any refusal stops every change of the pass: nothing is half-published.
//!
//! Warnings (published anyway): a priority gap under 10, a TTL over an hour, the backup's
//! address in the same /24 (IPv4) or /48 (IPv6) as the primary's.

use std::net::IpAddr;

use super::{Changes, RData, Record, RecordType, ownership};

/// What to do with unowned records at the MX host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Never delete a record this operator did not create.
    UpsertOnly,
    /// The operator owns the MX host name: unowned addresses there are replaced.
    Sync,
}

/// What one BackupMx wants published.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// `namespace/name`.
    pub owner: String,
    pub domains: Vec<String>,
    pub mx_host: String,
    pub priority: u16,
    pub ttl: u32,
    /// Addresses of the MX host (empty: not known yet).
    pub addresses: Vec<IpAddr>,
    /// Whether the MX host name is in a zone the operator writes (else only the MX is managed).
    pub manage_host: bool,
    pub adopt: bool,
    pub policy: Policy,
    /// Addresses of the primary's MX hosts, for the separation check.
    pub primary_addresses: Vec<IpAddr>,
}

/// A reason not to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Condition reason (PascalCase).
    pub reason: &'static str,
    pub message: String,
}

/// The outcome of planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub changes: Changes,
    pub refusals: Vec<Refusal>,
    pub warnings: Vec<String>,
    /// The records that are (or will be) published for this BackupMx.
    pub published: Vec<Record>,
}

/// Plans the changes given every record `found` at the domains, the MX host and their claim
/// names.
pub fn plan(w: &Wanted, found: &[Record]) -> Plan {
    let mut p = Plan::default();
    if w.addresses.is_empty() && w.manage_host {
        p.refusals.push(Refusal {
            reason: "WaitingForAddress",
            message: format!(
                "no address for {} yet (the LoadBalancer Service has no ingress and spec.mx.addresses is empty)",
                w.mx_host
            ),
        });
        return p;
    }
    if w.ttl > 3600 {
        p.warnings.push(format!(
            "TTL {} s is over an hour: changes (a cutover, removing the backup) take long to reach senders",
            w.ttl
        ));
    }

    // the MX host: not an alias; its addresses
    if found
        .iter()
        .any(|r| r.name == w.mx_host && r.record_type() == RecordType::Cname)
    {
        p.refusals.push(Refusal {
            reason: "MxTargetIsAlias",
            message: format!(
                "{} is a CNAME; an MX must name a host with A/AAAA records (RFC 2181 10.3)",
                w.mx_host
            ),
        });
    }
    if w.manage_host {
        let wanted: Vec<Record> = w
            .addresses
            .iter()
            .map(|a| {
                let data = match a {
                    IpAddr::V4(v4) => RData::A(*v4),
                    IpAddr::V6(v6) => RData::Aaaa(*v6),
                };
                Record::new(&w.mx_host, w.ttl, data)
            })
            .collect();
        for r in &wanted {
            want(w, found, r.clone(), &mut p);
        }
        for r in found.iter().filter(|r| {
            r.name == w.mx_host && matches!(r.record_type(), RecordType::A | RecordType::Aaaa)
        }) {
            if wanted.iter().any(|x| x.same(r)) {
                continue;
            }
            match ownership::owner_of(found, r) {
                Some(o) if o == w.owner => remove_owned(w, r, &mut p),
                Some(o) => p.refusals.push(Refusal {
                    reason: "Conflict",
                    message: format!("{r} belongs to BackupMx {o}"),
                }),
                None if w.policy == Policy::Sync => p.changes.remove.push(r.clone()),
                None => p.refusals.push(Refusal {
                    reason: "Conflict",
                    message: format!(
                        "{r} exists and was not made by this operator; remove it, or set spec.dns.policy: sync to replace it"
                    ),
                }),
            }
        }
    }

    // the MX of each domain, beside the primary's
    for d in &w.domains {
        let mx_set: Vec<&Record> = found
            .iter()
            .filter(|r| &r.name == d && r.record_type() == RecordType::Mx)
            .collect();
        let others: Vec<&Record> = mx_set
            .iter()
            .copied()
            .filter(|r| match &r.data {
                RData::Mx(_, host) => host != &w.mx_host,
                _ => false,
            })
            .collect();
        let primary_pref = others
            .iter()
            .filter_map(|r| match &r.data {
                RData::Mx(p, _) => Some(*p),
                _ => None,
            })
            .min();
        match primary_pref {
            None => p.refusals.push(Refusal {
                reason: "NoPrimaryMx",
                message: format!(
                    "{d} has no MX record for its primary: publishing the backup alone would send all its mail to the backup"
                ),
            }),
            Some(pp) if w.priority <= pp => p.refusals.push(Refusal {
                reason: "PriorityNotHigherThanPrimary",
                message: format!(
                    "{d}: backup MX priority {} must be a higher number than the primary's lowest, {pp}",
                    w.priority
                ),
            }),
            Some(pp) if w.priority - pp < 10 => p.warnings.push(format!(
                "{d}: the gap between the primary's MX priority {pp} and the backup's {} is under 10",
                w.priority
            )),
            Some(_) => {}
        }
        // one RRset, one TTL: use the existing one
        let ttl = mx_set.first().map_or(w.ttl, |r| r.ttl);
        if ttl != w.ttl && !mx_set.is_empty() {
            p.warnings.push(format!(
                "{d}: the MX RRset's TTL is {ttl} s; the backup's MX uses it rather than spec.mx.ttl {}",
                w.ttl
            ));
        }
        let ours = Record::new(d, ttl, RData::Mx(w.priority, w.mx_host.clone()));
        want(w, found, ours.clone(), &mut p);
        // our older MX (another priority) goes
        for r in &mx_set {
            if r.same(&ours) {
                continue;
            }
            if let RData::Mx(_, host) = &r.data
                && host == &w.mx_host
            {
                match ownership::owner_of(found, r) {
                    Some(o) if o == w.owner => remove_owned(w, r, &mut p),
                    Some(o) => p.refusals.push(Refusal {
                        reason: "Conflict",
                        message: format!("{r} belongs to BackupMx {o}"),
                    }),
                    None => p.refusals.push(Refusal {
                        reason: "Conflict",
                        message: format!(
                            "{r} names the backup host but was not made by this operator; remove it first"
                        ),
                    }),
                }
            }
        }
    }

    // separation from the primary
    for ours in &w.addresses {
        for theirs in &w.primary_addresses {
            if same_network(*ours, *theirs) {
                p.warnings.push(format!(
                    "the backup's address {ours} is in the same {} as the primary's {theirs}: an outage of that network takes both down",
                    if ours.is_ipv4() { "/24" } else { "/48" }
                ));
            }
        }
    }

    if !p.refusals.is_empty() {
        p.changes = Changes::default();
    }
    p
}

/// Adds `r` (and its claim) unless it is there; claims it when adopting.
fn want(w: &Wanted, found: &[Record], r: Record, p: &mut Plan) {
    p.published.push(r.clone());
    let exists = found.iter().any(|x| x.same(&r));
    let claim = ownership::claim_record(&w.owner, &r);
    match (exists, ownership::owner_of(found, &r)) {
        (true, Some(o)) if o == w.owner => {}
        (true, Some(o)) => p.refusals.push(Refusal {
            reason: "Conflict",
            message: format!("{r} belongs to BackupMx {o}"),
        }),
        (true, None) if w.adopt => p.changes.add.push(claim),
        (true, None) => p.refusals.push(Refusal {
            reason: "Conflict",
            message: format!(
                "{r} exists but was not made by this operator; set spec.dns.adopt: true to take it over"
            ),
        }),
        (false, owner) => {
            p.changes.add.push(r);
            if owner.is_none() {
                p.changes.add.push(claim);
            }
        }
    }
}

fn remove_owned(w: &Wanted, r: &Record, p: &mut Plan) {
    p.changes.remove.push(r.clone());
    p.changes.remove.push(ownership::claim_record(&w.owner, r));
}

/// The records to remove when the BackupMx is deleted: exactly what it owns.
pub fn cleanup(owner: &str, found: &[Record]) -> Changes {
    let mut c = Changes::default();
    for r in found {
        if r.name.starts_with(&format!("{}.", ownership::PREFIX)) {
            continue;
        }
        if ownership::owner_of(found, r).as_deref() == Some(owner) {
            c.remove.push(r.clone());
            c.remove.push(ownership::claim_record(owner, r));
        }
    }
    c
}

/// Same /24 (IPv4) or /48 (IPv6).
pub fn same_network(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a.octets()[..3] == b.octets()[..3],
        (IpAddr::V6(a), IpAddr::V6(b)) => a.segments()[..3] == b.segments()[..3],
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> Wanted {
        Wanted {
            owner: "mail/example".into(),
            domains: vec!["example.com".into()],
            mx_host: "mx2.example.com".into(),
            priority: 20,
            ttl: 300,
            addresses: vec!["198.51.100.5".parse().unwrap()],
            manage_host: true,
            adopt: false,
            policy: Policy::UpsertOnly,
            primary_addresses: vec!["192.0.2.10".parse().unwrap()],
        }
    }

    fn mx(d: &str, p: u16, h: &str) -> Record {
        Record::new(d, 300, RData::Mx(p, h.into()))
    }

    fn primary() -> Vec<Record> {
        vec![mx("example.com", 10, "mail.example.com")]
    }

    #[test]
    fn first_publication_adds_mx_address_and_claims_leaving_the_primary_alone() {
        let p = plan(&wanted(), &primary());
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        let added: Vec<String> = p.changes.add.iter().map(|r| r.to_string()).collect();
        assert!(
            added.contains(&"mx2.example.com A 198.51.100.5".to_string()),
            "{added:?}"
        );
        assert!(
            added.contains(&"example.com MX 20 mx2.example.com".to_string()),
            "{added:?}"
        );
        assert_eq!(
            p.changes.add.len(),
            4,
            "two records and two claims: {added:?}"
        );
        assert!(p.changes.remove.is_empty());
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn applied_plan_is_stable() {
        let first = plan(&wanted(), &primary());
        let mut now = primary();
        now.extend(first.changes.add.clone());
        let again = plan(&wanted(), &now);
        assert_eq!(again.changes, Changes::default());
        assert!(again.refusals.is_empty());
    }

    #[test]
    fn priority_must_be_higher_than_the_primarys() {
        let mut w = wanted();
        w.priority = 10;
        let p = plan(&w, &primary());
        assert_eq!(p.refusals[0].reason, "PriorityNotHigherThanPrimary");
        assert!(p.changes.is_empty(), "nothing half-published");
        w.priority = 15;
        let p = plan(&w, &primary());
        assert!(p.refusals.is_empty());
        assert!(
            p.warnings.iter().any(|x| x.contains("under 10")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn a_domain_without_a_primary_mx_is_refused() {
        assert_eq!(plan(&wanted(), &[]).refusals[0].reason, "NoPrimaryMx");
    }

    #[test]
    fn unowned_identical_records_conflict_unless_adopted() {
        let mut found = primary();
        found.push(mx("example.com", 20, "mx2.example.com"));
        let p = plan(&wanted(), &found);
        assert_eq!(p.refusals[0].reason, "Conflict");
        let mut w = wanted();
        w.adopt = true;
        let p = plan(&w, &found);
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        assert!(
            p.changes
                .add
                .iter()
                .any(|r| r.name == "_backupmx.example.com")
        );
        assert!(
            !p.changes
                .add
                .iter()
                .any(|r| r.to_string() == "example.com MX 20 mx2.example.com")
        );
    }

    #[test]
    fn records_of_another_backupmx_are_never_taken() {
        let mut found = primary();
        let theirs = mx("example.com", 20, "mx2.example.com");
        found.push(ownership::claim_record("other/backup", &theirs));
        found.push(theirs);
        let mut w = wanted();
        w.adopt = true;
        let p = plan(&w, &found);
        assert_eq!(p.refusals[0].reason, "Conflict");
        assert!(p.refusals[0].message.contains("other/backup"));
    }

    #[test]
    fn a_priority_change_replaces_only_our_old_mx() {
        let old = mx("example.com", 30, "mx2.example.com");
        let mut found = primary();
        found.push(ownership::claim_record("mail/example", &old));
        found.push(old.clone());
        let addr = Record::new(
            "mx2.example.com",
            300,
            RData::A("198.51.100.5".parse().unwrap()),
        );
        found.push(ownership::claim_record("mail/example", &addr));
        found.push(addr);
        let p = plan(&wanted(), &found);
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        assert!(p.changes.remove.contains(&old));
        assert!(
            !p.changes
                .remove
                .iter()
                .any(|r| r.to_string().contains("mail.example.com"))
        );
        assert!(
            p.changes
                .add
                .iter()
                .any(|r| r.to_string() == "example.com MX 20 mx2.example.com")
        );
    }

    #[test]
    fn the_mx_joins_the_rrset_with_its_ttl() {
        let found = vec![Record::new(
            "example.com",
            3600,
            RData::Mx(10, "mail.example.com".into()),
        )];
        let p = plan(&wanted(), &found);
        let ours = p
            .changes
            .add
            .iter()
            .find(|r| r.record_type() == RecordType::Mx)
            .unwrap();
        assert_eq!(ours.ttl, 3600);
        assert!(p.warnings.iter().any(|w| w.contains("TTL is 3600")));
    }

    #[test]
    fn alias_target_and_foreign_addresses_are_refused_and_sync_replaces_them() {
        let mut found = primary();
        found.push(Record::new(
            "mx2.example.com",
            300,
            RData::Cname("elsewhere.example.net".into()),
        ));
        assert_eq!(
            plan(&wanted(), &found).refusals[0].reason,
            "MxTargetIsAlias"
        );

        let mut found = primary();
        let stray = Record::new(
            "mx2.example.com",
            300,
            RData::A("203.0.113.9".parse().unwrap()),
        );
        found.push(stray.clone());
        assert_eq!(plan(&wanted(), &found).refusals[0].reason, "Conflict");
        let mut w = wanted();
        w.policy = Policy::Sync;
        let p = plan(&w, &found);
        assert!(p.refusals.is_empty());
        assert_eq!(p.changes.remove, vec![stray]);
    }

    #[test]
    fn warnings_for_long_ttl_and_shared_network() {
        let mut w = wanted();
        w.ttl = 86400;
        w.primary_addresses = vec!["198.51.100.77".parse().unwrap()];
        let p = plan(&w, &primary());
        assert!(p.warnings.iter().any(|x| x.contains("over an hour")));
        assert!(p.warnings.iter().any(|x| x.contains("/24")));
        assert!(same_network(
            "2001:db8:1::1".parse().unwrap(),
            "2001:db8:1:ffff::2".parse().unwrap()
        ));
        assert!(!same_network(
            "2001:db8:1::1".parse().unwrap(),
            "2001:db8:2::1".parse().unwrap()
        ));
    }

    #[test]
    fn cleanup_removes_exactly_what_we_own() {
        let ours = mx("example.com", 20, "mx2.example.com");
        let theirs = mx("example.org", 20, "mx9.example.org");
        let mut found = primary();
        found.push(ownership::claim_record("mail/example", &ours));
        found.push(ours.clone());
        found.push(ownership::claim_record("other/x", &theirs));
        found.push(theirs);
        let c = cleanup("mail/example", &found);
        assert_eq!(
            c.remove,
            vec![ours.clone(), ownership::claim_record("mail/example", &ours)]
        );
    }

    #[test]
    fn no_address_yet_means_nothing_published() {
        let mut w = wanted();
        w.addresses.clear();
        let p = plan(&w, &primary());
        assert_eq!(p.refusals[0].reason, "WaitingForAddress");
        assert!(p.changes.is_empty());
    }
}
