//! Cloudflare, through its v4 API (`Authorization: Bearer` API token).
//!
//! Finds the zone's id by name (`GET /zones?name=ZONE`, cached) unless it is configured; reads
//! `GET /zones/{id}/dns_records?name=NAME&per_page=100` (every page); writes one
//! `POST /zones/{id}/dns_records/batch` carrying the deletes (by record id) and the posts, which
//! Cloudflare applies atomically: all of them or none. Cloudflare keeps records one by one (each
//! with its id), not as RRsets, so adding or removing one record never rewrites the other members
//! of its RRset (the primary's MX is not touched). The ids to delete are read just before the
//! batch; a record deleted concurrently in between makes the whole batch fail (nothing applied),
//! and the next reconcile pass re-reads.
//!
//! Cloudflare stores TXT content either quoted (`"text"`) or bare (`text`): records are compared
//! by their unquoted text, and TXT content is written in presentation form ([`txt::presentation`]:
//! quoted character-strings of at most 255 bytes). A TTL of 1 means "automatic" at Cloudflare and is read as 300.

use std::{collections::HashMap, sync::Mutex};

use mx_pod::trust::Trust;
use reqwest::{Method, Url};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::{
    Changes, DnsError, DnsErrorKind, DnsProvider, RData, Record, RecordType, http, normalize_name,
    txt,
};

const NAME: &str = "cloudflare";
/// The public API's base.
pub const DEFAULT_API_BASE: &str = "https://api.cloudflare.com/client/v4";
/// Records per page asked for when listing.
const PER_PAGE: u32 = 100;
/// Pages read at most for one name (10,000 records).
const MAX_PAGES: u32 = 100;
/// The TTL Cloudflare calls "automatic".
const AUTO_TTL: u32 = 1;
/// What an automatic TTL is read as.
const AUTO_TTL_SECONDS: u32 = 300;

/// A Cloudflare account's zones, reached with an API token.
pub struct Cloudflare {
    http: reqwest::Client,
    base: String,
    token: String,
    /// The configured zone id: used for every zone.
    zone_id: Option<String>,
    /// Zone ids looked up by name.
    zone_ids: Mutex<HashMap<String, String>>,
}

/// Every answer's envelope.
#[derive(Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    success: bool,
    result: Option<T>,
    result_info: Option<ResultInfo>,
}

/// The part of the envelope that tells failures.
#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize, Clone, Copy, Debug)]
struct ResultInfo {
    #[serde(default)]
    page: u32,
    #[serde(default)]
    total_pages: u32,
}

#[derive(Deserialize)]
struct ZoneInfo {
    id: String,
    name: String,
}

/// One record as Cloudflare lists it.
#[derive(Deserialize)]
struct CfRecord {
    id: String,
    #[serde(rename = "type")]
    rtype: String,
    name: String,
    content: String,
    #[serde(default)]
    ttl: u32,
    priority: Option<u16>,
}

impl Cloudflare {
    /// `api_base` defaults to [`DEFAULT_API_BASE`]; `zone_id`, when given, is used for every zone
    /// (else each zone's id is looked up by name once, which needs the token's `Zone:Read`).
    /// The API's certificate is verified against `trust` (the BackupMx's: the Mozilla roots and
    /// `spec.caBundle`, for an API base behind a private CA).
    pub fn new(
        api_base: Option<&str>,
        api_token: &str,
        zone_id: Option<&str>,
        trust: &Trust,
    ) -> Self {
        Self {
            http: http::client(trust),
            base: api_base
                .unwrap_or(DEFAULT_API_BASE)
                .trim_end_matches('/')
                .to_string(),
            token: api_token.to_string(),
            zone_id: zone_id.map(str::to_string),
            zone_ids: Mutex::new(HashMap::new()),
        }
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<Url, DnsError> {
        let url = format!("{}{path}", self.base);
        http::url(NAME, &url, query, || format!("invalid API URL {url}"))
    }

    /// One API call: the `result` (and `result_info`) of a successful answer, else the error.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        what: &str,
    ) -> Result<(T, Option<ResultInfo>), DnsError> {
        let mut req = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let http::Answer {
            status,
            retry_after: retry,
            text,
        } = http::exchange(NAME, req, what).await?;
        let st: Option<Status> = serde_json::from_str(&text).ok();
        match st {
            None if (200..300).contains(&status) => {
                return Err(DnsError::new(
                    NAME,
                    DnsErrorKind::Protocol,
                    format!("{what}: HTTP {status}: not a JSON answer"),
                ));
            }
            Some(st) if !st.success || !(200..300).contains(&status) => {
                return Err(api_error(status, retry.as_deref(), &st.errors, &text, what));
            }
            None => return Err(api_error(status, retry.as_deref(), &[], &text, what)),
            Some(_) => {}
        }
        let env: Envelope<T> = serde_json::from_str(&text)
            .map_err(|e| DnsError::new(NAME, DnsErrorKind::Protocol, format!("{what}: {e}")))?;
        match env.result {
            Some(r) if env.success => Ok((r, env.result_info)),
            _ => Err(DnsError::new(
                NAME,
                DnsErrorKind::Protocol,
                format!("{what}: answer without a result"),
            )),
        }
    }

