//! The mx-pod configuration: TOML in, validated [`Config`] out.
//!
//! The operator renders this same struct into a ConfigMap, so the schema cannot drift between
//! the two. Parsing is strict: unknown keys are errors that name the key and its line, and
//! humane values (`30s`, `5d`, `8GiB`) are parsed during deserialization so a bad value is
//! reported with its position too. Checks that span several keys run in [`Config::validate`]
//! and name the key path.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::trust::TlsPolicy;

/// A configuration error, with the position or key path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole mx-pod configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name used in the SMTP banner, EHLO and `Received:` headers.
    pub hostname: String,
    #[serde(default)]
    pub smtp: SmtpConfig,
    pub queue: QueueConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub replay: ReplayConfig,
    #[serde(default)]
    pub dsn: DsnConfig,
    /// Filters run before queueing (rspamd, DNSBL, SPF/DMARC lookups).
    #[serde(default)]
    pub filter: FilterConfig,
    /// What outbound TLS trusts besides the compiled-in Mozilla roots.
    #[serde(default, skip_serializing_if = "is_default")]
    pub trust: TrustConfig,
    /// The domains this backup MX accepts mail for.
    pub domains: Vec<DomainConfig>,
}

/// The least memory `smtp.max_inflight_data` keeps for small messages beside one largest one.
pub const MIN_SMALL_POOL: u64 = 1 << 20;

/// Inbound SMTP settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    /// Largest message accepted, in bytes (advertised with SIZE).
    pub max_message_size: Size,
    /// Memory all message bodies being received may take together (at least
    /// `max_message_size` + 1MiB); sessions beyond it wait, then get `451 4.3.2`. Messages
    /// over 256KiB take a whole `max_message_size` of it each, so
    /// `max_inflight_data / max_message_size` of them are received at once.
    pub max_inflight_data: Size,
    /// Recipients per transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Concurrent SMTP connections; more get `421 4.7.0`.
    pub max_connections: usize,
    /// `Received:` headers beyond this mean a mail loop: `554 5.4.6`.
    pub max_received_headers: usize,
    /// How long one command line may take to arrive, silence included (RFC 5321 4.5.3.2: 5
    /// min); then `421 4.4.2` and the session is closed. A deadline per command, not per read.
    pub idle_timeout: HumanDuration,
    /// How long a client may take to read our replies before the session is closed.
    pub write_timeout: HumanDuration,
    /// How long in-flight sessions may take to finish after SIGTERM.
    pub shutdown_grace: HumanDuration,
    /// How long the whole message after `354` may take to arrive (a deadline for the DATA
    /// transfer, not per read: a trickling client is closed with `421 4.4.2`).
    pub data_timeout: HumanDuration,
    /// Concurrent connections from one client IP; more get `421 4.7.0`.
    pub max_connections_per_ip: usize,
    /// Messages (MAIL commands) per minute from one client IP; more get `451 4.7.1` (0 = no limit).
    pub max_messages_per_minute: u32,
    /// Recipients per minute from one client IP; more get `451 4.7.1` (0 = no limit).
    pub max_recipients_per_minute: u32,
    /// Bad commands in one session after which it is closed (`421 4.7.0`).
    pub max_errors: usize,
    /// Expect a PROXY protocol (v1 or v2) header on every connection, from a load balancer: the
    /// client address it names is the one filters and logs see. Connections without it are closed.
    pub proxy_protocol: bool,
    /// STARTTLS: certificate and key (PEM), re-read when the files change.
    pub tls: Option<TlsConfig>,
}

/// STARTTLS certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "[::]:25".parse().expect("static address"),
                "0.0.0.0:25".parse().expect("static address"),
            ],
            max_message_size: Size(50 * 1024 * 1024),
            max_inflight_data: Size(64 * 1024 * 1024),
            max_recipients: 100,
            max_connections: 1000,
            max_received_headers: 50,
            idle_timeout: HumanDuration(Duration::from_secs(300)),
            write_timeout: HumanDuration(Duration::from_secs(60)),
            shutdown_grace: HumanDuration(Duration::from_secs(60)),
            data_timeout: HumanDuration(Duration::from_secs(600)),
            max_connections_per_ip: 50,
            max_messages_per_minute: 600,
            max_recipients_per_minute: 3000,
            max_errors: 20,
            proxy_protocol: false,
            tls: None,
        }
    }
}

