//! Publishing the backup MX in DNS, like external-dns but for MX records, in three layers:
//!
//! - [`DnsProvider`]: one per DNS service ([`powerdns`], [`rfc2136`], [`cloudflare`],
//!   [`route53`], and [`inmemory`] for tests): read the records of a name, apply a change set
//!   (single records added to or removed from their RRsets, atomically where the service can).
//! - [`ownership`]: every record the operator creates gets a TXT record beside it
//!   (`_backupmx.NAME`, value `heritage=backupmx,v=1,owner=NS/NAME,...`), so it changes and
//!   deletes only what it created. Ownership is per record, not per RRset, because the backup's
//!   MX shares its RRset with the primary's.
//! - [`plan`]: a pure function from the records found and the records wanted to the changes,
//!   refusing what is unsafe (a priority not higher than the primary's, a record someone else
//!   owns) and warning about what is risky.
//!
//! [`verify`] then queries the zone's authoritative servers until the records are visible.
//! [`txt`] holds the one rule for cutting TXT text into character-strings.
//!
//! # Why not the `dns-update` crate
//!
//! Stalwart's `dns-update` (0.6, checked 2026-12) covers RFC 2136 and many HTTP APIs, PowerDNS,
//! Route 53 and Cloudflare among them, but not what this module needs:
//! - one atomic change over several RRsets (the MX, the host's addresses and their ownership
//!   TXT records together); its calls change one RRset each;
//! - reading records with their TTL (its `list_rrset` returns data only): an RRset has one TTL,
//!   and an added MX must take the primary's ([`rfc2136::keep_rrset_ttls`]);
//! - our HTTPS client: it builds its own `reqwest::Client`, so `spec.caBundle` cannot be added
//!   to the trust, and its `ring` feature switches reqwest to native-tls (OpenSSL);
//! - error kinds for the conditions (`Tls`, `Auth`, `ZoneNotFound`, `RateLimited` with
//!   `Retry-After`): it sleeps and retries 429/503 itself, inside our reconcile pass.
//!
//! Ownership TXT records, the plan and the checks at the authoritative servers ([`verify`])
//! are ours either way, so the crate would only replace the four thin clients.

pub mod cloudflare;
mod http;
pub mod inmemory;
pub mod ownership;
pub mod plan;
pub mod powerdns;
pub mod rfc2136;
pub mod route53;
#[cfg(test)]
mod test_fixtures;
pub mod txt;
pub mod verify;

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

/// Record types the operator reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordType {
    A,
    Aaaa,
    Mx,
    Txt,
    Cname,
}

impl RecordType {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::A => "A",
            RecordType::Aaaa => "AAAA",
            RecordType::Mx => "MX",
            RecordType::Txt => "TXT",
            RecordType::Cname => "CNAME",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "A" => RecordType::A,
            "AAAA" => RecordType::Aaaa,
            "MX" => RecordType::Mx,
            "TXT" => RecordType::Txt,
            "CNAME" => RecordType::Cname,
            _ => return None,
        })
    }

    /// Every type, in the order names are read.
    pub const ALL: [RecordType; 5] = [
        RecordType::Mx,
        RecordType::A,
        RecordType::Aaaa,
        RecordType::Txt,
        RecordType::Cname,
    ];
}

/// The data of one record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// Preference and exchange (a host name, lower case, without the trailing dot).
    Mx(u16, String),
    /// The text (the character-strings joined).
    Txt(String),
    Cname(String),
}

impl RData {
    pub fn record_type(&self) -> RecordType {
        match self {
            RData::A(_) => RecordType::A,
            RData::Aaaa(_) => RecordType::Aaaa,
            RData::Mx(..) => RecordType::Mx,
            RData::Txt(_) => RecordType::Txt,
            RData::Cname(_) => RecordType::Cname,
        }
    }

    /// Zone-file presentation (`20 mx2.example.com.`, `"text"`; TXT cut as [`txt::split`]).
    pub fn presentation(&self) -> String {
        match self {
            RData::A(a) => a.to_string(),
            RData::Aaaa(a) => a.to_string(),
            RData::Mx(p, host) => format!("{p} {host}."),
            RData::Txt(t) => txt::presentation(t),
            RData::Cname(host) => format!("{host}."),
        }
    }

    /// Parses the presentation form of `rtype`'s data.
    pub fn parse(rtype: RecordType, text: &str) -> Option<Self> {
        let text = text.trim();
        Some(match rtype {
            RecordType::A => RData::A(text.parse().ok()?),
            RecordType::Aaaa => RData::Aaaa(text.parse().ok()?),
            RecordType::Mx => {
                let (p, host) = text.split_once(char::is_whitespace)?;
                RData::Mx(p.parse().ok()?, normalize_name(host))
            }
            RecordType::Txt => RData::Txt(txt::unquote(text)),
            RecordType::Cname => RData::Cname(normalize_name(text)),
        })
    }
}

/// Lower case, without the trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// One DNS record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Record {
    /// Owner name, lower case, without the trailing dot.
    pub name: String,
    pub ttl: u32,
    pub data: RData,
}

impl Record {
    pub fn new(name: &str, ttl: u32, data: RData) -> Self {
        Self {
            name: normalize_name(name),
            ttl,
            data,
        }
    }

    pub fn record_type(&self) -> RecordType {
        self.data.record_type()
    }

    /// Same name, type and data (the TTL aside).
    pub fn same(&self, other: &Record) -> bool {
        self.name == other.name && self.data == other.data
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.name,
            self.record_type().as_str(),
            self.data.presentation().trim_end_matches('.')
        )
    }
}