    /// The zone's id: the configured one, else looked up by name (once).
    async fn zone_id(&self, zone: &str) -> Result<String, DnsError> {
        if let Some(id) = &self.zone_id {
            return Ok(id.clone());
        }
        let zone = normalize_name(zone);
        if let Some(id) = self.zone_ids.lock().expect("not poisoned").get(&zone) {
            return Ok(id.clone());
        }
        let url = self.url("/zones", &[("name", &zone)])?;
        let (zones, _): (Vec<ZoneInfo>, _) = self
            .call(Method::GET, url, None, &format!("GET zones?name={zone}"))
            .await?;
        let id = zones
            .into_iter()
            .find(|z| normalize_name(&z.name) == zone)
            .map(|z| z.id)
            .ok_or_else(|| {
                DnsError::new(
                    NAME,
                    DnsErrorKind::ZoneNotFound,
                    format!("zone {zone} not found (or not visible to the API token)"),
                )
            })?;
        self.zone_ids
            .lock()
            .expect("not poisoned")
            .insert(zone, id.clone());
        Ok(id)
    }

    /// The records at `name` with their Cloudflare ids, every page read.
    async fn list(&self, zone_id: &str, name: &str) -> Result<Vec<(String, Record)>, DnsError> {
        let name = normalize_name(name);
        let per_page = PER_PAGE.to_string();
        let mut out = Vec::new();
        let mut page = 1u32;
        loop {
            let page_s = page.to_string();
            let mut query = vec![("name", name.as_str()), ("per_page", per_page.as_str())];
            if page > 1 {
                query.push(("page", page_s.as_str()));
            }
            let url = self.url(&format!("/zones/{zone_id}/dns_records"), &query)?;
            let (records, info): (Vec<CfRecord>, _) = self
                .call(
                    Method::GET,
                    url,
                    None,
                    &format!("GET dns_records?name={name} (page {page})"),
                )
                .await?;
            let got = records.len();
            out.extend(
                records
                    .into_iter()
                    .filter_map(|r| Some((r.id.clone(), to_record(&r)?)))
                    .filter(|(_, r)| r.name == name),
            );
            match info {
                Some(i) if i.total_pages > i.page.max(page) && got > 0 && page < MAX_PAGES => {
                    page += 1
                }
                _ => break,
            }
        }
        Ok(out)
    }
}