/// Trust anchors of outbound TLS (HTTPS to rspamd, SMTP under `tls_policy = "verify"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// A PEM bundle of CA certificates for a private PKI, trusted besides the Mozilla roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Queue storage settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Directory on the persistent volume; created when missing.
    pub dir: PathBuf,
    /// How long undelivered mail is kept before it is bounced (DSN) to the sender.
    #[serde(default = "default_retention")]
    pub retention: HumanDuration,
    /// After this long undelivered, the sender gets one delay warning (DSN).
    #[serde(default = "default_delay_warning")]
    pub delay_warning: HumanDuration,
    /// Queue size limit; beyond it new mail gets `452 4.3.1`.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: Size,
    /// Size at which the queue log starts a new segment file.
    #[serde(default = "default_segment_size")]
    pub segment_size: Size,
}

fn default_retention() -> HumanDuration {
    HumanDuration(Duration::from_secs(5 * 86400))
}
fn default_delay_warning() -> HumanDuration {
    HumanDuration(Duration::from_secs(4 * 3600))
}
fn default_max_bytes() -> Size {
    Size(8 * 1024 * 1024 * 1024)
}
fn default_segment_size() -> Size {
    Size(64 * 1024 * 1024)
}

/// Admin HTTP API settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// File holding the bearer token required by mutating calls. Without it they are refused.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8025".parse().expect("static address"),
            token_file: None,
        }
    }
}

/// Replay (delivery to the primaries) settings; `workers` and `rate_per_second` change at run time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Concurrent delivery sessions; 0 holds everything.
    pub workers: usize,
    /// Probe the primaries and deliver only while they answer (standalone use).
    pub auto: bool,
    /// Messages per second for the whole pod (token bucket); 0 means unlimited.
    pub rate_per_second: u32,
    /// Messages sent over one SMTP connection before it is closed and reopened.
    pub max_messages_per_connection: usize,
    /// How often `auto` probes the primaries.
    pub probe_interval: HumanDuration,
    /// Connect timeout, and the reply timeout of the commands RFC 5321 sets no time for (EHLO,
    /// STARTTLS, RSET, QUIT); greeting, MAIL, RCPT and DATA wait as long as RFC 5321 4.5.3.2 says.
    pub timeout: HumanDuration,
    /// How long to wait for the reply to the final dot (RFC 5321: 10 minutes). The primary
    /// commits before it answers; giving up sooner makes a duplicate of a slow commit.
    pub final_reply_timeout: HumanDuration,
    /// First retry delay after a temporary failure; doubles up to `max_backoff`.
    pub min_backoff: HumanDuration,
    pub max_backoff: HumanDuration,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            auto: false,
            rate_per_second: 50,
            max_messages_per_connection: 100,
            probe_interval: HumanDuration(Duration::from_secs(5)),
            timeout: HumanDuration(Duration::from_secs(60)),
            final_reply_timeout: HumanDuration(Duration::from_secs(10 * 60)),
            min_backoff: HumanDuration(Duration::from_secs(30)),
            max_backoff: HumanDuration(Duration::from_secs(3600)),
        }
    }
}

/// Where delivery status notifications go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DsnConfig {
    /// Send every DSN through this host:port instead of the sender domain's MX.
    pub relay: Option<String>,
    /// TLS towards the relay or the sender's MX: `none`, `may` (default), `encrypt`, `verify`.
    #[serde(skip_serializing_if = "is_default")]
    pub tls_policy: TlsPolicy,
    /// Resolver (ip:port) for MX lookups of sender domains; the system's when unset.
    pub resolver: Option<SocketAddr>,
}

/// Content and client filters, run before a message is queued.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// DNS server (`ip:port`) for DNSBL and SPF/DMARC lookups; the system's when unset.
    pub resolver: Option<SocketAddr>,
    /// Timeout of one DNS lookup.
    pub dns_timeout: Option<HumanDuration>,
    /// DNS blocklists the client IP is looked up in (e.g. `zen.spamhaus.org`); listed → `554 5.7.1`.
    pub dnsbl: Vec<String>,
    /// rspamd scan of every message before it is queued.
    pub rspamd: Option<RspamdConfig>,
}

