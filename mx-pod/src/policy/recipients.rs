//! Recipient validation at RCPT time, so mail for addresses that do not exist is refused in the
//! dialogue and never bounced later (no backscatter).
//!
//! - `any`: every address of the domain.
//! - `list`: the listed addresses, and `*@domain` for a whole domain.
//! - `verify`: ask the primary (a callout: `MAIL FROM:<>`, `RCPT TO:<address>`, `QUIT`) while it
//!   answers, and remember the answer: "exists" for `cache_ttl` (long), "no such user" for
//!   `negative_ttl` (short). While the primary cannot be asked (down, `4xx`, timeout), a cached
//!   answer still decides; an address never seen gets `fail_mode`: `tempfail` (`450 4.2.0`, the
//!   sender retries later) or `accept`.
//!
//! The cache lives in the queue directory (`recipient-cache.json`, on the pod's volume), written
//! atomically (temp file, fsync, rename) at most every [`FLUSH_EVERY`] and at shutdown, so it
//! survives restarts: a backup that restarts during an outage still knows the valid addresses.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::Verdict;
use crate::{
    address::mailbox_key,
    config::{DomainConfig, FailMode, RecipientMode},
    outbound::{SmtpClient, Stage},
    reply::{RejectReason, Reply},
    trust::Trust,
};

/// How often a changed cache is written to disk.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Timeout of one callout (connect, each reply).
const CALLOUT_TIMEOUT: Duration = Duration::from_secs(10);
/// File name in the queue directory.
pub const CACHE_FILE: &str = "recipient-cache.json";
/// The cache keeps at most this many addresses (the oldest-expiring are dropped first).
const MAX_ENTRIES: usize = 200_000;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Entry {
    valid: bool,
    /// Unix seconds after which the answer is forgotten.
    expires: u64,
}

/// What the primary said about an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callout {
    Exists,
    /// `5xx`: the primary's reply text.
    Unknown(String),
    /// The primary could not be asked or answered `4xx`.
    Unavailable(String),
    /// The address has UTF-8 in it and the primary does not offer SMTPUTF8: it can never take
    /// it, so the sender is told now (`553 5.6.7`) rather than by a bounce after the replay.
    NoSmtputf8,
}