/// A failed call: the HTTP status decides the kind, Cloudflare's error codes refine it, and its
/// messages are kept.
fn api_error(
    status: u16,
    retry_after: Option<&str>,
    errors: &[Message],
    body: &str,
    what: &str,
) -> DnsError {
    let detail = if errors.is_empty() {
        body.trim().chars().take(300).collect::<String>()
    } else {
        errors
            .iter()
            .map(|e| format!("{} (code {})", e.message, e.code))
            .collect::<Vec<_>>()
            .join("; ")
    };
    // a 2xx with `success: false` is a refusal like a 400
    let kind_status = if (200..300).contains(&status) {
        400
    } else {
        status
    };
    let mut e = DnsError::from_http(NAME, kind_status, retry_after, "", what);
    e.message = format!("{what}: HTTP {status}: {detail}");
    if errors.iter().any(|m| matches!(m.code, 7003 | 1001)) {
        // "Could not route to /zones/..., perhaps your object identifier is invalid?",
        // "Invalid zone identifier"
        e.kind = DnsErrorKind::ZoneNotFound;
    } else if errors
        .iter()
        .any(|m| matches!(m.code, 9103 | 9106 | 9109 | 10000))
    {
        // unknown key, missing headers, invalid token, "Authentication error"
        e.kind = DnsErrorKind::Auth;
    }
    e
}

/// A listed record as a [`Record`], if of a type the operator handles.
fn to_record(r: &CfRecord) -> Option<Record> {
    let rtype = RecordType::parse(&r.rtype)?;
    let data = match rtype {
        RecordType::Mx => RData::Mx(r.priority.unwrap_or(0), normalize_name(&r.content)),
        _ => RData::parse(rtype, &r.content)?,
    };
    let ttl = if r.ttl == AUTO_TTL {
        AUTO_TTL_SECONDS
    } else {
        r.ttl
    };
    Some(Record::new(&r.name, ttl, data))
}

/// The body creating `r`.
fn post_body(r: &Record) -> Value {
    let mut v = json!({
        "type": r.record_type().as_str(),
        "name": r.name,
        "ttl": r.ttl,
    });
    match &r.data {
        RData::Mx(priority, host) => {
            v["content"] = json!(host);
            v["priority"] = json!(priority);
        }
        RData::Txt(text) => v["content"] = json!(txt::presentation(text)),
        RData::A(a) => {
            v["content"] = json!(a.to_string());
            v["proxied"] = json!(false);
        }
        RData::Aaaa(a) => {
            v["content"] = json!(a.to_string());
            v["proxied"] = json!(false);
        }
        RData::Cname(host) => {
            v["content"] = json!(host);
            v["proxied"] = json!(false);
        }
    }
    v
}

#[async_trait::async_trait]
impl DnsProvider for Cloudflare {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn records(&self, zone: &str, name: &str) -> Result<Vec<Record>, DnsError> {
        let id = self.zone_id(zone).await?;
        Ok(self
            .list(&id, name)
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    async fn apply(&self, zone: &str, changes: &Changes) -> Result<(), DnsError> {
        if changes.is_empty() {
            return Ok(());
        }
        let id = self.zone_id(zone).await?;
        let mut current: Vec<(String, Record)> = Vec::new();
        for name in changes.names() {
            current.extend(self.list(&id, &name).await?);
        }
        // every stored copy of a record to remove (TXT may be stored both quoted and bare)
        let mut deletes: Vec<&str> = current
            .iter()
            .filter(|(_, c)| changes.remove.iter().any(|r| r.same(c)))
            .map(|(id, _)| id.as_str())
            .collect();
        deletes.sort_unstable();
        deletes.dedup();
        let mut posts: Vec<&Record> = Vec::new();
        for a in &changes.add {
            let present = current
                .iter()
                .any(|(id, c)| c.same(a) && !deletes.contains(&id.as_str()));
            if !present && !posts.iter().any(|p| p.same(a)) {
                posts.push(a);
            }
        }
        if deletes.is_empty() && posts.is_empty() {
            return Ok(());
        }
        let body = json!({
            "deletes": deletes.iter().map(|id| json!({ "id": id })).collect::<Vec<_>>(),
            "posts": posts.iter().map(|r| post_body(r)).collect::<Vec<_>>(),
        });
        let url = self.url(&format!("/zones/{id}/dns_records/batch"), &[])?;
        let _: (Value, _) = self
            .call(
                Method::POST,
                url,
                Some(&body),
                &format!(
                    "POST dns_records/batch for zone {} ({} deletes, {} posts)",
                    normalize_name(zone),
                    deletes.len(),
                    posts.len()
                ),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "cloudflare_tests.rs"]
mod tests;
