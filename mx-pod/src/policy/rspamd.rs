//! rspamd scan of each message before it is queued (once per message, whatever the number of
//! recipients), over rspamd's HTTP protocol (`POST /checkv2` with the envelope in headers).
//!
//! | rspamd action | outcome |
//! |---|---|
//! | `reject` | `550 5.7.1` at end of DATA |
//! | `soft reject`, `greylist` | `451 4.7.1` (the sender retries) |
//! | `add header`, `rewrite subject` | queued with `X-Spam: Yes` (and the subject rspamd asks for) |
//! | `no action` | queued |
//!
//! Every scanned message gets `X-Spam-Score` and `X-Spam-Status`; such headers already in the
//! message are removed first, so a sender cannot pass its own "clean" verdict to the primary.
//! When rspamd cannot answer in time, `fail_mode` decides: `tempfail` (`451 4.7.1`) or `accept`.

use std::{net::IpAddr, time::Duration};

use serde::Deserialize;
use tracing::{debug, warn};

use super::Verdict;
use crate::{
    config::{FailMode, RspamdConfig},
    reply::RejectReason,
};

/// Headers mx-pod owns: removed from incoming messages before its own are added.
const OWN_HEADERS: [&str; 5] = [
    "x-spam",
    "x-spam-score",
    "x-spam-status",
    "x-spam-flag",
    "x-spam-action",
];

/// A configured rspamd.
pub struct Rspamd {
    http: reqwest::Client,
    url: String,
    fail_mode: FailMode,
    timeout: Duration,
}

/// The envelope and connection facts rspamd scores with.
pub struct ScanRequest<'a> {
    pub client_ip: IpAddr,
    pub helo: &'a str,
    pub sender: &'a str,
    pub recipients: Vec<&'a str>,
    pub queue_id: &'a str,
    /// Negotiated TLS version, when the session is encrypted.
    pub tls_version: Option<&'a str>,
    pub hostname: &'a str,
}

/// rspamd's answer (the fields used).
#[derive(Debug, Deserialize)]
pub struct CheckResult {
    pub action: String,
    #[serde(default)]
    pub score: f64,
    #[serde(default)]
    pub required_score: f64,
    /// The new subject for `rewrite subject`.
    #[serde(default)]
    pub subject: Option<String>,
}

/// What to do with the message.
#[derive(Debug)]
pub struct Scan {
    pub verdict: Verdict,
    /// The result, when rspamd answered.
    pub result: Option<CheckResult>,
}

impl Rspamd {
    /// An https `url` is verified against `trust` (the Mozilla roots and `trust.ca_file`).
    pub fn new(config: &RspamdConfig, trust: &crate::trust::Trust) -> Self {
        let timeout = config.timeout.0;
        Self {
            http: trust
                .https()
                .timeout(timeout)
                .connect_timeout(timeout)
                .build()
                .expect("reqwest client builds"),
            url: format!("{}/checkv2", config.url.trim_end_matches('/')),
            fail_mode: config.fail_mode,
            timeout,
        }
    }

    /// Scans `message` (as received, before our headers).
    pub async fn scan(&self, req: &ScanRequest<'_>, message: &[u8]) -> Scan {
        match self.ask(req, message).await {
            Ok(result) => Scan {
                verdict: verdict_of(&result.action),
                result: Some(result),
            },
            Err(e) => {
                warn!(client = %req.client_ip, queue_id = req.queue_id, error = %e,
                    fail_mode = ?self.fail_mode, "rspamd unavailable");
                Scan {
                    verdict: match self.fail_mode {
                        FailMode::Tempfail => Verdict::Reject(RejectReason::FilterUnavailable),
                        FailMode::Accept => Verdict::Accept,
                    },
                    result: None,
                }
            }
        }
    }

    async fn ask(&self, req: &ScanRequest<'_>, message: &[u8]) -> Result<CheckResult, String> {
        let mut r = self
            .http
            .post(&self.url)
            .header("IP", req.client_ip.to_string())
            .header("Helo", header_safe(req.helo))
            .header("From", header_safe(req.sender))
            .header("Queue-Id", req.queue_id)
            .header("MTA-Name", header_safe(req.hostname))
            .header("Pass", "all");
        for rcpt in &req.recipients {
            r = r.header("Rcpt", header_safe(rcpt));
        }
        if let Some(v) = req.tls_version {
            r = r.header("TLS-Version", v);
        }
        let resp = tokio::time::timeout(self.timeout, r.body(message.to_vec()).send())
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
            .map_err(|e| format!("POST {}: {}", self.url, crate::trust::error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("POST {}: HTTP {}", self.url, resp.status()));
        }
        let result: CheckResult = resp
            .json()
            .await
            .map_err(|e| format!("POST {}: unreadable answer: {e}", self.url))?;
        debug!(queue_id = req.queue_id, action = %result.action, score = result.score, "rspamd");
        Ok(result)
    }
}