impl FilterConfig {
    /// The DNS lookup timeout (default 5s).
    pub fn dns_timeout(&self) -> Duration {
        self.dns_timeout.map_or(Duration::from_secs(5), |d| d.0)
    }
}

/// rspamd settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RspamdConfig {
    /// Base URL of rspamd's normal worker, e.g. `http://rspamd:11333`.
    pub url: String,
    /// How long a scan may take.
    #[serde(default = "default_rspamd_timeout")]
    pub timeout: HumanDuration,
    /// What to do when rspamd cannot answer: `tempfail` (`451 4.7.1`, the sender retries) or `accept`.
    #[serde(default)]
    pub fail_mode: FailMode,
}

fn default_rspamd_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// What a check does when it cannot decide (its backend is unreachable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Answer with a temporary error: the sender retries later.
    #[default]
    Tempfail,
    /// Accept the mail.
    Accept,
}

/// How recipients of a domain are validated at RCPT time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientMode {
    /// Any address in the domain.
    #[default]
    Any,
    /// Only the listed addresses (`user@domain` or `*@domain`).
    List,
    /// Ask the primary (callout: `MAIL FROM:<>`, `RCPT TO:`), cache the answers.
    Verify,
}

/// Recipient validation of one domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecipientsConfig {
    pub mode: RecipientMode,
    /// For `list`: the addresses accepted (`user@domain`, or `*@domain` for all of a domain).
    pub addresses: Vec<String>,
    /// For `verify`: how long the primary's "exists" is remembered.
    pub cache_ttl: HumanDuration,
    /// For `verify`: how long the primary's "no such user" is remembered.
    pub negative_ttl: HumanDuration,
    /// For `verify` while the primary cannot be asked and the address is not cached:
    /// `tempfail` (`450 4.2.0`) or `accept`.
    pub fail_mode: FailMode,
}

impl Default for RecipientsConfig {
    fn default() -> Self {
        Self {
            mode: RecipientMode::Any,
            addresses: Vec::new(),
            cache_ttl: HumanDuration(Duration::from_secs(7 * 86400)),
            negative_ttl: HumanDuration(Duration::from_secs(3600)),
            fail_mode: FailMode::Tempfail,
        }
    }
}

/// SPF/DMARC checking of a domain's incoming mail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No check.
    #[default]
    Off,
    /// Check and record the result in an `Authentication-Results:` header.
    Header,
    /// As `header`, and refuse (`550 5.7.1`) mail that fails DMARC where the sender's domain
    /// publishes `p=reject`.
    Enforce,
}

