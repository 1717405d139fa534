//! The `BackupMx` custom resource (`backupmx.io/v1alpha1`): what a user declares and what the
//! operator reports back.
//!
//! The schema is generated from these types (`backupmx-operator crdgen`, checked into
//! `crds/backupmx.yaml`). It validates what OpenAPI can say (patterns, ranges, enums, required
//! fields, defaults) and nothing that needs CEL, so it works on API servers from 1.20 on; checks
//! across fields live in [`crate::validate`]. Every field carries a doc comment, which becomes
//! its `kubectl explain` text.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A duration in the humane form mx-pod understands: `30s`, `10m`, `4h`, `5d`, or combined (`1h30m`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d|w))+$";
/// An RFC 1123 host name (letters, digits, hyphens; dot-separated labels; no trailing dot).
pub const HOSTNAME_PATTERN: &str = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";
/// A Kubernetes resource quantity for storage (`10Gi`, `500Mi`, `1T`).
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// A set of backup MX servers for one or more mail domains.
///
/// The operator runs `replicas` mx-pod queue servers as a StatefulSet on persistent volumes.
/// They accept mail for `domains` while the primary is unreachable, keep it durably, and replay
/// it to `primary` in arrival order, throttled, once the primary answers again.
// clippy takes the repeated `type_ = ...` of the printer columns for duplicated attributes
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "backupmx.io",
    version = "v1alpha1",
    kind = "BackupMx",
    plural = "backupmxes",
    shortname = "bmx",
    category = "mail",
    doc = "BackupMx runs backup MX servers for mail domains: it queues their mail durably while the primary mail server is down and replays it, in order and throttled, when the primary is back.",
    namespaced,
    status = "BackupMxStatus",
    printcolumn(
        name = "Domains",
        type_ = "string",
        json_path = ".spec.domains",
        description = "mail domains served"
    ),
    printcolumn(
        name = "Primary",
        type_ = "string",
        json_path = ".spec.primary.host",
        description = "the primary mail server"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "all pods ready and serving"
    ),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "ready mx-pods"
    ),
    printcolumn(
        name = "Queued",
        type_ = "integer",
        json_path = ".status.queue.messages",
        description = "messages waiting for the primary"
    ),
    printcolumn(
        name = "Oldest-s",
        type_ = "integer",
        json_path = ".status.queue.oldestAgeSeconds",
        description = "age in seconds of the oldest queued message"
    ),
    printcolumn(
        name = "Workers",
        type_ = "integer",
        json_path = ".status.replay.workers",
        description = "replay workers per pod"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BackupMxSpec {
    /// Mail domains this backup MX accepts mail for (e.g. `example.com`). Mail for any other
    /// domain is refused (`550 5.7.1`): the backup is never an open relay.
    #[schemars(
        length(min = 1, max = 100),
        inner(pattern(HOSTNAME_PATTERN), length(max = 253))
    )]
    pub domains: Vec<String>,

    /// The primary mail server: where queued mail is replayed to.
    pub primary: PrimarySpec,

    /// How long undelivered mail is kept; then the sender gets a bounce (RFC 3464 DSN).
    #[serde(default = "default_retention")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub retention: String,

    /// After this long undelivered, the sender gets one delay warning (DSN). At most `retention`.
    #[serde(default = "default_delay_warning")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub delay_warning: String,

    /// Number of mx-pod servers. Each has its own volume and queue; spread across zones and nodes.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: i32,

    /// The persistent volume of each mx-pod (its queue). Claims are kept when the BackupMx is
    /// deleted or scaled down, so queued mail is never deleted with them.
    pub storage: StorageSpec,

    /// How this backup MX is named in DNS and in SMTP.
    pub mx: MxSpec,

    /// Publishing the backup MX (and its host's addresses) through a DNS provider's API.
    /// Without it the operator leaves DNS alone (publish the records yourself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsSpec>,

    /// Replay (delivery of queued mail to the primary).
    #[serde(default)]
    pub replay: ReplaySpec,

    /// Periods in which replay is held although the primary answers (its upgrades).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maintenance_windows: Vec<MaintenanceWindow>,

    /// Notifications besides Kubernetes events: a webhook and/or an email, one per change
    /// (primary down, recovered, queue too old, near retention, disk filling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<AlertsSpec>,

    /// Which recipients are accepted, checked at RCPT time so unknown addresses are refused in
    /// the SMTP dialogue and never bounced later (no backscatter).
    #[serde(default)]
    pub recipients: RecipientsSpec,

    /// Filters run before a message is queued: rspamd, DNS blocklists, SPF/DMARC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterSpec>,

    /// STARTTLS certificate: a Secret of type `kubernetes.io/tls` (e.g. made by cert-manager) in
    /// the same namespace. A renewed certificate is picked up without restarting the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// Where bounces and delay warnings go: a relay, and the TLS towards it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn: Option<DsnSpec>,

    /// CA certificates trusted besides the public (Mozilla) roots, for a private PKI: checked on
    /// every HTTPS call (the DNS provider's API, the alert webhook, an https rspamd) and for
    /// `tlsPolicy: verify`. Mounted into the pods. Certificates are always verified on HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundleSpec>,

    /// The pods' NetworkPolicy (on by default).
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,

    /// Expect a PROXY protocol (v1 or v2) header on every SMTP connection, for load balancers
    /// that send one (e.g. an AWS NLB with proxy protocol on), so filters see the client's IP.
    #[serde(default)]
    pub proxy_protocol: bool,

    /// What happens to queued mail when this BackupMx is deleted. `Drain` (default): the pods stop
    /// accepting mail and deletion waits until every queued message is delivered or bounced.
    /// `Orphan`: delete at once; the volumes (and the mail on them) are kept.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Container image of the mx-pod server; the operator's `--mxpod-image` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Extra labels put on the StatefulSet's pods (e.g. for network policies).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
}