/// The verdict for an rspamd action.
pub fn verdict_of(action: &str) -> Verdict {
    match action {
        "reject" => Verdict::Reject(RejectReason::Spam),
        "soft reject" | "greylist" => Verdict::Reject(RejectReason::SpamTempfail),
        "add header" | "rewrite subject" | "no action" => Verdict::Accept,
        other => {
            warn!(action = other, "unknown rspamd action; accepting");
            Verdict::Accept
        }
    }
}

/// A value safe for an HTTP header (no control characters, bounded).
fn header_safe(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(512).collect()
}

/// The message to queue: our own spam headers replaced by the scan's, the subject rewritten
/// when rspamd asks for it.
pub fn annotate(message: &[u8], result: &CheckResult) -> Vec<u8> {
    let header_end = header_section_end(message);
    let (head, body) = message.split_at(header_end);
    let spam = matches!(result.action.as_str(), "add header" | "rewrite subject");
    let mut out = Vec::with_capacity(message.len() + 200);
    if spam {
        out.extend_from_slice(b"X-Spam: Yes\r\n");
    }
    out.extend_from_slice(format!("X-Spam-Score: {:.2}\r\n", result.score).as_bytes());
    out.extend_from_slice(
        format!(
            "X-Spam-Status: {}, score={:.2} required={:.2} action=\"{}\"\r\n",
            if spam { "Yes" } else { "No" },
            result.score,
            result.required_score,
            header_safe(&result.action)
        )
        .as_bytes(),
    );
    let new_subject = result
        .subject
        .as_deref()
        .filter(|_| result.action == "rewrite subject");
    for field in header_fields(head) {
        let name = field_name(field).to_ascii_lowercase();
        if OWN_HEADERS.contains(&name.as_str()) {
            continue;
        }
        if name == "subject"
            && let Some(subject) = new_subject
        {
            out.extend_from_slice(format!("Subject: {}\r\n", header_safe(subject)).as_bytes());
            continue;
        }
        out.extend_from_slice(field);
    }
    out.extend_from_slice(body);
    out
}

/// Offset just past the header section's last field (the empty line stays with the body).
fn header_section_end(message: &[u8]) -> usize {
    let mut pos = 0;
    while pos < message.len() {
        if message[pos..].starts_with(b"\r\n") {
            return pos;
        }
        match message[pos..].windows(2).position(|w| w == b"\r\n") {
            Some(n) => pos += n + 2,
            None => return message.len(),
        }
    }
    pos
}

/// The header fields of a header section, each with its folded continuation lines and CRLF.
fn header_fields(head: &[u8]) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < head.len() {
        let end = head[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(head.len(), |n| pos + n + 2);
        let next_is_continuation = head.get(end).is_some_and(|b| *b == b' ' || *b == b'\t');
        if !next_is_continuation {
            fields.push(&head[start..end]);
            start = end;
        }
        pos = end;
    }
    fields
}

fn field_name(field: &[u8]) -> String {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(0);
    String::from_utf8_lossy(&field[..colon]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(action: &str) -> CheckResult {
        CheckResult {
            action: action.into(),
            score: 6.3,
            required_score: 15.0,
            subject: Some("*** SPAM *** hello".into()),
        }
    }

    #[test]
    fn actions_map_to_replies() {
        assert_eq!(verdict_of("reject"), Verdict::Reject(RejectReason::Spam));
        assert_eq!(
            verdict_of("soft reject"),
            Verdict::Reject(RejectReason::SpamTempfail)
        );
        assert_eq!(
            verdict_of("greylist"),
            Verdict::Reject(RejectReason::SpamTempfail)
        );
        assert_eq!(verdict_of("add header"), Verdict::Accept);
        assert_eq!(verdict_of("no action"), Verdict::Accept);
    }

    #[test]
    fn spoofed_spam_headers_are_replaced_and_subject_rewritten() {
        let msg = b"X-Spam: No\r\nSubject: hello\r\nX-Spam-Status: No,\r\n\tscore=-100\r\nTo: a@b\r\n\r\nX-Spam: body line stays\r\n";
        let out = annotate(msg, &result("rewrite subject"));
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("X-Spam: Yes\r\nX-Spam-Score: 6.30\r\n"),
            "{text}"
        );
        assert!(text.contains("Subject: *** SPAM *** hello\r\n"), "{text}");
        assert!(!text.contains("score=-100"), "{text}");
        assert!(!text.contains("X-Spam: No"), "{text}");
        assert!(
            text.ends_with("To: a@b\r\n\r\nX-Spam: body line stays\r\n"),
            "{text}"
        );
    }

    #[test]
    fn ham_gets_status_only() {
        let out = annotate(b"Subject: hi\r\n\r\nbody\r\n", &result("no action"));
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("X-Spam: Yes"));
        assert!(text.contains("X-Spam-Status: No, score=6.30"));
        assert!(text.ends_with("Subject: hi\r\n\r\nbody\r\n"));
    }
}