/// One domain this backup MX serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    /// The domain (stored in its ASCII form: an IDN is converted to punycode).
    pub name: String,
    /// `host:port` of the primary mail server; replay delivers there.
    pub primary: String,
    /// Which recipients are accepted.
    #[serde(default, skip_serializing_if = "is_default")]
    pub recipients: RecipientsConfig,
    /// SPF/DMARC checking.
    #[serde(default, skip_serializing_if = "is_default")]
    pub auth: AuthMode,
    /// TLS towards the primary: `none`, `may` (default: STARTTLS when offered), `encrypt`
    /// (STARTTLS required) or `verify` (required, and the certificate checked against the
    /// primary's host name).
    #[serde(default, skip_serializing_if = "is_default")]
    pub tls_policy: TlsPolicy,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.normalize()?;
        config.validate()?;
        Ok(config)
    }

    /// Renders the configuration as TOML (used by the operator for its ConfigMap).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes")
    }

    /// Converts domain names to their ASCII (punycode) form, so `bücher.example` and
    /// `xn--bcher-kva.example` are the same domain.
    fn normalize(&mut self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        for (i, d) in self.domains.iter_mut().enumerate() {
            match to_ascii_domain(&d.name) {
                Some(a) => d.name = a,
                None => problems.push(format!(
                    "domains[{i}].name: {:?} is not a valid domain name",
                    d.name
                )),
            }
            // a primary named by its U-labels is connected to (and its certificate checked)
            // by its A-labels, the name DNS and certificates carry
            if let Some((host, port)) = d.primary.rsplit_once(':')
                && !host.is_ascii()
                && let Some(a) = to_ascii_domain(host)
            {
                d.primary = format!("{a}:{port}");
            }
            for (j, a) in d.recipients.addresses.iter_mut().enumerate() {
                let normalized = a
                    .rsplit_once('@')
                    .and_then(|(l, dom)| Some(format!("{}@{}", l, to_ascii_domain(dom)?)));
                match normalized {
                    Some(n) => *a = n,
                    None => problems.push(format!(
                        "domains[{i}].recipients.addresses[{j}]: {a:?} is not user@domain or *@domain"
                    )),
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }

    /// Checks that span several keys; every problem found is reported with its key path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if !is_domain_name(&self.hostname) {
            problems.push(format!(
                "hostname: {:?} is not a valid host name",
                self.hostname
            ));
        }
        if self.smtp.listen.is_empty() {
            problems.push("smtp.listen: at least one address is needed".into());
        }
        if self.smtp.max_recipients == 0 {
            problems.push("smtp.max_recipients: must be at least 1".into());
        }
        if self.smtp.max_connections == 0 {
            problems.push("smtp.max_connections: must be at least 1".into());
        }
        if self.smtp.max_message_size.0 < 1024 {
            problems.push("smtp.max_message_size: must be at least 1KiB".into());
        }
        let least = self.smtp.max_message_size.0 + MIN_SMALL_POOL;
        if self.smtp.max_inflight_data.0 < least {
            problems.push(format!(
                "smtp.max_inflight_data: {} is less than smtp.max_message_size {} + 1MiB: the largest message could not be received beside the small ones",
                self.smtp.max_inflight_data, self.smtp.max_message_size
            ));
        }
        if self.queue.delay_warning.0 > self.queue.retention.0 {
            problems.push(format!(
                "queue.delay_warning: {} is longer than queue.retention {}",
                self.queue.delay_warning, self.queue.retention
            ));
        }
        if self.queue.retention.0.is_zero() {
            problems.push("queue.retention: must be more than 0s".into());
        }
        if self.queue.max_bytes.0 == 0 {
            // a limit of nothing refuses every message with 452 4.3.1: never what is meant
            problems
                .push("queue.max_bytes: must be more than 0 (0 would refuse every message)".into());
        }
        if self.queue.segment_size.0 < 64 * 1024 {
            problems.push("queue.segment_size: must be at least 64KiB".into());
        }
        if self.smtp.max_connections_per_ip == 0 {
            problems.push("smtp.max_connections_per_ip: must be at least 1".into());
        }
        if self.smtp.max_errors == 0 {
            problems.push("smtp.max_errors: must be at least 1".into());
        }
        if self.smtp.data_timeout.0 < Duration::from_secs(1) {
            problems.push("smtp.data_timeout: must be at least 1s".into());
        }
        if self.smtp.write_timeout.0 < Duration::from_secs(1) {
            problems.push("smtp.write_timeout: must be at least 1s".into());
        }
        if let Some(r) = &self.filter.rspamd {
            match r.url.parse::<reqwest::Url>() {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => problems.push(format!(
                    "filter.rspamd.url: {:?} is not an http(s) URL",
                    r.url
                )),
            }
        }
        for (i, z) in self.filter.dnsbl.iter().enumerate() {
            if !is_domain_name(z) {
                problems.push(format!("filter.dnsbl[{i}]: {z:?} is not a DNS zone name"));
            }
        }
        if self.replay.max_messages_per_connection == 0 {
            problems.push("replay.max_messages_per_connection: must be at least 1".into());
        }
        if self.replay.final_reply_timeout.0.is_zero() {
            problems.push("replay.final_reply_timeout: must be more than 0s".into());
        }
        if self.replay.min_backoff.0 > self.replay.max_backoff.0 {
            problems.push("replay.min_backoff: longer than replay.max_backoff".into());
        }
        if let Some(relay) = &self.dsn.relay
            && let Err(e) = parse_host_port(relay)
        {
            problems.push(format!("dsn.relay: {e}"));
        }
        if self.domains.is_empty() {
            problems.push("domains: at least one [[domains]] entry is needed".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.domains.iter().enumerate() {
            if !is_domain_name(&d.name) {
                problems.push(format!(
                    "domains[{i}].name: {:?} is not a valid domain name",
                    d.name
                ));
            }
            if !seen.insert(d.name.to_ascii_lowercase()) {
                problems.push(format!("domains[{i}].name: {:?} is listed twice", d.name));
            }
            if let Err(e) = parse_host_port(&d.primary) {
                problems.push(format!("domains[{i}].primary: {e}"));
            }
            if d.recipients.mode == RecipientMode::List && d.recipients.addresses.is_empty() {
                problems.push(format!(
                    "domains[{i}].recipients.addresses: mode \"list\" needs at least one address"
                ));
            }
            for (j, a) in d.recipients.addresses.iter().enumerate() {
                let in_domain = a
                    .rsplit_once('@')
                    .is_some_and(|(l, dom)| !l.is_empty() && dom.eq_ignore_ascii_case(&d.name));
                if !in_domain {
                    problems.push(format!(
                        "domains[{i}].recipients.addresses[{j}]: {a:?} is not an address in {}",
                        d.name
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }

    /// Checks the files the configuration names that must be safe before mx-pod starts (the
    /// admin token's permissions); `serve` and `check-config` both run it.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        if let Some(path) = &self.admin.token_file {
            check_token_file(path).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// The configured domain an address' domain part names (ASCII case-insensitive, exact
    /// otherwise: a trailing dot or an IP literal is not a configured domain).
    pub fn domain(&self, name: &str) -> Option<&DomainConfig> {
        self.domains
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(name))
            .or_else(|| {
                // an internationalized form (SMTPUTF8) of a configured domain
                let ascii = to_ascii_domain(name)?;
                self.domains
                    .iter()
                    .find(|d| d.name.eq_ignore_ascii_case(&ascii))
            })
    }
}

/// The route form of a domain name: its ASCII (A-label, punycode) form in lower case, the one
/// spelling every queue route, hold, metric label, recipient list and admin filter uses; `None`
/// when it is not a valid host name (empty labels, a trailing dot, an IP literal, forbidden
/// characters).
///
/// What SMTP may send: A-labels in any ASCII case (RFC 5321 2.4: domains are case-insensitive),
/// and U-labels (RFC 6531, with `SMTPUTF8`), whose ASCII letters may also be in any case. The
/// UTS 46 mappings (upper-case non-ASCII letters, full-width letters, ideographic full stops)
/// are for user interfaces, not for SMTP: `BÜCHER.example` is no U-label (IDNA2008 disallows
/// upper case), and accepting it would accept addresses the primary then refuses, which means
/// bounces (backscatter). People's spellings go through [`route_from_admin`] instead.
pub fn to_ascii_domain(name: &str) -> Option<String> {
    if name.is_ascii() {
        return is_domain_name(name).then(|| name.to_ascii_lowercase());
    }
    let ascii = idna::domain_to_ascii_strict(name).ok()?;
    let (unicode, result) = idna::domain_to_unicode(&ascii);
    (result.is_ok() && unicode.eq_ignore_ascii_case(name) && is_domain_name(&ascii))
        .then_some(ascii)
}

/// Why a domain given to the admin API or the CLI is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("{0:?} is not a domain name")]
    Invalid(String),
}

/// The route form (see [`to_ascii_domain`]) of a domain as a person types it (admin API,
/// `mx-pod queue --domain`): U-label or A-label in any case, with the UTS 46 mappings people
/// expect from a user interface (`Bücher.Example`, `BÜCHER.example` and `xn--bcher-kva.EXAMPLE`
/// are all `xn--bcher-kva.example`). Normalised once here, at the edge, so a hold, a flush or a
/// listing by any spelling finds the one route the queue keeps.
pub fn route_from_admin(name: &str) -> Result<String, DomainError> {
    let invalid = || DomainError::Invalid(name.to_owned());
    let name = name.trim();
    if name.is_ascii() {
        // an A-label must also decode (xn--zz is no domain)
        let lower = name.to_ascii_lowercase();
        if !is_domain_name(&lower) {
            return Err(invalid());
        }
        let (_, decoded) = idna::domain_to_unicode(&lower);
        return decoded.map(|_| lower).map_err(|_| invalid());
    }
    let ascii = idna::domain_to_ascii(name).map_err(|_| invalid())?;
    if is_domain_name(&ascii) {
        Ok(ascii)
    } else {
        Err(invalid())
    }
}

/// Splits `host:port` (or `[v6]:port`); the port (1-65535) is required, and the host must be a
/// DNS name (LDH labels: no empty label, no space, no underscore), an IPv4 address or a
/// bracketed IPv6 address. A host that could never be connected to is a configuration error at
/// start (like Postfix's `relayhost`), not a delivery failure hours later.
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?} has no valid port (1-65535)"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        return match inner.strip_suffix(']') {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => Ok((v6.to_owned(), port)),
            _ => Err(format!(
                "{s:?}: {host:?} is not a bracketed IPv6 address ([2001:db8::1]:25)"
            )),
        };
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() || is_domain_name(host) {
        return Ok((host.to_owned(), port));
    }
    Err(format!(
        "{s:?}: {host:?} is neither a DNS host name nor an IP address (write IPv6 as [addr]:port)"
    ))
}

/// True for an LDH host name (`a.b.c`), optionally in punycode; no trailing dot, no IP literal.
pub fn is_domain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Why the admin token file is not fit to hold a secret.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("admin.token_file: cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "admin.token_file: {path} has mode {mode:04o}: others may read or change it; make it \
         chmod 600 (or 440 owned by root with a dedicated group, as Kubernetes mounts a Secret)"
    )]
    WorldAccessible { path: PathBuf, mode: u32 },
    #[error(
        "admin.token_file: {path} has mode {mode:04o} and is owned by uid {uid}: its group may \
         read or change it; make it chmod 600 (group-readable only when owned by root, mode 440)"
    )]
    GroupAccessible { path: PathBuf, mode: u32, uid: u32 },
}