/// The primary mail server.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrimarySpec {
    /// Host name or IP address of the primary mail server (e.g. `mail.example.com`).
    #[schemars(length(min = 1, max = 253), pattern(r"^[A-Za-z0-9.:\[\]-]+$"))]
    pub host: String,

    /// SMTP port of the primary.
    #[serde(default = "default_primary_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// How the primary's health is probed (SMTP banner and EHLO).
    #[serde(default)]
    pub health_check: HealthCheckSpec,

    /// TLS when replaying to the primary: `none`; `may` (default: STARTTLS whenever the
    /// primary offers it, certificate not checked, like Postfix's
    /// `smtp_tls_security_level = may`); `encrypt` (STARTTLS required: a primary without it
    /// gets no mail, which stays queued); `verify` (required, and the certificate checked
    /// against `host` and the trusted CAs: the public roots and `spec.caBundle`). Under
    /// `encrypt` and `verify` the health probe requires STARTTLS too, so a primary that cannot
    /// take mail securely counts as down, with the reason in `status.primary.lastError`.
    #[serde(default)]
    pub tls_policy: TlsPolicy,
}

/// How SMTP to the primary or a DSN relay uses TLS.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered; the certificate is not checked.
    #[default]
    May,
    /// STARTTLS required; the certificate is not checked.
    Encrypt,
    /// STARTTLS required and the certificate verified.
    Verify,
}

impl From<TlsPolicy> for mx_pod::trust::TlsPolicy {
    fn from(p: TlsPolicy) -> Self {
        match p {
            TlsPolicy::None => Self::None,
            TlsPolicy::May => Self::May,
            TlsPolicy::Encrypt => Self::Encrypt,
            TlsPolicy::Verify => Self::Verify,
        }
    }
}

/// Where delivery status notifications (bounces, delay warnings) go.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DsnSpec {
    /// An SMTP relay (`host:port`, e.g. `smtp-relay.mail:587` or your primary) that takes every
    /// DSN. Unset: each DSN goes straight to the sender domain's MX on port 25, which many
    /// clouds block for pods and which makes the backup's addresses a sender in others' eyes
    /// (SPF, reputation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 3, max = 260),
        pattern(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
    )]
    pub relay: Option<String>,
    /// TLS towards the relay (or the sender's MX): as `spec.primary.tlsPolicy`.
    #[serde(default)]
    pub tls_policy: TlsPolicy,
}

