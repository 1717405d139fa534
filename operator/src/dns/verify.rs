//! Verification: the published records, asked of the zone's authoritative servers directly
//! (not a cache), so `verified` means senders' resolvers will find them once old answers expire.

use std::{net::SocketAddr, time::Duration};

use hickory_resolver::proto::rr::RData as HRData;

use super::{RData, Record, RecordType};

/// Timeout of each query.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The authoritative servers of `zone`: its NS records looked up with `resolver` (the system's
/// when `None`), and their addresses, port 53.
pub async fn authoritative_servers(
    zone: &str,
    resolver: Option<SocketAddr>,
) -> Result<Vec<SocketAddr>, String> {
    let r = mx_pod::resolver::resolver(resolver, TIMEOUT)?;
    let ns = r
        .ns_lookup(format!("{}.", zone.trim_end_matches('.')))
        .await
        .map_err(|e| format!("NS lookup of {zone}: {e}"))?;
    let mut out = Vec::new();
    for rec in ns.answers() {
        if let HRData::NS(n) = &rec.data
            && let Ok(ips) = r.lookup_ip(n.0.to_ascii()).await
        {
            out.extend(ips.iter().map(|ip| SocketAddr::new(ip, 53)));
        }
    }
    if out.is_empty() {
        return Err(format!("no address for the name servers of {zone}"));
    }
    Ok(out)
}

/// The records of `wanted` that some server in `servers` does not (yet) answer with.
pub async fn missing(servers: &[SocketAddr], wanted: &[Record]) -> Result<Vec<Record>, String> {
    let mut missing = Vec::new();
    for server in servers {
        // a new resolver per check: nothing cached from an earlier one
        let r = mx_pod::resolver::resolver(Some(*server), TIMEOUT)?;
        for w in wanted {
            let name = format!("{}.", w.name);
            let seen: Vec<RData> = match w.record_type() {
                RecordType::Mx => match r.mx_lookup(name.as_str()).await {
                    Ok(l) => l
                        .answers()
                        .iter()
                        .filter_map(|a| match &a.data {
                            HRData::MX(m) => Some(RData::Mx(
                                m.preference,
                                super::normalize_name(&m.exchange.to_ascii()),
                            )),
                            _ => None,
                        })
                        .collect(),
                    Err(_) => Vec::new(),
                },
                RecordType::A => match r.ipv4_lookup(name.as_str()).await {
                    Ok(l) => l
                        .answers()
                        .iter()
                        .filter_map(|a| match &a.data {
                            HRData::A(v) => Some(RData::A(v.0)),
                            _ => None,
                        })
                        .collect(),
                    Err(_) => Vec::new(),
                },
                RecordType::Aaaa => match r.ipv6_lookup(name.as_str()).await {
                    Ok(l) => l
                        .answers()
                        .iter()
                        .filter_map(|a| match &a.data {
                            HRData::AAAA(v) => Some(RData::Aaaa(v.0)),
                            _ => None,
                        })
                        .collect(),
                    Err(_) => Vec::new(),
                },
                _ => continue,
            };
            if !seen.contains(&w.data) && !missing.contains(w) {
                missing.push(w.clone());
            }
        }
    }
    Ok(missing)
}
