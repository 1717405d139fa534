//! What the HTTP providers ([`super::powerdns`], [`super::cloudflare`], [`super::route53`])
//! share: their client, their URLs, and reading an answer, so that a transport failure or a bad
//! base URL is reported the same way by each.

use std::time::Duration;

use mx_pod::trust::Trust;
use reqwest::{RequestBuilder, Response, Url};

use super::{DnsError, DnsErrorKind};

/// A provider's HTTP client: the API's certificate verified against `trust` (the BackupMx's:
/// the Mozilla roots and `spec.caBundle`), 15 s for a call.
pub fn client(trust: &Trust) -> reqwest::Client {
    trust
        .https()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("reqwest client builds")
}

/// `url` with `query` appended; one that does not parse is a [`DnsErrorKind::Protocol`] error
/// reading `invalid: CAUSE`.
pub fn url(
    provider: &'static str,
    url: &str,
    query: &[(&str, &str)],
    invalid: impl FnOnce() -> String,
) -> Result<Url, DnsError> {
    let mut url = Url::parse(url).map_err(|e| {
        DnsError::new(
            provider,
            DnsErrorKind::Protocol,
            format!("{}: {e}", invalid()),
        )
    })?;
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    Ok(url)
}

/// An answer, read whole.
pub struct Answer {
    pub status: u16,
    /// Its `Retry-After` header.
    pub retry_after: Option<String>,
    pub text: String,
}

/// Sends `req` and reads the whole answer, whatever its status; a failure to send or to read
/// is [`DnsError::transport`] (TLS or unreachable), with `what` naming the call.
pub async fn exchange(
    provider: &'static str,
    req: RequestBuilder,
    what: &str,
) -> Result<Answer, DnsError> {
    let resp = req
        .send()
        .await
        .map_err(|e| DnsError::transport(provider, what, e))?;
    let status = resp.status().as_u16();
    let retry_after = header(&resp, "retry-after");
    let text = resp
        .text()
        .await
        .map_err(|e| DnsError::transport(provider, what, e))?;
    Ok(Answer {
        status,
        retry_after,
        text,
    })
}

/// The header `name` of `resp`, when it is text.
pub fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers().get(name)?.to_str().ok().map(str::to_string)
}