/// A PEM bundle of CA certificates in a Secret of this namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaBundleSpec {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// The key holding the PEM certificates.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// The NetworkPolicy of the pods.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Make a NetworkPolicy for the pods (default `true`): SMTP open to everyone, the admin
    /// port (queue API and `/metrics`) only from `adminFromNamespaces`. Takes effect only where
    /// the cluster's network plugin enforces NetworkPolicy.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// More namespaces whose pods may reach the admin port, each given by the labels it must
    /// carry (a namespace selector's `matchLabels`), besides the operator's own namespace, which
    /// is always admitted (by the `kubernetes.io/metadata.name` label Kubernetes sets from 1.21
    /// on; before 1.21, list labels the operator's namespace carries). Add Prometheus's
    /// namespace here to scrape the pods' `/metrics`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_from_namespaces: Vec<BTreeMap<String, String>>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            admin_from_namespaces: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Health probe settings for the primary.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckSpec {
    /// Time between probes.
    #[serde(default = "default_probe_interval")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub interval: String,
    /// How long one probe may take.
    #[serde(default = "default_probe_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: String,
    /// Consecutive failed probes before the primary counts as down.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: u32,
    /// Consecutive good probes before a down primary counts as up again.
    #[serde(default = "default_success_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub success_threshold: u32,
    /// Also require STARTTLS: the primary must offer it, complete a TLS handshake (TLS 1.2+)
    /// and answer EHLO inside TLS. The certificate is checked only under
    /// `primary.tlsPolicy: verify`, as delivery does; `encrypt` and `verify` imply this.
    #[serde(default)]
    pub start_tls: bool,
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        Self {
            interval: default_probe_interval(),
            timeout: default_probe_timeout(),
            failure_threshold: default_failure_threshold(),
            success_threshold: default_success_threshold(),
            start_tls: false,
        }
    }
}

/// Persistent volume settings.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each pod's volume (e.g. `10Gi`). mx-pod refuses new mail (`452 4.3.1`) when its
    /// queue reaches 80% of it.
    #[schemars(pattern(QUANTITY_PATTERN))]
    pub size: String,
    /// StorageClass of the volumes; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

/// The backup MX's name and MX record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MxSpec {
    /// Host name of this backup MX (e.g. `mx2.example.com`): the MX record's target, the SMTP
    /// banner and the `Received:` header. Must not be the primary's host name.
    #[schemars(pattern(HOSTNAME_PATTERN), length(max = 253))]
    pub hostname: String,
    /// MX priority of the backup. Must be a higher number than the primary's MX priority.
    #[serde(default = "default_mx_priority")]
    #[schemars(range(min = 0, max = 65535))]
    pub priority: u16,
    /// TTL in seconds of the records the operator publishes.
    #[serde(default = "default_mx_ttl")]
    #[schemars(range(min = 30, max = 86400))]
    pub ttl: u32,
    /// Addresses to publish for `hostname`; by default those of the LoadBalancer Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// DNS publication.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsSpec {
    /// The DNS service: `powerdns`, `rfc2136` (dynamic update with TSIG, e.g. BIND or Knot),
    /// `cloudflare` or `route53`.
    pub provider: DnsProviderKind,
    /// The zone the records are written in (e.g. `example.com`).
    #[schemars(pattern(HOSTNAME_PATTERN))]
    pub zone: String,
    /// More zones, when the domains (or the MX host name) are in several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(HOSTNAME_PATTERN)))]
    pub additional_zones: Vec<String>,
    /// Secret (same namespace) with the provider's credentials: `apiKey` (PowerDNS),
    /// `tsigSecret` (RFC 2136, base64), `apiToken` (Cloudflare), `accessKeyId` +
    /// `secretAccessKey` [+ `sessionToken`] (Route53).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// PowerDNS settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub powerdns: Option<PowerDnsSpec>,
    /// RFC 2136 settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rfc2136: Option<Rfc2136Spec>,
    /// Cloudflare settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloudflare: Option<CloudflareSpec>,
    /// Route53 settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route53: Option<Route53Spec>,
    /// Take over records that already exist exactly as wanted but were not made by the
    /// operator (e.g. a backup MX record made by hand before).
    #[serde(default)]
    pub adopt: bool,
    /// `upsert-only`: never delete a record the operator did not create. `sync`: the operator
    /// owns the MX host name and replaces addresses there that it did not create.
    #[serde(default)]
    pub policy: DnsPolicy,
    /// Servers (`ip:port`) to verify the records against; the zone's NS records otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