/// Records to add to and remove from their RRsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub add: Vec<Record>,
    pub remove: Vec<Record>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Every name touched.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .add
            .iter()
            .chain(&self.remove)
            .map(|r| r.name.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Why a provider call failed; the kind decides the retry and the condition reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{provider}: {message}")]
pub struct DnsError {
    pub provider: &'static str,
    pub kind: DnsErrorKind,
    pub message: String,
}

/// Kinds of provider failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsErrorKind {
    /// Credentials refused (401/403, TSIG BADSIG/BADKEY/REFUSED).
    Auth,
    /// Too many requests; retry after this long.
    RateLimited(Option<Duration>),
    /// The zone does not exist at the provider.
    ZoneNotFound,
    /// The provider could not be reached or timed out.
    Unreachable,
    /// The TLS handshake with the provider's API failed, most often its certificate: not
    /// issued by a CA the trust holds (the Mozilla roots and `spec.caBundle`), or not for the
    /// host name the URL names. Certificates are always verified.
    Tls,
    /// The provider refused the change (bad data, conflict on its side).
    Rejected,
    /// An answer we could not understand.
    Protocol,
}

impl DnsErrorKind {
    /// Condition reason (PascalCase) for `DNSReady=False`.
    pub fn reason(self) -> &'static str {
        match self {
            DnsErrorKind::Auth => "ProviderAuthFailed",
            DnsErrorKind::RateLimited(_) => "ProviderRateLimited",
            DnsErrorKind::ZoneNotFound => "ZoneNotFound",
            DnsErrorKind::Unreachable => "ProviderUnreachable",
            DnsErrorKind::Tls => "ProviderTlsFailed",
            DnsErrorKind::Rejected => "ProviderRejected",
            DnsErrorKind::Protocol => "ProviderError",
        }
    }

    /// When to try again.
    pub fn retry_after(self) -> Duration {
        match self {
            DnsErrorKind::RateLimited(Some(d)) => d.max(Duration::from_secs(1)),
            DnsErrorKind::RateLimited(None) => Duration::from_secs(30),
            // a person must act (credentials, the zone, the CA bundle or the certificate)
            DnsErrorKind::Auth | DnsErrorKind::ZoneNotFound | DnsErrorKind::Tls => {
                Duration::from_secs(60)
            }
            _ => Duration::from_secs(10),
        }
    }
}

impl DnsError {
    pub fn new(provider: &'static str, kind: DnsErrorKind, message: impl Into<String>) -> Self {
        Self {
            provider,
            kind,
            message: message.into(),
        }
    }

    /// Maps an HTTP status (and `Retry-After`) to a kind.
    pub fn from_http(
        provider: &'static str,
        status: u16,
        retry_after: Option<&str>,
        body: &str,
        what: &str,
    ) -> Self {
        let kind = match status {
            401 | 403 => DnsErrorKind::Auth,
            404 => DnsErrorKind::ZoneNotFound,
            429 => DnsErrorKind::RateLimited(
                retry_after
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map(Duration::from_secs),
            ),
            500..=599 => DnsErrorKind::Unreachable,
            _ => DnsErrorKind::Rejected,
        };
        let body: String = body.chars().take(300).collect();
        Self::new(
            provider,
            kind,
            format!("{what}: HTTP {status}: {}", body.trim()),
        )
    }

    /// Maps a transport error: [`DnsErrorKind::Tls`] when TLS failed, else
    /// [`DnsErrorKind::Unreachable`]. The message carries the whole cause chain (reqwest keeps
    /// "invalid peer certificate: UnknownIssuer" or "Connection refused" in its sources); the
    /// URL is left out when `what` already names it.
    pub fn transport(provider: &'static str, what: &str, e: reqwest::Error) -> Self {
        let e = if e.url().is_some_and(|u| what.contains(u.as_str())) {
            e.without_url()
        } else {
            e
        };
        let cause = mx_pod::trust::error_chain(&e);
        if mx_pod::trust::is_tls_error(&e) {
            Self::new(
                provider,
                DnsErrorKind::Tls,
                format!(
                    "{what}: TLS failed: {cause} (is the API's certificate issued by a CA in \
                     spec.caBundle, for the host name of its URL?)"
                ),
            )
        } else {
            Self::new(
                provider,
                DnsErrorKind::Unreachable,
                format!("{what}: {cause}"),
            )
        }
    }
}

/// A DNS service the operator writes to.
#[async_trait::async_trait]
pub trait DnsProvider: Send + Sync {
    /// The provider's name, for messages.
    fn name(&self) -> &'static str;

    /// Every record (of the [`RecordType::ALL`] types) at `name` in `zone`.
    async fn records(&self, zone: &str, name: &str) -> Result<Vec<Record>, DnsError>;

    /// Adds and removes single records, leaving the other members of their RRsets alone;
    /// atomically where the service allows it.
    async fn apply(&self, zone: &str, changes: &Changes) -> Result<(), DnsError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presentation_round_trips() {
        for (t, text) in [
            (RecordType::Mx, "20 mx2.example.com."),
            (RecordType::A, "192.0.2.5"),
            (RecordType::Aaaa, "2001:db8::5"),
            (RecordType::Txt, "\"heritage=backupmx,v=1\""),
            (RecordType::Cname, "host.example.com."),
        ] {
            let d = RData::parse(t, text).unwrap();
            assert_eq!(d.presentation(), text);
            assert_eq!(d.record_type(), t);
        }
        assert_eq!(
            Record::new("Example.COM.", 300, RData::Mx(20, "mx2.example.com".into())).to_string(),
            "example.com MX 20 mx2.example.com"
        );
    }
}
