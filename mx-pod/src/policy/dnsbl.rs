//! DNS blocklists: the client's IP is looked up in each configured zone (`4.3.2.1.zone` for
//! 1.2.3.4, nibbles for IPv6). An `A` answer in 127.0.0.0/8 means listed: the client is refused
//! at RCPT with `554 5.7.1` naming the list (and its TXT reason when it gives one). Answers are
//! cached by their TTL in the resolver. A lookup that fails (timeout, SERVFAIL, refused) never
//! refuses mail: a broken resolver must not turn the backup MX away from everyone.
//! `127.255.255.x` answers are the lists' error codes (e.g. Spamhaus' "query via public
//! resolver refused"), not listings.

use std::net::IpAddr;

use hickory_resolver::TokioResolver;
use tracing::warn;

use super::Verdict;
use crate::reply::{RejectReason, Reply};

/// Longest TXT reason copied into a reply.
const MAX_TXT: usize = 200;

/// The configured blocklists.
pub struct Dnsbl {
    zones: Vec<String>,
    resolver: TokioResolver,
}

/// The name looked up for `ip` in `zone`.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let reversed = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => return query_name(IpAddr::V4(v4), zone),
            None => v6
                .octets()
                .iter()
                .rev()
                .flat_map(|b| [b & 0x0f, b >> 4])
                .map(|n| format!("{n:x}"))
                .collect::<Vec<_>>()
                .join("."),
        },
    };
    format!("{reversed}.{}.", zone.trim_end_matches('.'))
}

impl Dnsbl {
    pub fn new(zones: Vec<String>, resolver: TokioResolver) -> Self {
        Self { zones, resolver }
    }

    /// Looks `ip` up in every zone (concurrently); the first listing in configured order wins.
    pub async fn check(&self, ip: IpAddr) -> Verdict {
        let lookups = self.zones.iter().map(|zone| self.lookup(ip, zone));
        let results = futures::future::join_all(lookups).await;
        for (zone, listed) in self.zones.iter().zip(results) {
            if let Some(text) = listed {
                let mut reply = format!("Service unavailable; client [{ip}] blocked using {zone}");
                if let Some(t) = text {
                    reply.push_str("; ");
                    reply.push_str(&t);
                }
                return Verdict::RejectWith(
                    RejectReason::Dnsbl,
                    Reply::dynamic(554, "5.7.1", reply),
                );
            }
        }
        Verdict::Accept
    }

    /// `Some(reason text)` when listed in `zone`.
    async fn lookup(&self, ip: IpAddr, zone: &str) -> Option<Option<String>> {
        let name = query_name(ip, zone);
        match self.resolver.ipv4_lookup(name.as_str()).await {
            Ok(answer) => {
                let listed = answer.answers().iter().any(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::A(a) => {
                        let o = a.0.octets();
                        o[0] == 127 && !(o[1] == 255 && o[2] == 255)
                    }
                    _ => false,
                });
                if !listed {
                    return None;
                }
                Some(self.reason(&name).await)
            }
            Err(e) if e.is_no_records_found() => None,
            Err(e) => {
                warn!(client = %ip, zone, error = %e, "DNSBL lookup failed; not refusing on it");
                None
            }
        }
    }

    /// The list's TXT reason for a listing, cleaned for an SMTP reply.
    async fn reason(&self, name: &str) -> Option<String> {
        let txt = self.resolver.txt_lookup(name).await.ok()?;
        let text: String = txt
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                hickory_resolver::proto::rr::RData::TXT(t) => Some(t.to_string()),
                _ => None,
            })
            .next()?
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_TXT)
            .collect();
        (!text.trim().is_empty()).then(|| text.trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names() {
        assert_eq!(
            query_name("192.0.2.10".parse().unwrap(), "zen.spamhaus.org"),
            "10.2.0.192.zen.spamhaus.org."
        );
        assert_eq!(
            query_name("::ffff:192.0.2.10".parse().unwrap(), "bl.test."),
            "10.2.0.192.bl.test."
        );
        let v6 = query_name("2001:db8::1".parse().unwrap(), "bl.test");
        assert!(v6.starts_with("1.0.0.0.0.0.0.0"), "{v6}");
        assert!(v6.ends_with("8.b.d.0.1.0.0.2.bl.test."), "{v6}");
    }
}