/// DNS services.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DnsProviderKind {
    Powerdns,
    Rfc2136,
    Cloudflare,
    Route53,
}

/// Deletion policy for DNS records.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum DnsPolicy {
    #[default]
    #[serde(rename = "upsert-only")]
    UpsertOnly,
    #[serde(rename = "sync")]
    Sync,
}

/// A Secret in the same namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// PowerDNS API.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PowerDnsSpec {
    /// API base URL, e.g. `http://pdns.dns:8081`.
    #[schemars(pattern(r"^https?://.+"))]
    pub url: String,
    /// Server id in the API path.
    #[serde(default = "default_server_id")]
    pub server_id: String,
}

/// RFC 2136 dynamic update.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rfc2136Spec {
    /// The primary server, `ip:port`.
    pub server: String,
    /// TSIG key name.
    pub key_name: String,
    /// TSIG algorithm.
    #[serde(default = "default_tsig_algorithm")]
    pub algorithm: String,
}

/// Cloudflare API.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudflareSpec {
    /// Zone id; looked up by the zone's name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_id: Option<String>,
    /// API base URL (default `https://api.cloudflare.com/client/v4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
}

/// Route53 API.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route53Spec {
    /// Hosted zone id.
    pub hosted_zone_id: String,
    /// Signing region.
    #[serde(default = "default_region")]
    pub region: String,
    /// API endpoint (default `https://route53.amazonaws.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn default_server_id() -> String {
    "localhost".into()
}
fn default_tsig_algorithm() -> String {
    "hmac-sha256".into()
}
fn default_region() -> String {
    "us-east-1".into()
}

/// Replay settings.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySpec {
    /// Most concurrent delivery sessions per pod towards the primary.
    #[serde(default = "default_max_workers")]
    #[schemars(range(min = 1, max = 256))]
    pub max_workers: u32,
    /// Most messages per second per pod towards the primary (0 = unlimited).
    #[serde(default = "default_rate")]
    #[schemars(range(min = 0, max = 100000))]
    pub rate_per_second: u32,
    /// Hold all queued mail (no delivery) until set back to false.
    #[serde(default)]
    pub paused: bool,
    /// Once the primary is healthy again, workers grow from 1 to `maxWorkers` over this time,
    /// so a primary that just came back is not flooded.
    #[serde(default = "default_ramp_up")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub ramp_up: String,
}

impl Default for ReplaySpec {
    fn default() -> Self {
        Self {
            max_workers: default_max_workers(),
            rate_per_second: default_rate(),
            paused: false,
            ramp_up: default_ramp_up(),
        }
    }
}

fn default_ramp_up() -> String {
    "2m".into()
}

