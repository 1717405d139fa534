//! Unit tests of [`super`] (the route53 provider), kept out of the provider's file.

use super::*;
use crate::dns::test_fixtures::{
    add_backup_mx_error, apex_error, assert_refused, assert_unknown_issuer, closed_port, mx,
    trusting, unknown_issuer_leaf,
};
use std::{
    sync::{Arc, Mutex},
    time::UNIX_EPOCH,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use testkit::{Leaf, TestCa};

const AKID: &str = "AKIDTESTROUTE53";
const SECRET: &str = "route53-test-secret/abc+def";
const TOKEN: &str = "session-token-for-tests";
const ZONE: &str = "Z0123456789ABC";

// --- SigV4 known answers (AWS's SigV4 test suite) ---

/// 2015-08-30T12:36:00Z, the suite's time.
fn suite_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_440_938_160)
}

fn suite_creds(token: Option<&str>) -> AwsCredentials {
    AwsCredentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        session_token: token.map(str::to_string),
    }
}

fn suite_sign(method: &str, url: &str, token: Option<&str>) -> Vec<(String, String)> {
    sign(
        &SignableParts {
            method,
            url,
            headers: &[],
            body: b"",
        },
        &suite_creds(token),
        "us-east-1",
        "service",
        suite_time(),
    )
    .unwrap()
}

fn get<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn suite_auth(signed_headers: &str, signature: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
         SignedHeaders={signed_headers}, Signature={signature}"
    )
}

#[test]
fn sigv4_get_vanilla() {
    let h = suite_sign("GET", "https://example.amazonaws.com/", None);
    assert_eq!(get(&h, "x-amz-date"), Some("20150830T123600Z"));
    assert_eq!(
        get(&h, "authorization"),
        Some(
            suite_auth(
                "host;x-amz-date",
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
            )
            .as_str()
        )
    );
    assert_eq!(get(&h, "x-amz-security-token"), None);
}

#[test]
fn sigv4_post_vanilla() {
    let h = suite_sign("POST", "https://example.amazonaws.com/", None);
    assert_eq!(
        get(&h, "authorization"),
        Some(
            suite_auth(
                "host;x-amz-date",
                "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
            )
            .as_str()
        )
    );
}

#[test]
fn sigv4_get_vanilla_with_session_token() {
    let token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
    let h = suite_sign("GET", "https://example.amazonaws.com/", Some(token));
    assert_eq!(get(&h, "x-amz-security-token"), Some(token));
    assert_eq!(
        get(&h, "authorization"),
        Some(
            suite_auth(
                "host;x-amz-date;x-amz-security-token",
                "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"
            )
            .as_str()
        )
    );
}

#[test]
fn sigv4_get_vanilla_query_order_key_case() {
    let h = suite_sign(
        "GET",
        "https://example.amazonaws.com/?Param2=value2&Param1=value1",
        None,
    );
    assert_eq!(
        get(&h, "authorization"),
        Some(
            suite_auth(
                "host;x-amz-date",
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
            )
            .as_str()
        )
    );
}

// --- the fake Route 53 ---

#[derive(Clone)]
struct FakeSet {
    /// As Route 53 writes it (trailing dot, octal escapes).
    name: String,
    rtype: String,
    ttl: u32,
    values: Vec<String>,
    alias: bool,
}

struct Fake {
    secret: String,
    token: Option<String>,
    sets: Vec<FakeSet>,
    /// Answer everything with `Throttling`.
    throttle: bool,
    /// Refuse change batches with this `InvalidChangeBatch` message.
    reject: Option<String>,
    /// Record sets per list answer at most.
    page_size: usize,
    list_calls: u32,
    change_bodies: Vec<String>,
}

type Shared = Arc<Mutex<Fake>>;

fn aws_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "text/xml")],
        format!(
            "<?xml version=\"1.0\"?>\n<ErrorResponse xmlns=\"{XMLNS}\"><Error><Type>Sender</Type>\
             <Code>{code}</Code><Message>{}</Message></Error><RequestId>r-1</RequestId></ErrorResponse>",
            quick_xml::escape::escape(message)
        ),
    )
        .into_response()
}

