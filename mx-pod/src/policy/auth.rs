//! SPF, DKIM and DMARC (mail-auth) for domains with `auth = "header"` or `"enforce"`.
//!
//! The checks run once per message at the end of DATA: SPF of the HELO and MAIL FROM identities
//! against the client IP, DKIM signatures, and DMARC of the `From:` domain using both. The result
//! goes into an `Authentication-Results:` header (RFC 8601) naming this host, so the primary can
//! rely on it: replayed mail reaches the primary from the backup's address, where the primary's
//! own SPF check would fail it. With `enforce`, mail that fails DMARC where the author's domain
//! publishes `p=reject` is refused (`550 5.7.1`). A DNS failure never refuses mail (`temperror`
//! is recorded, not enforced).
//!
//! `Authentication-Results:` headers claiming this host's name are removed from incoming mail
//! first (RFC 8601 section 5), so a sender cannot forge our verdict.

use std::net::IpAddr;

use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DmarcResult, MessageAuthenticator,
    common::headers::HeaderWriter, dmarc::Policy, dmarc::verify::DmarcParameters,
    spf::verify::SpfParameters,
};

use super::Verdict;
use crate::{config::AuthMode, reply::RejectReason};

/// The SPF/DKIM/DMARC checker.
pub struct Auth {
    authenticator: MessageAuthenticator,
    hostname: String,
}

/// What the checks found.
#[derive(Debug)]
pub struct AuthOutcome {
    pub verdict: Verdict,
    /// The `Authentication-Results:` header field, CRLF-terminated.
    pub header: String,
    /// `spf=pass dmarc=fail`, for the log line.
    pub summary: String,
}

impl Auth {
    pub fn new(authenticator: MessageAuthenticator, hostname: &str) -> Self {
        Self {
            authenticator,
            hostname: hostname.to_string(),
        }
    }

    /// Checks `message` (as received) sent by `sender` from `ip` after `helo`.
    pub async fn check(
        &self,
        mode: AuthMode,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        message: &[u8],
    ) -> AuthOutcome {
        let spf = self
            .authenticator
            .verify_spf(SpfParameters::verify(ip, helo, &self.hostname, sender))
            .await;
        let mut results = AuthenticationResults::new(&self.hostname)
            .with_spf_mailfrom_result(&spf, ip, sender, helo);
        let mut summary = format!("spf={:?}", spf.result()).to_ascii_lowercase();
        let mut verdict = Verdict::Accept;
        if let Some(parsed) = AuthenticatedMessage::parse(message) {
            let dkim = self.authenticator.verify_dkim(&parsed).await;
            let mail_from_domain = sender.rsplit_once('@').map_or(helo, |(_, d)| d).to_string();
            let dmarc = self
                .authenticator
                .verify_dmarc(DmarcParameters::new(
                    &parsed,
                    &dkim,
                    &mail_from_domain,
                    &spf,
                ))
                .await;
            results = results
                .with_dkim_results(&dkim, dmarc.domain())
                .with_dmarc_result(&dmarc);
            summary.push_str(&format!(
                " dmarc={} policy={:?}",
                dmarc_word(&dmarc.result()),
                dmarc.policy()
            ));
            // neither an aligned SPF pass nor an aligned DKIM pass: the DMARC verdict is Fail
            let failed = matches!(dmarc.result(), DmarcResult::Fail(_));
            if mode == AuthMode::Enforce && failed && dmarc.policy() == Policy::Reject {
                verdict = Verdict::Reject(RejectReason::AuthFailed);
            }
        }
        AuthOutcome {
            verdict,
            header: results.to_header(),
            summary,
        }
    }

    /// The host name results are recorded under.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }
}

fn dmarc_word(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

/// Removes `Authentication-Results:` fields that claim `hostname` from the header section.
pub fn strip_forged_results(message: &[u8], hostname: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    let mut pos = 0;
    let mut skipping = false;
    let prefix = b"authentication-results:";
    while pos < message.len() {
        let end = message[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(message.len(), |n| pos + n + 2);
        let line = &message[pos..end];
        if line == b"\r\n" {
            out.extend_from_slice(&message[pos..]);
            return out;
        }
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            skipping = line.len() > prefix.len()
                && line[..prefix.len()].eq_ignore_ascii_case(prefix)
                && String::from_utf8_lossy(&line[prefix.len()..])
                    .trim_start()
                    .to_ascii_lowercase()
                    .starts_with(&hostname.to_ascii_lowercase());
        }
        if !skipping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_results_for_our_name_are_removed_others_kept() {
        let msg = b"Authentication-Results: mx2.example.test; spf=pass\r\n\tdmarc=pass\r\nAuthentication-Results: other.example; spf=fail\r\nSubject: x\r\n\r\nAuthentication-Results: mx2.example.test; body\r\n";
        let out = String::from_utf8(strip_forged_results(msg, "mx2.example.test")).unwrap();
        assert_eq!(
            out,
            "Authentication-Results: other.example; spf=fail\r\nSubject: x\r\n\r\nAuthentication-Results: mx2.example.test; body\r\n"
        );
    }
}
