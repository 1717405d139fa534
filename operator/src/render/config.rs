//! `mx-pod.toml` for the pods, built with mx-pod's own [`Config`] type so the operator cannot
//! render a key mx-pod does not know, and checked with mx-pod's own validation.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use mx_pod::config::{
    self as mx, AdminConfig, AuthMode, Config, DomainConfig, DsnConfig, FilterConfig,
    HumanDuration, QueueConfig, RecipientsConfig, ReplayConfig, Size, SmtpConfig,
};
use sha2::{Digest, Sha256};

use super::{ADMIN_PORT, Names, SMTP_PORT, child_meta};
use crate::{
    crd::{BackupMx, FailMode, RecipientMode},
    validate::{InvalidSpec, ValidSpec},
};

/// Where the ConfigMap is mounted in the pod.
pub const CONFIG_DIR: &str = "/etc/mx-pod/config";
/// File name of the config inside the ConfigMap.
pub const CONFIG_FILE: &str = "mx-pod.toml";
/// Where the admin-token Secret is mounted.
pub const TOKEN_DIR: &str = "/etc/mx-pod/token";
/// Where the STARTTLS Secret is mounted.
pub const TLS_DIR: &str = "/etc/mx-pod/tls";
/// Where the CA bundle (`spec.caBundle`) is mounted, as `ca.crt`.
pub const TRUST_DIR: &str = "/etc/mx-pod/trust";
/// The file name of the mounted CA bundle.
pub const CA_FILE: &str = "ca.crt";
/// Mount point of the pod's volume.
pub const DATA_DIR: &str = "/var/lib/mx-pod";
/// Share of the volume the queue may fill before new mail gets `452 4.3.1`: the rest is room
/// for log segments not yet reclaimed.
pub const QUEUE_SHARE_PERCENT: u64 = 80;
/// How long SMTP sessions may take to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Renders the mx-pod configuration for `bmx` from `valid`, what [`crate::validate::validate`]
/// made of its spec. Fails only if mx-pod's own validation refuses the result.
pub fn mxpod_config(bmx: &BackupMx, valid: &ValidSpec) -> Result<Config, InvalidSpec> {
    let spec = &bmx.spec;
    let storage = valid.storage_bytes;
    let primary = if spec.primary.host.contains(':') && !spec.primary.host.starts_with('[') {
        format!("[{}]:{}", spec.primary.host, spec.primary.port) // IPv6 literal
    } else {
        format!("{}:{}", spec.primary.host, spec.primary.port)
    };
    let replay = &spec.replay;
    let rc = &spec.recipients;
    let recipients_of = |domain: &str| RecipientsConfig {
        mode: match rc.mode {
            RecipientMode::Any => mx::RecipientMode::Any,
            RecipientMode::List => mx::RecipientMode::List,
            RecipientMode::Verify => mx::RecipientMode::Verify,
        },
        addresses: rc
            .addresses
            .iter()
            .filter(|a| {
                a.rsplit_once('@')
                    .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain))
            })
            .cloned()
            .collect(),
        cache_ttl: HumanDuration(valid.recipients.cache_ttl),
        negative_ttl: HumanDuration(valid.recipients.negative_ttl),
        fail_mode: fail_mode(rc.fail_mode),
    };
    let filter = spec.filter.clone().unwrap_or_default();
    let auth = match filter.auth {
        crate::crd::AuthMode::Off => AuthMode::Off,
        crate::crd::AuthMode::Header => AuthMode::Header,
        crate::crd::AuthMode::Enforce => AuthMode::Enforce,
    };
    let rspamd = filter
        .rspamd
        .as_ref()
        .zip(valid.filter.rspamd_timeout)
        .map(|(r, timeout)| mx::RspamdConfig {
            url: r.url.clone(),
            timeout: HumanDuration(timeout),
            fail_mode: fail_mode(r.fail_mode),
        });
    let mut domains = Vec::new();
    for d in &spec.domains {
        domains.push(DomainConfig {
            name: d.to_ascii_lowercase(),
            primary: primary.clone(),
            recipients: recipients_of(d),
            auth,
            tls_policy: spec.primary.tls_policy.into(),
        });
    }
    let dsn = spec.dsn.clone().unwrap_or_default();
    let config = Config {
        hostname: spec.mx.hostname.to_ascii_lowercase(),
        smtp: SmtpConfig {
            // IPv6 and IPv4 (mx-pod leaves IPv6 out quietly where the pod has none)
            listen: vec![
                (std::net::Ipv6Addr::UNSPECIFIED, SMTP_PORT).into(),
                (std::net::Ipv4Addr::UNSPECIFIED, SMTP_PORT).into(),
            ],
            shutdown_grace: HumanDuration(SHUTDOWN_GRACE),
            proxy_protocol: spec.proxy_protocol,
            tls: spec.tls.as_ref().map(|_| mx::TlsConfig {
                cert_file: format!("{TLS_DIR}/tls.crt").into(),
                key_file: format!("{TLS_DIR}/tls.key").into(),
            }),
            ..SmtpConfig::default()
        },
        queue: QueueConfig {
            dir: format!("{DATA_DIR}/queue").into(),
            retention: HumanDuration(valid.retention),
            delay_warning: HumanDuration(valid.delay_warning),
            max_bytes: Size(storage / 100 * QUEUE_SHARE_PERCENT),
            segment_size: Size((64 << 20).min(storage / 16).max(64 << 10)),
        },
        admin: AdminConfig {
            // dual-stack where the pod has IPv6, IPv4 otherwise: the operator reaches each
            // pod at its pod IP, whichever family the cluster gives
            listen: (std::net::Ipv6Addr::UNSPECIFIED, ADMIN_PORT).into(),
            token_file: Some(format!("{TOKEN_DIR}/{}", super::TOKEN_KEY).into()),
        },
        // The operator decides replay (its probe, windows, ramp) and pushes the workers to each
        // pod: a pod starts holding everything until told otherwise.
        replay: ReplayConfig {
            workers: 0,
            auto: false,
            rate_per_second: replay.rate_per_second,
            probe_interval: HumanDuration(valid.health_check.interval),
            ..ReplayConfig::default()
        },
        dsn: DsnConfig {
            relay: dsn.relay.clone(),
            tls_policy: dsn.tls_policy.into(),
            resolver: None,
        },
        trust: mx::TrustConfig {
            ca_file: spec
                .ca_bundle
                .as_ref()
                .map(|_| format!("{TRUST_DIR}/{CA_FILE}").into()),
        },
        filter: FilterConfig {
            resolver: valid.filter.resolver,
            dns_timeout: None,
            dnsbl: filter.dnsbl.clone(),
            rspamd,
        },
        domains,
    };
    config
        .validate()
        .map_err(|e| InvalidSpec(vec![format!("rendered mx-pod configuration: {e}")]))?;
    Ok(config)
}