/// A period in which the primary is not to be fed (an upgrade, a migration): mail only queues.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    /// One-off window: when it opens (RFC 3339, e.g. `2026-12-01T02:00:00Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub start: Option<String>,
    /// Recurring window: when it opens, as a cron expression (`minute hour day month weekday`,
    /// e.g. `0 2 * * 6` for Saturdays at 02:00) in `timeZone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// IANA time zone of `schedule` (default `UTC`), e.g. `Europe/Berlin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// How long the window stays open.
    #[schemars(pattern(DURATION_PATTERN))]
    pub duration: String,
    /// Why (shown in status and events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where alerts go besides Kubernetes events.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertsSpec {
    /// A URL that gets a JSON POST per alert (Slack-compatible: it has a `text` field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^https?://.+"))]
    pub webhook_url: Option<String>,
    /// An address that gets an email per alert, sent through `smtpRelay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[^@\s]+@[^@\s]+$"))]
    pub email: Option<String>,
    /// SMTP relay (`host:port`) for the alert emails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_relay: Option<String>,
    /// Alert when the oldest queued message is older than this.
    #[serde(default = "default_queue_age_warning")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub queue_age_warning: String,
}

pub(crate) fn default_queue_age_warning() -> String {
    "1h".into()
}

/// Recipient validation.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipientsSpec {
    /// `any` (every address of the domains), `list` (only `addresses`), or `verify` (ask the
    /// primary with a callout while it answers, and remember its answers on the volume).
    #[serde(default)]
    pub mode: RecipientMode,
    /// For `list`: accepted addresses, `user@domain` or `*@domain`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^[^@\s]+@[^@\s]+$")))]
    pub addresses: Vec<String>,
    /// For `verify`: how long the primary's "this address exists" is remembered.
    #[serde(default = "default_cache_ttl")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub cache_ttl: String,
    /// For `verify`: how long the primary's "no such user" is remembered.
    #[serde(default = "default_negative_ttl")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub negative_ttl: String,
    /// For `verify`, when the primary cannot be asked and the address was never seen:
    /// `tempfail` (`450 4.2.0`, the sender retries) or `accept`.
    #[serde(default)]
    pub fail_mode: FailMode,
}

impl Default for RecipientsSpec {
    fn default() -> Self {
        Self {
            mode: RecipientMode::Any,
            addresses: Vec::new(),
            cache_ttl: default_cache_ttl(),
            negative_ttl: default_negative_ttl(),
            fail_mode: FailMode::Tempfail,
        }
    }
}

/// Recipient validation mode.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecipientMode {
    #[default]
    Any,
    List,
    Verify,
}

/// What a check does when its backend cannot answer.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Answer with a temporary error: the sender retries later.
    #[default]
    Tempfail,
    /// Accept the mail.
    Accept,
}

/// Filters before queueing.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FilterSpec {
    /// rspamd scan of every message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rspamd: Option<RspamdSpec>,
    /// DNS blocklists the client's IP is looked up in (e.g. `zen.spamhaus.org`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(HOSTNAME_PATTERN)))]
    pub dnsbl: Vec<String>,
    /// DNS server (`ip:port`) for blocklist and SPF/DMARC lookups; the pod's resolver when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver: Option<String>,
    /// SPF/DMARC: `off`, `header` (record the result in `Authentication-Results:`), or
    /// `enforce` (also refuse mail that fails DMARC where the sender's domain says `p=reject`).
    #[serde(default)]
    pub auth: AuthMode,
}

/// rspamd settings.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RspamdSpec {
    /// Base URL of rspamd's normal worker, e.g. `http://rspamd.mail:11333`.
    #[schemars(pattern(r"^https?://.+"))]
    pub url: String,
    /// How long a scan may take.
    #[serde(default = "default_rspamd_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: String,
    /// When rspamd cannot answer: `tempfail` (`451 4.7.1`) or `accept`.
    #[serde(default)]
    pub fail_mode: FailMode,
}

/// SPF/DMARC checking.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Off,
    Header,
    Enforce,
}

/// STARTTLS certificate source.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Name of a `kubernetes.io/tls` Secret (keys `tls.crt`, `tls.key`) in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

fn default_cache_ttl() -> String {
    "7d".into()
}
fn default_negative_ttl() -> String {
    "1h".into()
}
fn default_rspamd_timeout() -> String {
    "10s".into()
}