fn invalid_batch(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        format!(
            "<?xml version=\"1.0\"?>\n<InvalidChangeBatch xmlns=\"{XMLNS}\"><Messages>\
             <Message>{}</Message></Messages><RequestId>r-2</RequestId></InvalidChangeBatch>",
            quick_xml::escape::escape(message)
        ),
    )
        .into_response()
}

/// Checks the SigV4 `Authorization` header: its shape, the scope, the session token, and the
/// signature itself, recomputed with the fake's secret. The error is AWS's code and message
/// (for a 403).
fn verify(
    fake: &Fake,
    method: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), (String, String)> {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let forbidden = |code: &str, msg: &str| (code.to_string(), msg.to_string());
    let auth = h("authorization")
        .ok_or_else(|| forbidden("MissingAuthenticationToken", "Missing Authentication Token"))?;
    let date = h("x-amz-date").ok_or_else(|| forbidden("IncompleteSignature", "no x-amz-date"))?;
    let malformed = || {
        forbidden(
            "IncompleteSignature",
            &format!("malformed Authorization: {auth}"),
        )
    };
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 Credential=")
        .ok_or_else(malformed)?;
    let (credential, rest) = rest.split_once(", SignedHeaders=").ok_or_else(malformed)?;
    let (signed, signature) = rest.split_once(", Signature=").ok_or_else(malformed)?;
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5
        || scope[1] != &date[..8]
        || scope[2..] != ["us-east-1", "route53", "aws4_request"]
        || signature.len() != 64
        || !signature.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(malformed());
    }
    if scope[0] != AKID {
        return Err(forbidden(
            "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        ));
    }
    let signed: Vec<&str> = signed.split(';').collect();
    if !signed.contains(&"host") || !signed.contains(&"x-amz-date") {
        return Err(malformed());
    }
    if let Some(token) = &fake.token
        && (h("x-amz-security-token") != Some(token) || !signed.contains(&"x-amz-security-token"))
    {
        return Err(forbidden(
            "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        ));
    }
    let time = chrono::NaiveDateTime::parse_from_str(date, "%Y%m%dT%H%M%SZ")
        .map_err(|_| malformed())?
        .and_utc()
        .timestamp();
    let others: Vec<(&str, &str)> = signed
        .iter()
        .filter(|n| !matches!(**n, "x-amz-date" | "x-amz-security-token"))
        .map(|n| (*n, h(n).unwrap_or_default()))
        .collect();
    let url = format!(
        "https://{}{}",
        h("host").unwrap_or_default(),
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let expected = sign(
        &SignableParts {
            method,
            url: &url,
            headers: &others,
            body,
        },
        &AwsCredentials {
            access_key_id: AKID.into(),
            secret_access_key: fake.secret.clone(),
            session_token: h("x-amz-security-token").map(str::to_string),
        },
        "us-east-1",
        "route53",
        UNIX_EPOCH + Duration::from_secs(time as u64),
    )
    .expect("fake signs");
    if get(&expected, "authorization") != Some(auth) {
        return Err(forbidden(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        ));
    }
    Ok(())
}

/// Route 53's listing order: by labels reversed, then by type.
fn order(name: &str) -> Vec<String> {
    decode_name(name)
        .split('.')
        .rev()
        .map(str::to_string)
        .collect()
}

fn list(fake: &mut Fake, uri: &Uri) -> Response {
    fake.list_calls += 1;
    let url = Url::parse(&format!("http://fake{uri}")).unwrap();
    let q: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
    if q.get("maxitems").map(String::as_str) != Some("300") {
        return aws_error(
            StatusCode::BAD_REQUEST,
            "InvalidInput",
            "fake: expected maxitems=300",
        );
    }
    let Some(start) = q.get("name").filter(|n| n.ends_with('.')) else {
        return aws_error(
            StatusCode::BAD_REQUEST,
            "InvalidInput",
            "fake: expected name=NAME.",
        );
    };
    let start_key = (order(start), q.get("type").cloned().unwrap_or_default());
    let mut sets = fake.sets.clone();
    sets.sort_by_key(|s| (order(&s.name), s.rtype.clone()));
    let from: Vec<&FakeSet> = sets
        .iter()
        .filter(|s| (order(&s.name), s.rtype.clone()) >= start_key)
        .collect();
    let page = &from[..from.len().min(fake.page_size)];
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <ListResourceRecordSetsResponse xmlns=\"{XMLNS}\"><ResourceRecordSets>"
    );
    for s in page {
        x.push_str(&format!(
            "<ResourceRecordSet><Name>{}</Name><Type>{}</Type>",
            quick_xml::escape::escape(&s.name),
            s.rtype
        ));
        if s.alias {
            x.push_str(
                "<AliasTarget><HostedZoneId>Z2FDTNDATAQYW2</HostedZoneId>\
                 <DNSName>d111111abcdef8.cloudfront.net.</DNSName>\
                 <EvaluateTargetHealth>false</EvaluateTargetHealth></AliasTarget>",
            );
        } else {
            x.push_str(&format!("<TTL>{}</TTL><ResourceRecords>", s.ttl));
            for v in &s.values {
                x.push_str(&format!(
                    "<ResourceRecord><Value>{}</Value></ResourceRecord>",
                    quick_xml::escape::escape(v)
                ));
            }
            x.push_str("</ResourceRecords>");
        }
        x.push_str("</ResourceRecordSet>");
    }
    x.push_str("</ResourceRecordSets>");
    if let Some(next) = from.get(page.len()) {
        x.push_str(&format!(
            "<IsTruncated>true</IsTruncated><NextRecordName>{}</NextRecordName>\
             <NextRecordType>{}</NextRecordType>",
            quick_xml::escape::escape(&next.name),
            next.rtype
        ));
    } else {
        x.push_str("<IsTruncated>false</IsTruncated>");
    }
    x.push_str("<MaxItems>300</MaxItems></ListResourceRecordSetsResponse>");
    (StatusCode::OK, [("content-type", "text/xml")], x).into_response()
}

fn change(fake: &mut Fake, body: &[u8]) -> Response {
    let body = std::str::from_utf8(body).expect("UTF-8 body");
    fake.change_bodies.push(body.to_string());
    if let Some(msg) = &fake.reject {
        return invalid_batch(msg);
    }
    let doc = roxmltree::Document::parse(body).expect("well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "ChangeResourceRecordSetsRequest");
    assert_eq!(root.tag_name().namespace(), Some(XMLNS));
    let changes =
        child(child(root, "ChangeBatch").expect("ChangeBatch"), "Changes").expect("Changes");
    let mut sets = fake.sets.clone();
    for c in changes.children().filter(|n| n.is_element()) {
        assert_eq!(c.tag_name().name(), "Change");
        let action = child_text(c, "Action").expect("Action");
        let set = child(c, "ResourceRecordSet").expect("ResourceRecordSet");
        let name = child_text(set, "Name").expect("Name").to_string();
        let rtype = child_text(set, "Type").expect("Type").to_string();
        let ttl: Option<u32> = child_text(set, "TTL").map(|t| t.parse().expect("TTL"));
        let mut values: Vec<String> = set
            .descendants()
            .filter(|n| n.tag_name().name() == "Value")
            .map(|n| n.text().unwrap_or_default().to_string())
            .collect();
        let at = sets
            .iter()
            .position(|s| decode_name(&s.name) == decode_name(&name) && s.rtype == rtype);
        let what = format!("[name='{name}', type='{rtype}']");
        match action {
            "UPSERT" => {
                let Some(ttl) = ttl.filter(|_| !values.is_empty()) else {
                    return invalid_batch(&format!("{what} needs a TTL and values"));
                };
                let n = values.len();
                values.sort();
                values.dedup();
                if values.len() != n {
                    return invalid_batch(&format!("Duplicate Resource Record in {what}"));
                }
                let new = FakeSet {
                    name,
                    rtype,
                    ttl,
                    values,
                    alias: false,
                };
                match at {
                    Some(i) => sets[i] = new,
                    None => sets.push(new),
                }
            }
            "DELETE" => {
                let Some(i) = at else {
                    return invalid_batch(&format!(
                        "Tried to delete resource record set {what} but it was not found"
                    ));
                };
                let mut held = sets[i].values.clone();
                held.sort();
                values.sort();
                if Some(sets[i].ttl) != ttl || held != values {
                    return invalid_batch(&format!(
                        "Tried to delete resource record set {what} but the values provided \
                         do not match the current values"
                    ));
                }
                sets.remove(i);
            }
            other => panic!("unexpected action {other}"),
        }
    }
    fake.sets = sets;
    (
        StatusCode::OK,
        format!(
            "<?xml version=\"1.0\"?>\n<ChangeResourceRecordSetsResponse xmlns=\"{XMLNS}\">\
             <ChangeInfo><Id>/change/C2682N5HXP0BZ4</Id><Status>PENDING</Status>\
             <SubmittedAt>2026-01-01T00:00:00.000Z</SubmittedAt></ChangeInfo>\
             </ChangeResourceRecordSetsResponse>"
        ),
    )
        .into_response()
}

async fn handle(
    State(s): State<Shared>,
    method: axum::http::Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut fake = s.lock().unwrap();
    if let Err((code, message)) = verify(&fake, method.as_str(), &uri, &headers, &body) {
        return aws_error(StatusCode::FORBIDDEN, &code, &message);
    }
    if fake.throttle {
        return aws_error(StatusCode::BAD_REQUEST, "Throttling", "Rate exceeded");
    }
    let Some((zone, rest)) = uri
        .path()
        .strip_prefix("/2013-04-01/hostedzone/")
        .and_then(|p| p.split_once('/'))
    else {
        return aws_error(
            StatusCode::BAD_REQUEST,
            "InvalidInput",
            "fake: unexpected path",
        );
    };
    if zone != ZONE {
        return aws_error(
            StatusCode::NOT_FOUND,
            "NoSuchHostedZone",
            &format!("No hosted zone found with ID: {zone}"),
        );
    }
    match (method.as_str(), rest) {
        ("GET", "rrset") => list(&mut fake, &uri),
        ("POST", "rrset/") => change(&mut fake, &body),
        _ => aws_error(
            StatusCode::BAD_REQUEST,
            "InvalidInput",
            "fake: unexpected request",
        ),
    }
}

fn set(name: &str, rtype: &str, ttl: u32, values: &[&str]) -> FakeSet {
    FakeSet {
        name: name.into(),
        rtype: rtype.into(),
        ttl,
        values: values.iter().map(|v| v.to_string()).collect(),
        alias: false,
    }
}

/// Where a fake listens (HTTPS) and the trust its certificate chains to.
struct Endpoint {
    url: String,
    trust: Trust,
}

/// A fake holding example.com's primary MX and SPF, a wildcard, and more names after it,
/// served over HTTPS with a certificate from a test CA; and where to reach it, trusting
/// that CA.
async fn serve(token: Option<&str>) -> (Shared, Endpoint) {
    let ca = TestCa::new("route53 fake CA");
    let (shared, url) = serve_with(token, &ca.issue(&["127.0.0.1", "localhost"])).await;
    (
        shared,
        Endpoint {
            url,
            trust: trusting(&ca),
        },
    )
}

/// The fake of [`serve`] presenting `leaf`; and its URL.
async fn serve_with(token: Option<&str>, leaf: &Leaf) -> (Shared, String) {
    let mut alias = set("www.example.com.", "A", 0, &[]);
    alias.alias = true;
    let fake = Fake {
        secret: SECRET.into(),
        token: token.map(str::to_string),
        sets: vec![
            set("example.com.", "MX", 3600, &["10 mx1.example.com."]),
            set("example.com.", "TXT", 3600, &["\"v=spf1 mx -all\""]),
            set("example.com.", "NS", 172800, &["ns-1.awsdns-00.com."]),
            set("\\052.example.com.", "A", 300, &["192.0.2.9"]),
            set("mx1.example.com.", "A", 300, &["192.0.2.1"]),
            alias,
        ],
        throttle: false,
        reject: None,
        page_size: 300,
        list_calls: 0,
        change_bodies: Vec::new(),
    };
    let shared = Arc::new(Mutex::new(fake));
    let app = Router::new().fallback(handle).with_state(shared.clone());
    let https = testkit::serve_https(app, leaf).await;
    (shared, https.url)
}

fn client(endpoint: &Endpoint, secret: &str, token: Option<&str>) -> Route53 {
    Route53::new(
        Some(&endpoint.url),
        "",
        &format!("/hostedzone/{ZONE}"),
        AKID,
        secret,
        token,
        &endpoint.trust,
    )
}

fn txt(name: &str, text: &str, ttl: u32) -> Record {
    Record::new(name, ttl, RData::Txt(text.into()))
}

#[tokio::test]
async fn add_read_remove_keeps_the_primary() {
    let (fake, endpoint) = serve(Some(TOKEN)).await;
    fake.lock().unwrap().page_size = 1; // every listing paginates
    let r53 = client(&endpoint, SECRET, Some(TOKEN));
    let claim_text = "heritage=backupmx,v=1,owner=mail/example,type=MX,data=20 mx2.example.com.";
    let add = Changes {
        add: vec![
            mx("example.com", 20, "mx2.example.com", 300),
            txt("_backupmx.example.com", claim_text, 300),
            Record::new(
                "mx2.example.com",
                300,
                RData::A("192.0.2.2".parse().unwrap()),
            ),
        ],
        remove: vec![],
    };
    r53.apply("example.com", &add).await.unwrap();
    {
        let f = fake.lock().unwrap();
        assert_eq!(f.change_bodies.len(), 1, "one change batch");
        let body = &f.change_bodies[0];
        assert_eq!(body.matches("<Action>UPSERT</Action>").count(), 3, "{body}");
        assert!(
            body.contains("<Value>10 mx1.example.com.</Value><"),
            "{body}"
        );
    }

    let apex = r53.records("example.com", "example.com.").await.unwrap();
    // the backup's MX joins the RRset with the RRset's TTL; NS is not a managed type
    assert_eq!(
        apex,
        vec![
            mx("example.com", 10, "mx1.example.com", 3600),
            mx("example.com", 20, "mx2.example.com", 3600),
            txt("example.com", "v=spf1 mx -all", 3600),
        ]
    );
    assert_eq!(
        r53.records("example.com", "_backupmx.example.com")
            .await
            .unwrap(),
        vec![txt("_backupmx.example.com", claim_text, 300)]
    );
    assert_eq!(
        r53.records("example.com", "*.example.com").await.unwrap(),
        vec![Record::new(
            "*.example.com",
            300,
            RData::A("192.0.2.9".parse().unwrap())
        )]
    );

    // applying again: nothing to change, no batch
    r53.apply("example.com", &add).await.unwrap();
    assert_eq!(fake.lock().unwrap().change_bodies.len(), 1);

    let remove = Changes {
        add: vec![],
        remove: add.add.clone(),
    };
    r53.apply("example.com", &remove).await.unwrap();
    {
        let f = fake.lock().unwrap();
        assert_eq!(f.change_bodies.len(), 2);
        let body = &f.change_bodies[1];
        assert_eq!(body.matches("<Action>UPSERT</Action>").count(), 1, "{body}");
        assert_eq!(body.matches("<Action>DELETE</Action>").count(), 2, "{body}");
    }
    assert_eq!(
        r53.records("example.com", "example.com").await.unwrap(),
        vec![
            mx("example.com", 10, "mx1.example.com", 3600),
            txt("example.com", "v=spf1 mx -all", 3600),
        ]
    );
    assert!(
        r53.records("example.com", "_backupmx.example.com")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        r53.records("example.com", "mx2.example.com")
            .await
            .unwrap()
            .is_empty()
    );
    // removing what is absent is skipped
    r53.apply("example.com", &remove).await.unwrap();
    assert_eq!(fake.lock().unwrap().change_bodies.len(), 2);
}

#[tokio::test]
async fn bad_secret_is_auth() {
    let (_fake, endpoint) = serve(None).await;
    let e = apex_error(&client(&endpoint, "not-the-secret", None)).await;
    assert_eq!(e.kind, DnsErrorKind::Auth);
    assert!(e.message.contains("SignatureDoesNotMatch"), "{e}");
    assert!(e.message.contains("HTTP 403"), "{e}");

    // a session token is expected but not sent
    let (_fake, endpoint) = serve(Some(TOKEN)).await;
    let e = apex_error(&client(&endpoint, SECRET, None)).await;
    assert_eq!(e.kind, DnsErrorKind::Auth);
    assert!(e.message.contains("InvalidClientTokenId"), "{e}");
}

#[tokio::test]
async fn throttling_is_rate_limited() {
    let (fake, endpoint) = serve(None).await;
    fake.lock().unwrap().throttle = true;
    let e = apex_error(&client(&endpoint, SECRET, None)).await;
    assert_eq!(e.kind, DnsErrorKind::RateLimited(None));
    assert!(e.message.contains("Rate exceeded"), "{e}");
}

#[tokio::test]
async fn unknown_zone_is_zone_not_found() {
    let (_fake, endpoint) = serve(None).await;
    let r53 = Route53::new(
        Some(&endpoint.url),
        "us-east-1",
        "ZNOPE",
        AKID,
        SECRET,
        None,
        &endpoint.trust,
    );
    let e = apex_error(&r53).await;
    assert_eq!(e.kind, DnsErrorKind::ZoneNotFound);
    assert!(
        e.message.contains("No hosted zone found with ID: ZNOPE"),
        "{e}"
    );
}

#[tokio::test]
async fn refused_batch_is_rejected_with_the_message() {
    let (fake, endpoint) = serve(None).await;
    fake.lock().unwrap().reject =
        Some("RRSet of type CNAME with DNS name mx2.example.com. is not permitted".into());
    let e = add_backup_mx_error(&client(&endpoint, SECRET, None)).await;
    assert_eq!(e.kind, DnsErrorKind::Rejected);
    assert!(
        e.message
            .contains("InvalidChangeBatch: RRSet of type CNAME"),
        "{e}"
    );
}

#[tokio::test]
async fn alias_sets_are_not_touched() {
    let (fake, endpoint) = serve(None).await;
    let r53 = client(&endpoint, SECRET, None);
    assert!(
        r53.records("example.com", "www.example.com")
            .await
            .unwrap()
            .is_empty()
    );
    let e = r53
        .apply(
            "example.com",
            &Changes {
                add: vec![Record::new(
                    "www.example.com",
                    300,
                    RData::A("192.0.2.3".parse().unwrap()),
                )],
                remove: vec![],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, DnsErrorKind::Rejected);
    assert!(e.message.contains("alias"), "{e}");
    assert!(fake.lock().unwrap().change_bodies.is_empty());
}

#[tokio::test]
async fn unreachable_endpoint() {
    let addr = closed_port().await;
    let endpoint = Endpoint {
        url: format!("https://{addr}"),
        trust: Trust::webpki(),
    };
    assert_refused(&apex_error(&client(&endpoint, SECRET, None)).await);
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_a_tls_error() {
    let (leaf, known) = unknown_issuer_leaf();
    let (fake, url) = serve_with(None, &leaf).await;
    let endpoint = Endpoint {
        url,
        trust: trusting(&known),
    };
    let e = add_backup_mx_error(&client(&endpoint, SECRET, None)).await;
    assert_unknown_issuer(&e);
    assert!(e.message.contains("GET rrset?name=example.com."), "{e}");
    let f = fake.lock().unwrap();
    assert_eq!(
        (f.list_calls, f.change_bodies.len()),
        (0, 0),
        "no request got through"
    );
}

#[test]
fn decodes_names() {
    assert_eq!(decode_name("\\052.Example.com."), "*.example.com");
    assert_eq!(decode_name("a\\100b.example.com."), "a@b.example.com");
    assert_eq!(decode_name("plain.example.com"), "plain.example.com");
    assert_eq!(decode_name("odd\\"), "odd\\");
}

#[test]
fn parses_errors() {
    assert_eq!(
        parse_error(
            "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>\
             <Message>Rate exceeded</Message></Error></ErrorResponse>"
        ),
        Some(("Throttling".into(), "Rate exceeded".into()))
    );
    assert_eq!(
        parse_error(
            "<InvalidChangeBatch xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\">\
             <Messages><Message>a</Message><Message>b</Message></Messages></InvalidChangeBatch>"
        ),
        Some(("InvalidChangeBatch".into(), "a; b".into()))
    );
    assert_eq!(parse_error("not xml"), None);
    let e = api_error(
        400,
        None,
        "<ErrorResponse><Error><Code>PriorRequestNotComplete</Code><Message>m</Message></Error></ErrorResponse>",
        "x",
    );
    assert_eq!(e.kind, DnsErrorKind::RateLimited(None));
    let e = api_error(429, Some("3"), "", "x");
    assert_eq!(
        e.kind,
        DnsErrorKind::RateLimited(Some(Duration::from_secs(3)))
    );
}

fn batch_change(
    action: &'static str,
    name: &str,
    rtype: RecordType,
    ttl: u32,
    values: &[&str],
) -> Change {
    Change {
        action,
        name: name.into(),
        rtype,
        ttl,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

/// The apex's MX RRset upserted with the primary's and the backup's MX.
fn both_mx() -> Change {
    batch_change(
        "UPSERT",
        "example.com",
        RecordType::Mx,
        3600,
        &["10 mx1.example.com.", "20 mx2.example.com."],
    )
}

#[test]
fn plans_upserts_and_exact_deletes() {
    let current = vec![
        RrSet {
            name: "example.com".into(),
            rtype: "MX".into(),
            ttl: 3600,
            values: vec!["10 mx1.example.com.".into()],
            special: false,
        },
        RrSet {
            name: "_backupmx.example.com".into(),
            rtype: "TXT".into(),
            ttl: 600,
            // held split in two character-strings
            values: vec!["\"heritage=\" \"backupmx\"".into()],
            special: false,
        },
    ];
    let changes = Changes {
        add: vec![mx("example.com", 20, "mx2.example.com", 300)],
        remove: vec![txt("_backupmx.example.com", "heritage=backupmx", 300)],
    };
    assert_eq!(
        plan_changes(&current, &changes).unwrap(),
        vec![
            batch_change(
                "DELETE",
                "_backupmx.example.com",
                RecordType::Txt,
                600,
                &["\"heritage=\" \"backupmx\""]
            ),
            both_mx(),
        ]
    );
    let xml = change_batch_xml(&plan_changes(&current, &changes).unwrap());
    assert!(
        xml.contains("<Value>&quot;heritage=&quot; &quot;backupmx&quot;</Value>"),
        "{xml}"
    );
    assert!(xml.contains(&format!(
        "<ChangeResourceRecordSetsRequest xmlns=\"{XMLNS}\">"
    )));
}

#[test]
fn change_batch_is_the_documented_xml_with_text_escaped() {
    let xml = change_batch_xml(&[
        both_mx(),
        batch_change(
            "DELETE",
            "_backupmx.example.com",
            RecordType::Txt,
            300,
            &[&RData::Txt("a<b & \"c\" 'd'>".into()).presentation()],
        ),
    ]);
    assert_eq!(
        xml,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <ChangeResourceRecordSetsRequest xmlns=\"{XMLNS}\"><ChangeBatch>\
             <Comment>backupmx</Comment><Changes>\
             <Change><Action>UPSERT</Action><ResourceRecordSet><Name>example.com.</Name>\
             <Type>MX</Type><TTL>3600</TTL><ResourceRecords>\
             <ResourceRecord><Value>10 mx1.example.com.</Value></ResourceRecord>\
             <ResourceRecord><Value>20 mx2.example.com.</Value></ResourceRecord>\
             </ResourceRecords></ResourceRecordSet></Change>\
             <Change><Action>DELETE</Action><ResourceRecordSet>\
             <Name>_backupmx.example.com.</Name><Type>TXT</Type><TTL>300</TTL>\
             <ResourceRecords><ResourceRecord>\
             <Value>&quot;a&lt;b &amp; \\&quot;c\\&quot; &apos;d&apos;&gt;&quot;</Value>\
             </ResourceRecord></ResourceRecords></ResourceRecordSet></Change>\
             </Changes></ChangeBatch></ChangeResourceRecordSetsRequest>"
        )
    );
    // and it reads back as the text it carries
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let values: Vec<&str> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "Value")
        .filter_map(|n| n.text())
        .collect();
    assert_eq!(values[2], "\"a<b & \\\"c\\\" 'd'>\"");
    assert_eq!(
        RData::parse(RecordType::Txt, values[2]),
        Some(RData::Txt("a<b & \"c\" 'd'>".into()))
    );
}

#[test]
fn long_txt_values_are_split() {
    let long = "b".repeat(256);
    let v = RData::Txt(long.clone()).presentation();
    assert_eq!(v, format!("\"{}\" \"b\"", "b".repeat(255)));
    assert_eq!(RData::parse(RecordType::Txt, &v), Some(RData::Txt(long)));
    assert_eq!(
        RData::Mx(20, "mx2.example.com".into()).presentation(),
        "20 mx2.example.com."
    );
}

#[test]
fn credentials_debug_is_redacted() {
    let s = format!("{:?}", suite_creds(Some("tok")));
    assert!(!s.contains("wJalr") && !s.contains("tok\""), "{s}");
}
