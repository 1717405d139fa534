//! Unit tests of [`super`] (the cloudflare provider), kept out of the provider's file.

use super::*;
use crate::dns::test_fixtures::{
    add_backup_mx_error, apex_error, assert_refused, assert_unknown_issuer, closed_port, mx,
    trusting, unknown_issuer_leaf,
};
use std::{sync::Arc, time::Duration};

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

fn stored(fake: &mut Fake, rtype: &str, name: &str, content: &str, ttl: u32, prio: Option<u16>) {
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
    let e = apex_error(&cf).await;
    assert_eq!(e.kind, DnsErrorKind::Auth);
    assert!(e.message.contains("Authentication error"), "{e}");
    assert!(e.message.contains("HTTP 401"), "{e}");
}

#[tokio::test]
async fn rate_limit_carries_retry_after() {
    let (fake, api) = serve().await;
    fake.lock().unwrap().rate_limited = true;
    let e = add_backup_mx_error(&api.client(TOKEN, Some(ZONE_ID))).await;
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
    let e = apex_error(&cf).await;
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
    let addr = closed_port().await;
    let cf = Cloudflare::new(
        Some(&format!("https://{addr}/client/v4")),
        TOKEN,
        None,
        &Trust::webpki(),
    );
    assert_refused(&apex_error(&cf).await);
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_a_tls_error() {
    let (leaf, known) = unknown_issuer_leaf();
    let (fake, base) = serve_with(&leaf).await;
    let cf = Cloudflare::new(Some(&base), TOKEN, None, &trusting(&known));
    let e = apex_error(&cf).await;
    assert_unknown_issuer(&e);
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
    let e = apex_error(&cf).await;
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