/// What deletion does with queued mail.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// Stop accepting, wait until every queued message is delivered or bounced, then delete.
    #[default]
    Drain,
    /// Delete at once; volumes with their mail are kept.
    Orphan,
}

fn default_retention() -> String {
    "5d".into()
}
fn default_delay_warning() -> String {
    "4h".into()
}
fn default_replicas() -> i32 {
    2
}
fn default_primary_port() -> u16 {
    25
}
fn default_probe_interval() -> String {
    "10s".into()
}
fn default_probe_timeout() -> String {
    "5s".into()
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_success_threshold() -> u32 {
    2
}
fn default_mx_priority() -> u16 {
    20
}
fn default_mx_ttl() -> u32 {
    300
}
fn default_max_workers() -> u32 {
    8
}
fn default_rate() -> u32 {
    50
}

// === status ===

/// What the operator observed.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupMxStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready` (all pods serving), `Degraded` (a pod's queue could not be
    /// read), `Deleting` (what deletion waits for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Pods the StatefulSet wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Pods ready to accept mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Queued mail over all pods, read from each pod's admin API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    /// Replay as last set on the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayStatus>,
    /// The records published in DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
    /// The primary as the operator's probe sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<PrimaryStatus>,
    /// Maintenance windows: the open one and the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceStatus>,
    /// Which alerts are raised (so each change is notified once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<AlertState>,
    /// The last failover drill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillStatus>,
}

/// The primary's health.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrimaryStatus {
    /// `host:port` probed.
    pub target: String,
    /// Whether it answers SMTP (absent until the probe thresholds are first reached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// When it became healthy or unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The last probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<String>,
    /// Why the last probe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Maintenance window state.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceStatus {
    /// Whether a window is open now.
    pub active: bool,
    /// The open window's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the open window closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<String>,
    /// When the next window opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start: Option<String>,
    /// The next window's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_reason: Option<String>,
}

/// Raised alerts.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertState {
    /// The primary is down.
    #[serde(default)]
    pub primary_down: bool,
    /// Mail is queued.
    #[serde(default)]
    pub queueing: bool,
    /// The oldest message is older than `spec.alerts.queueAgeWarning`.
    #[serde(default)]
    pub queue_old: bool,
    /// The oldest message has used 80% of `spec.retention`.
    #[serde(default)]
    pub near_retention: bool,
    /// A pod's queue uses more than 80% of its volume.
    #[serde(default)]
    pub disk_high: bool,
}

/// Where a failover drill stands.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum DrillResult {
    /// The test message is queued and being followed.
    #[default]
    Running,
    /// It reached the primary.
    Passed,
    Failed,
}

impl std::fmt::Display for DrillResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrillResult::Running => "Running",
            DrillResult::Passed => "Passed",
            DrillResult::Failed => "Failed",
        })
    }
}

/// A failover drill.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillStatus {
    /// The value of the `backupmx.io/drill` annotation this drill answers.
    pub request: String,
    pub result: DrillResult,
    /// What happened.
    pub message: String,
    /// The pod that queued the test message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The test message's queue id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// When it started.
    pub started: String,
    /// Whether the test message has been released for delivery.
    #[serde(default)]
    pub released: bool,
}

/// DNS publication state.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsStatus {
    /// The records published for this BackupMx (`example.com MX 20 mx2.example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<String>,
    /// Whether the zone's authoritative servers answer with every record.
    #[serde(default)]
    pub verified: bool,
    /// When the records were last compared with the provider (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<String>,
    /// Risks worth knowing (priority gap, TTL, shared network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The generation and addresses the last sync was for (to know when to sync again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_for: Option<String>,
}

/// Queue figures summed over the pods.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Messages not yet delivered.
    pub messages: u64,
    /// Their size in bytes.
    pub bytes: u64,
    /// Age in seconds of the oldest of them (0 when none).
    pub oldest_age_seconds: u64,
    /// The same per domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainQueueStatus>,
    /// The same per pod, with whether its admin API answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodQueueStatus>,
}

