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

use std::{collections::HashMap, sync::Mutex, time::Duration};

use mx_pod::trust::Trust;
use reqwest::{Method, Url};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::{
    Changes, DnsError, DnsErrorKind, DnsProvider, RData, Record, RecordType, normalize_name, txt,
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
            http: trust
                .https()
                .timeout(Duration::from_secs(15))
                .build()
                .expect("reqwest client builds"),
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
        let mut url = Url::parse(&format!("{}{path}", self.base)).map_err(|e| {
            DnsError::new(
                NAME,
                DnsErrorKind::Protocol,
                format!("invalid API URL {}{path}: {e}", self.base),
            )
        })?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
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
        let resp = req
            .send()
            .await
            .map_err(|e| DnsError::transport(NAME, what, e))?;
        let status = resp.status().as_u16();
        let retry = header(&resp, "retry-after");
        let text = resp
            .text()
            .await
            .map_err(|e| DnsError::transport(NAME, what, e))?;
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

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers().get(name)?.to_str().ok().map(str::to_string)
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
mod tests {
    use super::*;
    use std::sync::Arc;

    use axum::{
        Json, Router,
        extract::{Path, Query, State},
        http::{HeaderMap, StatusCode},
        response::{IntoResponse, Response},
        routing::{get, post},
    };
    use testkit::{Leaf, TestCa};

    const TOKEN: &str = "cf-test-token";
    const ZONE_ID: &str = "023e105f4ecef8ad9ca31a8372d0c353";

    #[derive(Clone)]
    struct Stored {
        id: String,
        rtype: String,
        name: String,
        content: String,
        ttl: u32,
        priority: Option<u16>,
    }

    #[derive(Default)]
    struct Fake {
        records: Vec<Stored>,
        next_id: u32,
        /// Answer everything with 429 and `Retry-After: 7`.
        rate_limited: bool,
        /// Records per page at most (whatever `per_page` asks).
        page_size: usize,
        zone_lookups: u32,
        batches: u32,
        /// Bodies of the batch calls.
        batch_bodies: Vec<Value>,
    }

    type Shared = Arc<Mutex<Fake>>;

    fn cf_error(status: StatusCode, code: i64, message: &str) -> Response {
        (
            status,
            Json(json!({
                "success": false, "errors": [{"code": code, "message": message}],
                "messages": [], "result": null,
            })),
        )
            .into_response()
    }

    /// Checks the token and the rate limit; `Some` is the answer to give instead.
    fn gate(fake: &Fake, headers: &HeaderMap) -> Option<Response> {
        if headers.get("authorization").and_then(|v| v.to_str().ok())
            != Some(&format!("Bearer {TOKEN}"))
        {
            return Some(cf_error(
                StatusCode::UNAUTHORIZED,
                10000,
                "Authentication error",
            ));
        }
        if fake.rate_limited {
            let mut r = cf_error(
                StatusCode::TOO_MANY_REQUESTS,
                971,
                "Please wait and consider throttling your request speed",
            );
            r.headers_mut()
                .insert("retry-after", "7".parse().expect("header value"));
            return Some(r);
        }
        None
    }

    fn unknown_zone(id: &str) -> Response {
        cf_error(
            StatusCode::BAD_REQUEST,
            7003,
            &format!(
                "Could not route to /zones/{id}/dns_records, perhaps your object identifier is invalid?"
            ),
        )
    }

    async fn zones(
        State(s): State<Shared>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        let mut fake = s.lock().unwrap();
        if let Some(r) = gate(&fake, &headers) {
            return r;
        }
        fake.zone_lookups += 1;
        let result: Vec<Value> = if q.get("name").map(String::as_str) == Some("example.com") {
            vec![json!({"id": ZONE_ID, "name": "example.com", "status": "active"})]
        } else {
            vec![]
        };
        let n = result.len();
        Json(json!({
            "success": true, "errors": [], "messages": [], "result": result,
            "result_info": {"page": 1, "per_page": 20, "count": n, "total_count": n, "total_pages": 1},
        }))
        .into_response()
    }

    async fn list(
        State(s): State<Shared>,
        headers: HeaderMap,
        Path(id): Path<String>,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        let fake = s.lock().unwrap();
        if let Some(r) = gate(&fake, &headers) {
            return r;
        }
        if id != ZONE_ID {
            return unknown_zone(&id);
        }
        if q.get("per_page").map(String::as_str) != Some("100") {
            return cf_error(StatusCode::BAD_REQUEST, 1, "fake: expected per_page=100");
        }
        let Some(name) = q.get("name") else {
            return cf_error(StatusCode::BAD_REQUEST, 1, "fake: expected name=");
        };
        let page: usize = q.get("page").map_or(1, |p| p.parse().unwrap());
        let all: Vec<&Stored> = fake.records.iter().filter(|r| &r.name == name).collect();
        let size = fake.page_size.clamp(1, 100);
        let total_pages = all.len().div_ceil(size).max(1);
        let result: Vec<Value> = all
            .iter()
            .skip((page - 1) * size)
            .take(size)
            .map(|r| {
                let mut v = json!({
                    "id": r.id, "zone_id": ZONE_ID, "zone_name": "example.com",
                    "type": r.rtype, "name": r.name, "content": r.content, "ttl": r.ttl,
                    "proxied": false, "proxiable": false, "comment": null, "tags": [],
                });
                if let Some(p) = r.priority {
                    v["priority"] = json!(p);
                }
                v
            })
            .collect();
        let n = result.len();
        Json(json!({
            "success": true, "errors": [], "messages": [], "result": result,
            "result_info": {"page": page, "per_page": size, "count": n,
                            "total_count": all.len(), "total_pages": total_pages},
        }))
        .into_response()
    }

    async fn batch(
        State(s): State<Shared>,
        headers: HeaderMap,
        Path(id): Path<String>,
        Json(body): Json<Value>,
    ) -> Response {
        let mut fake = s.lock().unwrap();
        if let Some(r) = gate(&fake, &headers) {
            return r;
        }
        if id != ZONE_ID {
            return unknown_zone(&id);
        }
        fake.batches += 1;
        fake.batch_bodies.push(body.clone());
        let obj = body.as_object().expect("batch body is an object");
        for k in obj.keys() {
            assert!(
                ["deletes", "posts"].contains(&k.as_str()),
                "unexpected batch key {k}"
            );
        }
        // all or nothing: validate, then apply to a copy
        let mut records = fake.records.clone();
        for d in body["deletes"].as_array().cloned().unwrap_or_default() {
            let id = d["id"].as_str().expect("delete has an id");
            let before = records.len();
            records.retain(|r| r.id != id);
            if records.len() == before {
                return cf_error(StatusCode::BAD_REQUEST, 81044, "Record does not exist.");
            }
        }
        let mut created = Vec::new();
        for p in body["posts"].as_array().cloned().unwrap_or_default() {
            let rtype = p["type"].as_str().expect("type").to_string();
            let priority = p["priority"].as_u64().map(|v| v as u16);
            assert!(
                rtype != "MX" || priority.is_some(),
                "MX posted without priority"
            );
            assert!(
                p["proxied"].as_bool() != Some(true),
                "records must not be proxied"
            );
            let content = p["content"].as_str().expect("content").to_string();
            let name = p["name"].as_str().expect("name").to_string();
            if records
                .iter()
                .any(|r| r.rtype == rtype && r.name == name && r.content == content)
            {
                return cf_error(
                    StatusCode::BAD_REQUEST,
                    81058,
                    "An identical record already exists.",
                );
            }
            fake.next_id += 1;
            let stored = Stored {
                id: format!("rec{:04}", fake.next_id),
                rtype,
                name,
                content,
                ttl: p["ttl"].as_u64().expect("ttl") as u32,
                priority,
            };
            created.push(json!({"id": stored.id}));
            records.push(stored);
        }
        fake.records = records;
        Json(json!({
            "success": true, "errors": [], "messages": [],
            "result": {"deletes": body["deletes"], "posts": created},
        }))
        .into_response()
    }

    fn stored(
        fake: &mut Fake,
        rtype: &str,
        name: &str,
        content: &str,
        ttl: u32,
        prio: Option<u16>,
    ) {
        fake.next_id += 1;
        fake.records.push(Stored {
            id: format!("rec{:04}", fake.next_id),
            rtype: rtype.into(),
            name: name.into(),
            content: content.into(),
            ttl,
            priority: prio,
        });
    }

    /// Where a fake listens (HTTPS) and the trust its certificate chains to.
    struct Api {
        base: String,
        trust: Trust,
    }

    impl Api {
        fn client(&self, token: &str, zone_id: Option<&str>) -> Cloudflare {
            Cloudflare::new(Some(&self.base), token, zone_id, &self.trust)
        }
    }

    /// The trust of a client that knows `ca` (the Mozilla roots and it, as `spec.caBundle`).
    fn trusting(ca: &TestCa) -> Trust {
        Trust::with_pem(ca.pem().as_bytes(), "test CA").unwrap()
    }

    /// A fake holding example.com's primary MX, an SPF record stored bare and one stored quoted,
    /// and an automatic-TTL A record, served over HTTPS with a certificate from a test CA; and
    /// where to reach it, trusting that CA.
    async fn serve() -> (Shared, Api) {
        let ca = TestCa::new("cloudflare fake CA");
        let (shared, base) = serve_with(&ca.issue(&["127.0.0.1", "localhost"])).await;
        (
            shared,
            Api {
                base,
                trust: trusting(&ca),
            },
        )
    }

    /// The fake of [`serve`] presenting `leaf`; and its base URL.
    async fn serve_with(leaf: &Leaf) -> (Shared, String) {
        let mut fake = Fake {
            page_size: 100,
            ..Default::default()
        };
        stored(
            &mut fake,
            "MX",
            "example.com",
            "mx1.example.com",
            3600,
            Some(10),
        );
        stored(
            &mut fake,
            "TXT",
            "example.com",
            "v=spf1 mx -all",
            3600,
            None,
        );
        stored(
            &mut fake,
            "TXT",
            "example.com",
            "\"google-site-verification=abc\"",
            3600,
            None,
        );
        stored(&mut fake, "A", "mx1.example.com", "192.0.2.1", 1, None);
        let shared = Arc::new(Mutex::new(fake));
        let app = Router::new()
            .route("/client/v4/zones", get(zones))
            .route("/client/v4/zones/{id}/dns_records", get(list))
            .route("/client/v4/zones/{id}/dns_records/batch", post(batch))
            .with_state(shared.clone());
        let https = testkit::serve_https(app, leaf).await;
        (shared, format!("{}/client/v4", https.url))
    }

    fn mx(name: &str, prio: u16, host: &str, ttl: u32) -> Record {
        Record::new(name, ttl, RData::Mx(prio, host.into()))
    }

    fn txt(name: &str, text: &str) -> Record {
        Record::new(name, 300, RData::Txt(text.into()))
    }

    #[tokio::test]
    async fn add_then_read_back() {
        let (fake, api) = serve().await;
        let cf = api.client(TOKEN, None);
        let backup = mx("example.com", 20, "mx2.example.com", 3600);
        let claim = txt(
            "_backupmx.example.com",
            "heritage=backupmx,v=1,owner=mail/example,type=MX,data=20 mx2.example.com.",
        );
        let changes = Changes {
            add: vec![backup.clone(), claim.clone()],
            remove: vec![],
        };
        cf.apply("example.com.", &changes).await.unwrap();

        let at_apex = cf.records("example.com", "example.com").await.unwrap();
        assert!(at_apex.contains(&mx("example.com", 10, "mx1.example.com", 3600)));
        assert!(at_apex.contains(&backup));
        assert!(at_apex.contains(&Record::new(
            "example.com",
            3600,
            RData::Txt("v=spf1 mx -all".into())
        )));
        assert!(at_apex.contains(&Record::new(
            "example.com",
            3600,
            RData::Txt("google-site-verification=abc".into())
        )));
        assert_eq!(
            cf.records("example.com", "_backupmx.example.com")
                .await
                .unwrap(),
            vec![claim.clone()]
        );
        // automatic TTL reads as 300
        assert_eq!(
            cf.records("example.com", "mx1.example.com").await.unwrap(),
            vec![Record::new(
                "mx1.example.com",
                300,
                RData::A("192.0.2.1".parse().unwrap())
            )]
        );

        {
            let f = fake.lock().unwrap();
            assert_eq!(f.batches, 1, "one batch call");
            assert_eq!(f.zone_lookups, 1, "zone id cached");
            let body = &f.batch_bodies[0];
            assert_eq!(body["deletes"], json!([]));
            let posts = body["posts"].as_array().unwrap();
            assert_eq!(posts.len(), 2);
            assert_eq!(
                posts[0],
                json!({"type": "MX", "name": "example.com", "content": "mx2.example.com",
                       "priority": 20, "ttl": 3600})
            );
            assert_eq!(posts[1]["type"], "TXT");
            assert_eq!(
                posts[1]["content"],
                "\"heritage=backupmx,v=1,owner=mail/example,type=MX,data=20 mx2.example.com.\""
            );
        }

        // applying again changes nothing and calls nothing
        cf.apply("example.com", &changes).await.unwrap();
        assert_eq!(fake.lock().unwrap().batches, 1);
    }

    #[tokio::test]
    async fn remove_leaves_the_other_members() {
        let (fake, api) = serve().await;
        let cf = api.client(TOKEN, Some(ZONE_ID));
        let backup = mx("example.com", 20, "mx2.example.com", 3600);
        cf.apply(
            "example.com",
            &Changes {
                add: vec![backup.clone()],
                remove: vec![],
            },
        )
        .await
        .unwrap();
        // the SPF record is stored bare, the verification quoted: both found by their text
        cf.apply(
            "example.com",
            &Changes {
                add: vec![],
                remove: vec![
                    backup.clone(),
                    txt("example.com", "v=spf1 mx -all"),
                    txt("example.com", "google-site-verification=abc"),
                ],
            },
        )
        .await
        .unwrap();
        let at_apex = cf.records("example.com", "example.com").await.unwrap();
        assert_eq!(
            at_apex,
            vec![mx("example.com", 10, "mx1.example.com", 3600)]
        );
        {
            let f = fake.lock().unwrap();
            assert_eq!(f.batches, 2);
            assert_eq!(f.zone_lookups, 0, "configured zone id used");
            assert_eq!(f.batch_bodies[1]["deletes"].as_array().unwrap().len(), 3);
            assert_eq!(f.batch_bodies[1]["posts"], json!([]));
        }
        // removing what is absent is skipped: no call at all
        cf.apply(
            "example.com",
            &Changes {
                add: vec![],
                remove: vec![backup],
            },
        )
        .await
        .unwrap();
        assert_eq!(fake.lock().unwrap().batches, 2);
    }

    #[tokio::test]
    async fn reads_every_page() {
        let (fake, api) = serve().await;
        {
            let mut f = fake.lock().unwrap();
            f.page_size = 2;
            for i in 0..5 {
                stored(
                    &mut f,
                    "TXT",
                    "many.example.com",
                    &format!("\"t{i}\""),
                    300,
                    None,
                );
            }
        }
        let cf = api.client(TOKEN, None);
        let got = cf.records("example.com", "many.example.com").await.unwrap();
        let texts: Vec<String> = got
            .iter()
            .map(|r| match &r.data {
                RData::Txt(t) => t.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(texts, ["t0", "t1", "t2", "t3", "t4"]);
    }

    #[tokio::test]
    async fn wrong_token_is_auth() {
        let (_fake, api) = serve().await;
        let cf = api.client("wrong", None);
        let e = cf.records("example.com", "example.com").await.unwrap_err();
        assert_eq!(e.kind, DnsErrorKind::Auth);
        assert!(e.message.contains("Authentication error"), "{e}");
        assert!(e.message.contains("HTTP 401"), "{e}");
    }

    #[tokio::test]
    async fn rate_limit_carries_retry_after() {
        let (fake, api) = serve().await;
        fake.lock().unwrap().rate_limited = true;
        let cf = api.client(TOKEN, Some(ZONE_ID));
        let e = cf
            .apply(
                "example.com",
                &Changes {
                    add: vec![mx("example.com", 20, "mx2.example.com", 300)],
                    remove: vec![],
                },
            )
            .await
            .unwrap_err();
        assert_eq!(
            e.kind,
            DnsErrorKind::RateLimited(Some(Duration::from_secs(7)))
        );
        assert!(e.message.contains("throttling"), "{e}");
    }

    #[tokio::test]
    async fn unknown_zone_is_zone_not_found() {
        let (_fake, api) = serve().await;
        let cf = api.client(TOKEN, None);
        let e = cf
            .records("nope.example", "nope.example")
            .await
            .unwrap_err();
        assert_eq!(e.kind, DnsErrorKind::ZoneNotFound);
        assert!(e.message.contains("nope.example"), "{e}");

        // a configured id the API does not know: code 7003
        let cf = api.client(TOKEN, Some("0000"));
        let e = cf.records("example.com", "example.com").await.unwrap_err();
        assert_eq!(e.kind, DnsErrorKind::ZoneNotFound);
        assert!(e.message.contains("Could not route"), "{e}");
    }

    #[tokio::test]
    async fn refused_batch_is_rejected_with_the_message() {
        let (fake, api) = serve().await;
        let cf = api.client(TOKEN, None);
        // the primary's MX posted again: refused as a duplicate, nothing applied
        let primary = mx("example.com", 10, "mx1.example.com", 3600);
        let url = cf
            .url(&format!("/zones/{ZONE_ID}/dns_records/batch"), &[])
            .unwrap();
        let body = json!({"deletes": [{"id": "rec0002"}], "posts": [post_body(&primary)]});
        let e = cf
            .call::<Value>(Method::POST, url, Some(&body), "POST batch")
            .await
            .unwrap_err();
        assert_eq!(e.kind, DnsErrorKind::Rejected);
        assert!(e.message.contains("identical record already exists"), "{e}");
        assert!(e.message.contains("81058"), "{e}");
        assert_eq!(fake.lock().unwrap().records.len(), 4, "nothing applied");
    }

    #[test]
    fn maps_errors() {
        let m = |code, message: &str| Message {
            code,
            message: message.into(),
        };
        let e = api_error(502, None, &[], "<html>Bad gateway</html>", "GET x");
        assert_eq!(e.kind, DnsErrorKind::Unreachable);
        assert_eq!(e.message, "GET x: HTTP 502: <html>Bad gateway</html>");
        let e = api_error(200, None, &[m(1004, "DNS Validation Error")], "", "POST x");
        assert_eq!(e.kind, DnsErrorKind::Rejected);
        assert_eq!(
            e.message,
            "POST x: HTTP 200: DNS Validation Error (code 1004)"
        );
        let e = api_error(400, None, &[m(1001, "Invalid zone identifier")], "", "x");
        assert_eq!(e.kind, DnsErrorKind::ZoneNotFound);
        let e = api_error(400, None, &[m(9109, "Invalid access token")], "", "x");
        assert_eq!(e.kind, DnsErrorKind::Auth);
        let e = api_error(403, None, &[m(10000, "Authentication error")], "", "x");
        assert_eq!(e.kind, DnsErrorKind::Auth);
    }

    #[tokio::test]
    async fn unreachable_api() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let cf = Cloudflare::new(
            Some(&format!("https://{addr}/client/v4")),
            TOKEN,
            None,
            &Trust::webpki(),
        );
        let e = cf.records("example.com", "example.com").await.unwrap_err();
        assert_eq!(e.kind, DnsErrorKind::Unreachable);
        assert!(e.message.contains("Connection refused"), "{e}");
    }

    #[tokio::test]
    async fn a_certificate_from_an_unknown_ca_is_a_tls_error() {
        let known = TestCa::new("the CA in spec.caBundle");
        let unknown = TestCa::new("another CA");
        let (fake, base) = serve_with(&unknown.issue(&["127.0.0.1", "localhost"])).await;
        let cf = Cloudflare::new(Some(&base), TOKEN, None, &trusting(&known));
        let e = cf.records("example.com", "example.com").await.unwrap_err();
        assert_eq!(e.kind, DnsErrorKind::Tls, "{e}");
        assert_eq!(e.kind.reason(), "ProviderTlsFailed");
        assert!(
            e.message
                .contains("invalid peer certificate: UnknownIssuer"),
            "{e}"
        );
        assert!(e.message.contains("GET zones?name=example.com"), "{e}");
        assert_eq!(
            fake.lock().unwrap().zone_lookups,
            0,
            "no request got through"
        );
    }

    #[tokio::test]
    async fn a_certificate_for_another_name_is_a_tls_error() {
        let ca = TestCa::new("cloudflare fake CA");
        let (fake, base) = serve_with(&ca.issue(&["api.cloudflare.test"])).await;
        let cf = Cloudflare::new(Some(&base), TOKEN, None, &trusting(&ca));
        let e = cf.records("example.com", "example.com").await.unwrap_err();
        assert_eq!(e.kind, DnsErrorKind::Tls, "{e}");
        assert!(
            e.message
                .contains("certificate not valid for name \"127.0.0.1\"")
                && e.message.contains("api.cloudflare.test"),
            "{e}"
        );
        assert_eq!(
            fake.lock().unwrap().zone_lookups,
            0,
            "no request got through"
        );
    }

    #[test]
    fn maps_cloudflare_records() {
        let r = CfRecord {
            id: "x".into(),
            rtype: "MX".into(),
            name: "Example.com".into(),
            content: "MX2.example.com".into(),
            ttl: 1,
            priority: Some(20),
        };
        assert_eq!(
            to_record(&r),
            Some(mx("example.com", 20, "mx2.example.com", 300))
        );
        let r = CfRecord {
            rtype: "SRV".into(),
            ..r
        };
        assert_eq!(to_record(&r), None);
    }

    #[test]
    fn long_txt_is_split() {
        let long = "a".repeat(300);
        let c = super::super::txt::presentation(&long);
        assert_eq!(c, format!("\"{}\" \"{}\"", "a".repeat(255), "a".repeat(45)));
        assert_eq!(super::super::txt::unquote(&c), long);
        assert_eq!(
            super::super::txt::presentation("say \"hi\""),
            "\"say \\\"hi\\\"\""
        );
        assert_eq!(super::super::txt::presentation(""), "\"\"");
    }
}