fn fail_mode(m: FailMode) -> mx::FailMode {
    match m {
        FailMode::Tempfail => mx::FailMode::Tempfail,
        FailMode::Accept => mx::FailMode::Accept,
    }
}

/// The ConfigMap holding `mx-pod.toml`.
pub fn configmap(bmx: &BackupMx, toml: &str) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(bmx, &Names::of(bmx).configmap),
        data: Some([(CONFIG_FILE.to_string(), toml.to_string())].into()),
        ..Default::default()
    }
}

/// Short hash of the rendered config for the pod template annotation.
pub fn config_hash(toml: &str) -> String {
    let digest = Sha256::digest(toml.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::backupmx;

    /// Validates, then renders (as the apply path does).
    fn mxpod_config(bmx: &BackupMx) -> Result<Config, InvalidSpec> {
        super::mxpod_config(bmx, &crate::validate::validate(&bmx.spec)?)
    }

    #[test]
    fn renders_a_config_mx_pod_accepts() {
        let bmx = backupmx();
        let c = mxpod_config(&bmx).unwrap();
        let text = c.to_toml();
        let parsed = Config::parse(&text, "rendered").unwrap();
        assert_eq!(parsed, c);
        assert_eq!(c.hostname, "mx2.example.com");
        assert_eq!(c.domains.len(), 2);
        assert_eq!(c.domains[0].primary, "mail.example.com:25");
        assert_eq!(c.queue.max_bytes, Size((1u64 << 30) / 100 * 80));
        assert_eq!(c.queue.dir.to_str(), Some("/var/lib/mx-pod/queue"));
        assert_eq!(c.smtp.listen[0].port(), SMTP_PORT);
        assert!(!c.replay.auto, "the operator decides replay");
        assert_eq!(
            c.replay.workers, 0,
            "pods start holding until the operator says"
        );
    }

    #[test]
    fn tls_policies_the_dsn_relay_and_both_address_families_are_rendered() {
        let c = mxpod_config(&backupmx()).unwrap();
        assert!(c.domains.iter().all(|d| d.tls_policy == mx::TlsPolicy::May));
        assert_eq!(c.dsn.relay, None, "DSNs go to the sender's MX by default");
        assert!(c.trust.ca_file.is_none());
        let families: Vec<bool> = c.smtp.listen.iter().map(|a| a.is_ipv6()).collect();
        assert_eq!(families, vec![true, false], "SMTP on [::] and 0.0.0.0");
        assert!(c.admin.listen.is_ipv6() && c.admin.listen.ip().is_unspecified());

        let mut bmx = backupmx();
        bmx.spec.primary.tls_policy = crate::crd::TlsPolicy::Verify;
        bmx.spec.dsn = Some(crate::crd::DsnSpec {
            relay: Some("smtp-relay.mail:587".into()),
            tls_policy: crate::crd::TlsPolicy::Encrypt,
        });
        let c = mxpod_config(&bmx).unwrap();
        assert!(
            c.domains
                .iter()
                .all(|d| d.tls_policy == mx::TlsPolicy::Verify)
        );
        assert_eq!(c.dsn.relay.as_deref(), Some("smtp-relay.mail:587"));
        assert_eq!(c.dsn.tls_policy, mx::TlsPolicy::Encrypt);
        let parsed = Config::parse(&c.to_toml(), "rendered").unwrap();
        assert_eq!(parsed, c, "mx-pod reads back what was rendered");
    }

    #[test]
    fn pausing_does_not_roll_the_pods() {
        let mut bmx = backupmx();
        let running = mxpod_config(&bmx).unwrap().to_toml();
        bmx.spec.replay.paused = true;
        let paused = mxpod_config(&bmx).unwrap().to_toml();
        assert_eq!(
            config_hash(&running),
            config_hash(&paused),
            "pushed at run time, not rendered"
        );
        bmx.spec.primary.host = "mail2.example.com".into();
        let cutover = mxpod_config(&bmx).unwrap().to_toml();
        assert_ne!(
            config_hash(&running),
            config_hash(&cutover),
            "a new primary rolls the pods"
        );
    }

    #[test]
    fn filters_recipients_and_tls_are_rendered() {
        let mut bmx = backupmx();
        bmx.spec.recipients = serde_json::from_value(serde_json::json!({
            "mode": "list", "addresses": ["alice@example.com", "*@example.org"], "failMode": "accept"
        }))
        .unwrap();
        bmx.spec.filter = Some(
            serde_json::from_value(serde_json::json!({
                "rspamd": {"url": "http://rspamd:11333"}, "dnsbl": ["zen.spamhaus.org"],
                "resolver": "10.0.0.10:53", "auth": "enforce"
            }))
            .unwrap(),
        );
        bmx.spec.tls = Some(crate::crd::TlsSpec {
            secret_name: "mx-tls".into(),
        });
        let c = mxpod_config(&bmx).unwrap();
        let text = c.to_toml();
        assert_eq!(Config::parse(&text, "rendered").unwrap(), c);
        assert_eq!(c.domains[0].recipients.addresses, vec!["alice@example.com"]);
        assert_eq!(c.domains[1].recipients.addresses, vec!["*@example.org"]);
        assert_eq!(c.domains[0].recipients.fail_mode, mx::FailMode::Accept);
        assert_eq!(c.domains[0].auth, AuthMode::Enforce);
        assert_eq!(c.filter.dnsbl, vec!["zen.spamhaus.org"]);
        assert_eq!(c.filter.rspamd.as_ref().unwrap().url, "http://rspamd:11333");
        assert_eq!(
            c.smtp.tls.as_ref().unwrap().cert_file.to_str(),
            Some("/etc/mx-pod/tls/tls.crt")
        );
    }

    #[test]
    fn ipv6_primary_is_bracketed() {
        let mut bmx = backupmx();
        bmx.spec.primary.host = "2001:db8::25".into();
        let c = mxpod_config(&bmx).unwrap();
        assert_eq!(c.domains[0].primary, "[2001:db8::25]:25");
    }

    /// The rendered TOML is pinned byte for byte (golden files made before the spec was parsed
    /// once in validation): a change to how values reach the config shows here.
    #[test]
    fn rendered_toml_matches_the_golden_files() {
        let bmx = backupmx();
        assert_eq!(
            mxpod_config(&bmx).unwrap().to_toml(),
            include_str!("golden/fixture.toml")
        );
        let mut bmx = backupmx();
        bmx.spec.recipients = serde_json::from_value(serde_json::json!({
            "mode": "verify", "cacheTtl": "2d", "negativeTtl": "15m"
        }))
        .unwrap();
        bmx.spec.filter = Some(
            serde_json::from_value(serde_json::json!({
                "rspamd": {"url": "http://rspamd:11333", "timeout": "7s"},
                "resolver": "10.0.0.10:53"
            }))
            .unwrap(),
        );
        bmx.spec.retention = "3d".into();
        bmx.spec.primary.health_check.interval = "20s".into();
        assert_eq!(
            mxpod_config(&bmx).unwrap().to_toml(),
            include_str!("golden/rich.toml")
        );
    }
}