/// Queue figures of one domain.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainQueueStatus {
    /// The mail domain.
    pub domain: String,
    /// Messages queued for it.
    pub messages: u64,
    /// Their size in bytes.
    pub bytes: u64,
    /// Age in seconds of the oldest.
    pub oldest_age_seconds: u64,
}

/// Queue figures of one pod.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodQueueStatus {
    /// Pod name.
    pub pod: String,
    /// Messages queued on it (absent when it could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    /// Whether it has stopped accepting mail to drain its queue.
    #[serde(default)]
    pub draining: bool,
    /// Why its queue could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Replay state.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayStatus {
    /// Replay workers per pod.
    pub workers: u32,
    /// Why that many: `PrimaryDown`, `Paused`, `MaintenanceWindow`, `RampingUp`, `Backoff`, `Full`.
    pub reason: String,
    /// The details.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When `spec.replay.paused` was last lifted (RFC 3339): the ramp-up counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<String>,
}

/// A standard Kubernetes condition (the `metav1.Condition` shape).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Machine-readable reason in PascalCase, e.g. `InvalidSpec`.
    #[schemars(
        length(min = 1, max = 1024),
        pattern(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,
    /// Human-readable details.
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Condition status.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl BackupMxStatus {
    /// The condition of type `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// Sets a condition in `conditions`, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, previous: &[Condition], mut new: Condition) {
    if let Some(old) = previous.iter().find(|c| c.type_ == new.type_)
        && old.status == new.status
    {
        new.last_transition_time = old.last_transition_time.clone();
    }
    conditions.retain(|c| c.type_ != new.type_);
    conditions.push(new);
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    /// `crds/backupmx.yaml` is what `crdgen` prints; regenerate with `make crds`.
    #[test]
    fn checked_in_crd_is_current() {
        let generated = crate::crd_yaml();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/backupmx.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "crds/backupmx.yaml is out of date: run `make crds` and commit it"
        );
    }

    #[test]
    fn schema_has_no_cel_and_documents_every_field() {
        let crd = serde_json::to_value(BackupMx::crd()).unwrap();
        let text = crd.to_string();
        assert!(!text.contains("x-kubernetes-validations"));
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (k, p) in props {
                    let here = format!("{path}.{k}");
                    if p.get("description").is_none() && !path.is_empty() {
                        missing.push(here.clone());
                    }
                    walk(&here, p, missing);
                }
            }
            if let Some(items) = v.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        let mut missing = Vec::new();
        walk("", &schema["properties"]["spec"], &mut missing);
        walk("", &schema["properties"]["status"], &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: BackupMxSpec = serde_json::from_value(serde_json::json!({
            "domains": ["example.com"],
            "primary": {"host": "mail.example.com"},
            "storage": {"size": "1Gi"},
            "mx": {"hostname": "mx2.example.com"}
        }))
        .unwrap();
        assert_eq!(spec.primary.port, 25);
        assert_eq!(spec.replicas, 2);
        assert_eq!(spec.retention, "5d");
        assert_eq!(spec.replay.max_workers, 8);
        assert_eq!(spec.deletion_policy, DeletionPolicy::Drain);
        assert_eq!(spec.mx.priority, 20);
    }

    #[test]
    fn condition_keeps_transition_time_while_status_holds() {
        let old = vec![Condition {
            type_: "Ready".into(),
            status: ConditionStatus::True,
            reason: "AllPodsReady".into(),
            message: "".into(),
            last_transition_time: "2026-01-01T00:00:00Z".into(),
            observed_generation: Some(1),
        }];
        let mut now = Vec::new();
        let mut c = old[0].clone();
        c.last_transition_time = "2026-02-02T00:00:00Z".into();
        set_condition(&mut now, &old, c.clone());
        assert_eq!(now[0].last_transition_time, "2026-01-01T00:00:00Z");
        c.status = ConditionStatus::False;
        set_condition(&mut now, &old, c);
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].last_transition_time, "2026-02-02T00:00:00Z");
    }
}