/// Validates recipients; shared by every session.
pub struct Recipients {
    path: PathBuf,
    hostname: String,
    /// For callouts under the domain's `tls_policy = "verify"`.
    trust: Trust,
    cache: Mutex<HashMap<String, Entry>>,
    dirty: AtomicBool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Recipients {
    /// Loads the cache kept in `dir` (an unreadable file is logged and replaced).
    pub fn open(dir: &Path, hostname: &str, trust: Trust) -> Self {
        let path = dir.join(CACHE_FILE);
        let cache = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<HashMap<String, Entry>>(&bytes) {
                Ok(mut map) => {
                    let t = now();
                    map.retain(|_, e| e.expires > t);
                    info!(entries = map.len(), "recipient cache loaded");
                    map
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "recipient cache unreadable; starting empty");
                    HashMap::new()
                }
            },
            Err(_) => HashMap::new(),
        };
        Self {
            path,
            hostname: hostname.to_string(),
            trust,
            cache: Mutex::new(cache),
            dirty: AtomicBool::new(false),
        }
    }

    /// Decides on `address` (whose domain is `domain`).
    pub async fn check(&self, domain: &DomainConfig, address: &str) -> Verdict {
        let rc = &domain.recipients;
        match rc.mode {
            RecipientMode::Any => Verdict::Accept,
            RecipientMode::List => {
                // one key per mailbox: the domain by its route (A-label) whatever its spelling in
                // the RCPT or the list, the local part with needless quotes dropped
                let wanted = mailbox_key(address, &domain.name);
                let listed = rc.addresses.iter().any(|a| {
                    a.strip_prefix("*@").map_or_else(
                        || mailbox_key(a, &domain.name) == wanted,
                        |d| d.eq_ignore_ascii_case(&domain.name),
                    )
                });
                if listed {
                    Verdict::Accept
                } else {
                    Verdict::Reject(RejectReason::UnknownRecipient)
                }
            }
            RecipientMode::Verify => {
                let key = mailbox_key(address, &domain.name);
                // a fresh answer decides without asking again
                if let Some(valid) = self.cached(&key) {
                    return self.cached_verdict(valid);
                }
                match callout(domain, &self.hostname, address, &self.trust).await {
                    Callout::Exists => {
                        self.remember(key, true, rc.cache_ttl.0);
                        Verdict::Accept
                    }
                    Callout::Unknown(text) => {
                        self.remember(key, false, rc.negative_ttl.0);
                        Verdict::RejectWith(
                            RejectReason::UnknownRecipient,
                            Reply::dynamic(
                                550,
                                "5.1.1",
                                format!("Recipient address rejected: {}", clean(&text)),
                            ),
                        )
                    }
                    Callout::NoSmtputf8 => Verdict::RejectWith(
                        RejectReason::NonAsciiAddress,
                        Reply::new(553, "5.6.7", UTF8_NOT_OFFERED_TEXT),
                    ),
                    Callout::Unavailable(why) => {
                        debug!(address, why, "callout inconclusive");
                        match rc.fail_mode {
                            FailMode::Tempfail => {
                                Verdict::Reject(RejectReason::RecipientUnverified)
                            }
                            FailMode::Accept => Verdict::Accept,
                        }
                    }
                }
            }
        }
    }

    fn cached_verdict(&self, valid: bool) -> Verdict {
        if valid {
            Verdict::Accept
        } else {
            Verdict::Reject(RejectReason::UnknownRecipient)
        }
    }

    fn cached(&self, key: &str) -> Option<bool> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|e| e.expires > now())
            .map(|e| e.valid)
    }

    fn remember(&self, key: String, valid: bool, ttl: Duration) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_ENTRIES {
            let t = now();
            cache.retain(|_, e| e.expires > t);
            if cache.len() >= MAX_ENTRIES {
                // still full of live entries: drop the soonest to expire
                let mut by_expiry: Vec<(u64, String)> =
                    cache.iter().map(|(k, e)| (e.expires, k.clone())).collect();
                by_expiry.sort();
                for (_, k) in by_expiry.into_iter().take(MAX_ENTRIES / 10) {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            Entry {
                valid,
                expires: now() + ttl.as_secs(),
            },
        );
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the cache if it changed: temp file, fsync, rename, directory fsync.
    pub fn flush(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let bytes = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_vec(&*cache).expect("cache serializes")
        };
        let write = || -> std::io::Result<()> {
            let tmp = self.path.with_extension("json.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().inspect_err(|_| self.dirty.store(true, Ordering::Relaxed))
    }

    /// Flushes every [`FLUSH_EVERY`] until `stop`, then once more.
    pub async fn run_flusher(
        self: std::sync::Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let stopped = tokio::select! {
                _ = tokio::time::sleep(FLUSH_EVERY) => false,
                _ = stop.cancelled() => true,
            };
            let me = self.clone();
            let r = tokio::task::spawn_blocking(move || me.flush()).await;
            if let Ok(Err(e)) = r {
                warn!(path = %self.path.display(), error = %e, "cannot write the recipient cache");
            }
            if stopped {
                return;
            }
        }
    }
}

/// Asks the domain's primary whether it accepts mail for `address`, with the domain's TLS policy
/// (the address is personal data: it goes encrypted wherever the primary offers STARTTLS).
pub async fn callout(
    domain: &DomainConfig,
    hostname: &str,
    address: &str,
    trust: &Trust,
) -> Callout {
    let primary = &domain.primary;
    let run = async {
        let opened =
            SmtpClient::open(primary, hostname, CALLOUT_TIMEOUT, domain.tls_policy, trust).await;
        let mut c = match opened {
            Ok(c) => c,
            Err(e) => return Callout::Unavailable(e.to_string()),
        };
        // an address with UTF-8 in it is asked about in an SMTPUTF8 transaction (RFC 6531), as
        // the replay will deliver it; a primary without SMTPUTF8 could never take it
        let mail = if address.is_ascii() {
            "MAIL FROM:<>\r\n"
        } else if c.caps.smtputf8 {
            "MAIL FROM:<> SMTPUTF8\r\n"
        } else {
            c.quit().await;
            return Callout::NoSmtputf8;
        };
        let mail = match c.command(mail, Stage::Mail).await {
            Ok(r) => r,
            Err(e) => return Callout::Unavailable(e.to_string()),
        };
        if !mail.is_positive() {
            c.quit().await;
            return Callout::Unavailable(format!("MAIL FROM:<> refused: {mail}"));
        }
        let rcpt = c
            .command(&format!("RCPT TO:<{address}>\r\n"), Stage::Rcpt)
            .await;
        let _ = c.command("RSET\r\n", Stage::Rset).await;
        c.quit().await;
        match rcpt {
            Ok(r) if r.is_positive() => Callout::Exists,
            Ok(r) if r.code >= 500 => Callout::Unknown(r.text()),
            Ok(r) => Callout::Unavailable(r.text()),
            Err(e) => Callout::Unavailable(e.to_string()),
        }
    };
    tokio::time::timeout(CALLOUT_TIMEOUT * 3, run)
        .await
        .unwrap_or_else(|_| Callout::Unavailable("callout timed out".into()))
}

use crate::outbound::UTF8_NOT_OFFERED_TEXT;

/// The primary's reply text, made safe for our reply line.
fn clean(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HumanDuration, RecipientsConfig};

    fn domain(mode: RecipientMode, addresses: &[&str], primary: &str) -> DomainConfig {
        DomainConfig {
            name: "example.test".into(),
            primary: primary.into(),
            recipients: RecipientsConfig {
                mode,
                addresses: addresses.iter().map(|s| s.to_string()).collect(),
                cache_ttl: HumanDuration(Duration::from_secs(3600)),
                negative_ttl: HumanDuration(Duration::from_secs(60)),
                fail_mode: FailMode::Tempfail,
            },
            auth: Default::default(),
            tls_policy: Default::default(),
        }
    }

    #[tokio::test]
    async fn list_mode_accepts_listed_addresses_and_wildcards() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recipients::open(dir.path(), "mx2.example.test", Trust::webpki());
        let d = domain(RecipientMode::List, &["alice@example.test"], "127.0.0.1:9");
        assert_eq!(r.check(&d, "Alice@Example.test").await, Verdict::Accept);
        assert_eq!(
            r.check(&d, "bob@example.test").await,
            Verdict::Reject(RejectReason::UnknownRecipient)
        );
        let all = domain(RecipientMode::List, &["*@example.test"], "127.0.0.1:9");
        assert_eq!(r.check(&all, "bob@example.test").await, Verdict::Accept);
    }

    #[tokio::test]
    async fn verify_with_the_primary_down_uses_the_cache_then_fail_mode() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recipients::open(dir.path(), "mx2.example.test", Trust::webpki());
        let mut d = domain(RecipientMode::Verify, &[], "127.0.0.1:1"); // nothing listens
        r.remember("known@example.test".into(), true, Duration::from_secs(60));
        r.remember("gone@example.test".into(), false, Duration::from_secs(60));
        assert_eq!(r.check(&d, "known@example.test").await, Verdict::Accept);
        assert_eq!(
            r.check(&d, "gone@example.test").await,
            Verdict::Reject(RejectReason::UnknownRecipient)
        );
        assert_eq!(
            r.check(&d, "new@example.test").await,
            Verdict::Reject(RejectReason::RecipientUnverified)
        );
        d.recipients.fail_mode = FailMode::Accept;
        assert_eq!(r.check(&d, "new@example.test").await, Verdict::Accept);

        // the cache survives a restart
        r.flush().unwrap();
        let again = Recipients::open(dir.path(), "mx2.example.test", Trust::webpki());
        assert_eq!(again.cached("known@example.test"), Some(true));
        assert_eq!(again.cached("gone@example.test"), Some(false));
    }
}