/// Checks who may read the admin token file: the token unlocks the queue (personal data) and
/// its controls, so, like ssh with a private key, mx-pod refuses to start when anyone but its
/// owner could read or change it. Allowed: mode `600`/`400` (no group or other bits), or
/// group-readable `440`/`640`-style without group write when the file is owned by root, which
/// is how the kubelet mounts a Secret with `defaultMode: 0440` and the pod's `fsGroup` (root
/// owns the file, the group is the pod's own). World bits are never allowed. Symlinks are
/// followed (a Secret volume's files are symlinks).
#[cfg(unix)]
pub fn check_token_file(path: &std::path::Path) -> Result<(), TokenFileError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|source| TokenFileError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(TokenFileError::WorldAccessible {
            path: path.to_owned(),
            mode,
        });
    }
    let group_ok = mode & 0o070 == 0 || (meta.uid() == 0 && mode & 0o030 == 0);
    if !group_ok {
        return Err(TokenFileError::GroupAccessible {
            path: path.to_owned(),
            mode,
            uid: meta.uid(),
        });
    }
    Ok(())
}

/// A duration written the humane way (`30s`, `4h`, `5d`, `1h 30m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                format!("invalid duration {s:?} ({e}); write e.g. \"30s\", \"4h\", \"5d\"")
            })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A byte size: a plain integer or a string with a unit (`512KiB`, `50MiB`, `8GiB`, `1GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}; write e.g. \"52428800\", \"50MiB\", \"8GiB\"")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}; use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (unit, mult) in UNITS {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
hostname = "mx2.example.com"
[queue]
dir = "/tmp/q"
[[domains]]
name = "example.com"
primary = "mail.example.com:25"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        assert_eq!(c.queue.retention.0, Duration::from_secs(5 * 86400));
        assert_eq!(c.queue.max_bytes, Size(8 << 30));
        assert_eq!(c.replay.workers, 0);
        assert_eq!(c.replay.final_reply_timeout.0, Duration::from_secs(600));
        assert_eq!(c.smtp.max_message_size, Size(52428800));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = MINIMAL.replace("[queue]\n", "[queue]\nretension = \"5d\"\n");
        let err = Config::parse(&text, "mx-pod.toml").unwrap_err().to_string();
        assert!(err.contains("retension"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn bad_duration_names_value_and_line() {
        let text = MINIMAL.replace("[queue]\n", "[queue]\nretention = \"5 fortnights\"\n");
        let err = Config::parse(&text, "mx-pod.toml").unwrap_err().to_string();
        assert!(err.contains("5 fortnights"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!("8GiB".parse::<Size>().unwrap(), Size(8 << 30));
        assert_eq!("512 KiB".parse::<Size>().unwrap(), Size(512 << 10));
        assert_eq!("1MB".parse::<Size>().unwrap(), Size(1_000_000));
        assert!("8 gigs".parse::<Size>().is_err());
        assert_eq!(Size(8 << 30).to_string(), "8GiB");
    }

    #[test]
    fn cross_key_checks_report_every_problem() {
        let text = MINIMAL
            .replace(
                "[queue]\n",
                "[queue]\nretention = \"1h\"\ndelay_warning = \"4h\"\n",
            )
            .replace("mail.example.com:25", "mail.example.com");
        let err = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(err.contains("queue.delay_warning"), "{err}");
        assert!(err.contains("domains[0].primary"), "{err}");
    }

    #[test]
    fn renders_back_to_equal_config() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        let again = Config::parse(&c.to_toml(), "rendered").unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn an_idn_is_one_route_in_every_spelling() {
        let text = MINIMAL.replace("\"example.com\"", "\"Bücher.example\"");
        let c = Config::parse(&text, "t").unwrap();
        assert_eq!(c.domains[0].name, "xn--bcher-kva.example");
        for spelling in [
            "bücher.example",
            "Bücher.EXAMPLE",
            "xn--bcher-kva.example",
            "XN--BCHER-KVA.Example",
        ] {
            assert_eq!(
                c.domain(spelling).map(|d| d.name.as_str()),
                Some("xn--bcher-kva.example"),
                "{spelling}"
            );
            assert_eq!(
                route_from_admin(spelling).as_deref(),
                Ok("xn--bcher-kva.example")
            );
        }
        // SMTP takes U-labels only; a person may type the upper-case form
        assert_eq!(c.domain("BÜCHER.example"), None);
        assert_eq!(
            route_from_admin("BÜCHER.example").as_deref(),
            Ok("xn--bcher-kva.example")
        );
        for bad in [
            "",
            "a..b",
            "exa mple.test",
            "xn--zz.example",
            "_dsn",
            "a.b.",
        ] {
            assert!(route_from_admin(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn impossible_primary_hosts_are_refused() {
        for bad in [
            "mail..example.com:25",
            ":25",
            "mail example.com:25",
            "mail_1.example.com:25",
            "mail.example.com.:25",
            "mail.example.com:0",
            "mail.example.com:",
            "::1:25",
            "[mail.example.com]:25",
            "[::1:25",
        ] {
            let text = MINIMAL.replace("mail.example.com:25", bad);
            let err = Config::parse(&text, "t").unwrap_err().to_string();
            assert!(err.contains("domains[0].primary"), "{bad}: {err}");
        }
        for good in [
            "127.0.0.1:25",
            "[::1]:2525",
            "mail-1.example.com:587",
            "localhost:25",
        ] {
            let text = MINIMAL.replace("mail.example.com:25", good);
            assert!(Config::parse(&text, "t").is_ok(), "{good}");
        }
        let text = MINIMAL.replace("mail.example.com:25", "mail.bücher.example:25");
        let c = Config::parse(&text, "t").unwrap();
        assert_eq!(c.domains[0].primary, "mail.xn--bcher-kva.example:25");
    }

    #[test]
    fn max_bytes_zero_is_refused() {
        let text = MINIMAL.replace("[queue]\n", "[queue]\nmax_bytes = 0\n");
        let err = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(err.contains("queue.max_bytes"), "{err}");
    }

    #[test]
    fn token_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mode = |m: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
            check_token_file(&path)
        };
        assert!(mode(0o600).is_ok());
        assert!(mode(0o400).is_ok());
        for world in [0o604, 0o644, 0o602, 0o601] {
            assert!(
                matches!(mode(world), Err(TokenFileError::WorldAccessible { .. })),
                "{world:o}"
            );
        }
        // group write is never allowed; group read only for a file owned by root
        assert!(matches!(
            mode(0o660),
            Err(TokenFileError::GroupAccessible { .. })
        ));
        let root = nix_uid() == 0;
        assert_eq!(mode(0o640).is_ok(), root);
        assert_eq!(mode(0o440).is_ok(), root);
        assert!(matches!(
            check_token_file(&dir.path().join("missing")),
            Err(TokenFileError::Unreadable { .. })
        ));
    }

    /// The owner of a file this process creates: its effective uid.
    fn nix_uid() -> u32 {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::metadata(dir.path()).unwrap().uid()
    }

    #[test]
    fn domain_lookup_ignores_case_only() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        assert!(c.domain("EXAMPLE.com").is_some());
        assert!(c.domain("example.com.").is_none());
        assert!(c.domain("example.org").is_none());
    }
}
