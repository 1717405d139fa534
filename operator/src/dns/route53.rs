//! Amazon Route 53, through its REST API (version 2013-04-01), every request signed with AWS
//! Signature Version 4 (service `route53`, by the `aws-sigv4` crate).
//!
//! Reads `GET /2013-04-01/hostedzone/{id}/rrset?name=NAME.&maxitems=300` (record sets listed in
//! order from NAME on; only NAME's are kept); writes one
//! `POST /2013-04-01/hostedzone/{id}/rrset/` `ChangeResourceRecordSetsRequest` carrying an
//! `UPSERT` of every touched RRset that keeps members (with its existing TTL) and a `DELETE`
//! (with the exact current values and TTL) of every RRset that becomes empty. Route 53 applies a
//! change batch atomically: all of it or none. The API replaces whole RRsets, so a change is
//! read-modify-write: a concurrent edit of the same RRset between our read and our write can be
//! lost (the next reconcile pass re-reads and repairs ours); a `DELETE` whose values no longer
//! match fails the whole batch instead.
//!
//! Alias records and record sets with a routing policy (`SetIdentifier`) are not simple RRsets:
//! they are not read as records, and a change touching their name and type is refused.

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, SystemTime},
};

use mx_pod::trust::Trust;
use reqwest::{Method, Url};

use super::{
    Changes, DnsError, DnsErrorKind, DnsProvider, RData, Record, RecordType, http, normalize_name,
};

const NAME: &str = "route53";
/// The public API's endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://route53.amazonaws.com";
/// The region Route 53 requests are signed for.
pub const DEFAULT_REGION: &str = "us-east-1";
/// The signing name of the service.
const SERVICE: &str = "route53";
/// The API's XML namespace.
const XMLNS: &str = "https://route53.amazonaws.com/doc/2013-04-01/";
/// Record sets asked for per list call.
const MAX_ITEMS: &str = "300";
/// List calls at most for one name.
const MAX_PAGES: usize = 20;

/// AWS credentials (an access key, and a session token for temporary ones).
#[derive(Clone)]
pub struct AwsCredentials {
    /// `AKIA...` (or `ASIA...` for temporary credentials).
    pub access_key_id: String,
    pub secret_access_key: String,
    /// The session token of temporary credentials (sent as `x-amz-security-token`).
    pub session_token: Option<String>,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The parts of an HTTP request that SigV4 signs.
#[derive(Debug, Clone, Copy)]
pub struct SignableParts<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The full URL, as sent (scheme, host, port, path, query).
    pub url: &'a str,
    /// Headers to sign besides `host`, `x-amz-date` and `x-amz-security-token` (which the
    /// signature adds itself).
    pub headers: &'a [(&'a str, &'a str)],
    /// The body exactly as sent (hashed into the signature).
    pub body: &'a [u8],
}

/// Signs a request with AWS SigV4 at `time`, for `region` and `service`: returns the headers to
/// add to it (`x-amz-date`, `authorization`, and `x-amz-security-token` with a session token).
pub fn sign(
    req: &SignableParts<'_>,
    creds: &AwsCredentials,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    use aws_sigv4::{
        http_request::{SignableBody, SignableRequest, SigningSettings},
        sign::v4,
    };
    let identity = aws_credential_types::Credentials::new(
        &creds.access_key_id,
        &creds.secret_access_key,
        creds.session_token.clone(),
        None,
        "backupmx",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let signable = SignableRequest::new(
        req.method,
        req.url,
        req.headers.iter().copied(),
        SignableBody::Bytes(req.body),
    )
    .map_err(|e| format!("signing {} {}: {e}", req.method, req.url))?;
    let (instructions, _signature) = aws_sigv4::http_request::sign(signable, &params)
        .map_err(|e| format!("signing {} {}: {e}", req.method, req.url))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// A Route 53 hosted zone.
pub struct Route53 {
    http: reqwest::Client,
    endpoint: String,
    region: String,
    zone_id: String,
    creds: AwsCredentials,
}

/// One record set as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RrSet {
    /// Decoded and normalized.
    name: String,
    rtype: String,
    ttl: u32,
    /// The values exactly as Route 53 holds them.
    values: Vec<String>,
    /// An alias or a routing-policy set: not a simple RRset.
    special: bool,
}

/// Where the next page of a truncated listing starts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Next {
    name: String,
    rtype: Option<String>,
    identifier: Option<String>,
}

impl Route53 {
    /// `endpoint` defaults to [`DEFAULT_ENDPOINT`], `region` (the signing region) to
    /// [`DEFAULT_REGION`] when empty; `hosted_zone_id` may carry the `/hostedzone/` prefix. The
    /// provider works on that one hosted zone, whatever zone name the calls pass. The endpoint's
    /// certificate is verified against `trust` (the BackupMx's: the Mozilla roots and
    /// `spec.caBundle`, for a VPC endpoint or proxy behind a private CA).
    pub fn new(
        endpoint: Option<&str>,
        region: &str,
        hosted_zone_id: &str,
        access_key_id: &str,
        secret_access_key: &str,
        session_token: Option<&str>,
        trust: &Trust,
    ) -> Self {
        let region = region.trim();
        Self {
            http: http::client(trust),
            endpoint: endpoint
                .unwrap_or(DEFAULT_ENDPOINT)
                .trim_end_matches('/')
                .to_string(),
            region: if region.is_empty() {
                DEFAULT_REGION
            } else {
                region
            }
            .to_string(),
            zone_id: hosted_zone_id
                .trim()
                .trim_start_matches('/')
                .trim_start_matches("hostedzone/")
                .to_string(),
            creds: AwsCredentials {
                access_key_id: access_key_id.to_string(),
                secret_access_key: secret_access_key.to_string(),
                session_token: session_token.map(str::to_string),
            },
        }
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<Url, DnsError> {
        let url = format!(
            "{}/2013-04-01/hostedzone/{}{path}",
            self.endpoint, self.zone_id
        );
        http::url(NAME, &url, query, || {
            format!("invalid endpoint {}", self.endpoint)
        })
    }

    /// Sends one signed request; the body of a successful answer.
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<String>,
        what: &str,
    ) -> Result<String, DnsError> {
        let body = body.unwrap_or_default().into_bytes();
        let signed = sign(
            &SignableParts {
                method: method.as_str(),
                url: url.as_str(),
                headers: &[],
                body: &body,
            },
            &self.creds,
            &self.region,
            SERVICE,
            SystemTime::now(),
        )
        .map_err(|e| DnsError::new(NAME, DnsErrorKind::Protocol, format!("{what}: {e}")))?;
        let post = method == Method::POST;
        let mut req = self.http.request(method, url);
        for (k, v) in signed {
            req = req.header(k, v);
        }
        if post {
            req = req.header("content-type", "application/xml").body(body);
        }
        let answer = http::exchange(NAME, req, what).await?;
        if (200..300).contains(&answer.status) {
            Ok(answer.text)
        } else {
            Err(api_error(
                answer.status,
                answer.retry_after.as_deref(),
                &answer.text,
                what,
            ))
        }
    }

    /// The record sets at `name` (every page read).
    async fn rrsets(&self, name: &str) -> Result<Vec<RrSet>, DnsError> {
        let name = normalize_name(name);
        let mut out = Vec::new();
        let mut next = Next {
            name: format!("{name}."),
            rtype: None,
            identifier: None,
        };
        for _ in 0..MAX_PAGES {
            let mut query = vec![("name", next.name.as_str())];
            if let Some(t) = &next.rtype {
                query.push(("type", t));
            }
            if let Some(i) = &next.identifier {
                query.push(("identifier", i));
            }
            query.push(("maxitems", MAX_ITEMS));
            let url = self.url("/rrset", &query)?;
            let what = format!("GET rrset?name={}", next.name);
            let body = self.send(Method::GET, url, None, &what).await?;
            let (sets, more) = parse_list(&body)
                .map_err(|e| DnsError::new(NAME, DnsErrorKind::Protocol, format!("{what}: {e}")))?;
            let past = sets.iter().any(|s| s.name != name);
            out.extend(sets.into_iter().filter(|s| s.name == name));
            match more {
                Some(n) if !past && decode_name(&n.name) == name => next = n,
                _ => break,
            }
        }
        Ok(out)
    }
}

/// A failed call: Route 53's error code decides the kind, else the HTTP status; AWS's message
/// is kept.
fn api_error(status: u16, retry_after: Option<&str>, body: &str, what: &str) -> DnsError {
    let parsed = parse_error(body);
    let detail = match &parsed {
        Some((code, message)) => format!("{code}: {message}"),
        None => body.to_string(),
    };
    let mut e = DnsError::from_http(NAME, status, retry_after, &detail, what);
    let Some((code, _)) = parsed else {
        return e;
    };
    match code.as_str() {
        "SignatureDoesNotMatch"
        | "AccessDenied"
        | "AccessDeniedException"
        | "InvalidClientTokenId"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredToken"
        | "UnrecognizedClientException" => e.kind = DnsErrorKind::Auth,
        "Throttling" | "ThrottlingException" | "PriorRequestNotComplete" => {
            e.kind = DnsErrorKind::RateLimited(
                retry_after
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map(Duration::from_secs),
            )
        }
        "NoSuchHostedZone" => e.kind = DnsErrorKind::ZoneNotFound,
        "InvalidChangeBatch" | "InvalidInput" => e.kind = DnsErrorKind::Rejected,
        _ => {}
    }
    e
}

/// The code and message of an error answer: `<ErrorResponse><Error><Code>`, or the
/// `<InvalidChangeBatch><Messages><Message>` form of refused batches.
fn parse_error(body: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(body).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() == "InvalidChangeBatch" {
        let messages: Vec<&str> = root
            .descendants()
            .filter(|n| n.tag_name().name() == "Message")
            .filter_map(|n| n.text())
            .collect();
        return Some(("InvalidChangeBatch".to_string(), messages.join("; ")));
    }
    let code = child_text(root, "Code").or_else(|| {
        root.descendants()
            .find(|n| n.tag_name().name() == "Code")
            .and_then(|n| n.text())
    })?;
    let message = root
        .descendants()
        .find(|n| n.tag_name().name() == "Message")
        .and_then(|n| n.text())
        .unwrap_or_default();
    Some((code.trim().to_string(), message.trim().to_string()))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|n| n.tag_name().name() == name)
}

fn child_text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(node, name)?.text()
}

/// Parses a `ListResourceRecordSetsResponse`: the record sets and where the next page starts.
fn parse_list(body: &str) -> Result<(Vec<RrSet>, Option<Next>), String> {
    let doc = roxmltree::Document::parse(body).map_err(|e| format!("invalid XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListResourceRecordSetsResponse" {
        return Err(format!("unexpected answer <{}>", root.tag_name().name()));
    }
    let mut sets = Vec::new();
    if let Some(list) = child(root, "ResourceRecordSets") {
        for set in list
            .children()
            .filter(|n| n.tag_name().name() == "ResourceRecordSet")
        {
            let name = child_text(set, "Name").ok_or("record set without a Name")?;
            let rtype = child_text(set, "Type").ok_or("record set without a Type")?;
            let values = child(set, "ResourceRecords")
                .map(|rrs| {
                    rrs.descendants()
                        .filter(|n| n.tag_name().name() == "Value")
                        .map(|n| n.text().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default();
            let ttl = match child_text(set, "TTL") {
                Some(t) => t.trim().parse().map_err(|e| format!("TTL {t:?}: {e}"))?,
                None => 0,
            };
            sets.push(RrSet {
                name: decode_name(name),
                rtype: rtype.trim().to_string(),
                ttl,
                values,
                special: child(set, "AliasTarget").is_some()
                    || child(set, "SetIdentifier").is_some(),
            });
        }
    }
    let next = if child_text(root, "IsTruncated").map(str::trim) == Some("true") {
        child_text(root, "NextRecordName").map(|name| Next {
            name: name.to_string(),
            rtype: child_text(root, "NextRecordType").map(str::to_string),
            identifier: child_text(root, "NextRecordIdentifier").map(str::to_string),
        })
    } else {
        None
    };
    Ok((sets, next))
}

/// A name as Route 53 writes it (`\052.example.com.`, octal escapes for characters outside
/// letters, digits, `-` and `_`), decoded and normalized.
fn decode_name(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let digits = bytes
                .get(i + 1..i + 4)
                .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
            if let Some(d) = digits {
                let v = u32::from(d[0] - b'0') * 64
                    + u32::from(d[1] - b'0') * 8
                    + u32::from(d[2] - b'0');
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
            if let Some(&c) = bytes.get(i + 1) {
                out.push(c);
                i += 2;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    normalize_name(&String::from_utf8_lossy(&out))
}

/// The RRset's records (values that do not parse are left out).
fn set_records(set: &RrSet) -> Vec<Record> {
    let Some(rtype) = RecordType::parse(&set.rtype) else {
        return Vec::new();
    };
    if set.special {
        return Vec::new();
    }
    set.values
        .iter()
        .filter_map(|v| RData::parse(rtype, v))
        .map(|d| Record::new(&set.name, set.ttl, d))
        .collect()
}

/// One change of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    action: &'static str,
    name: String,
    rtype: RecordType,
    ttl: u32,
    values: Vec<String>,
}

/// The `ChangeResourceRecordSetsRequest` document, written by quick-xml's serializer (which
/// escapes the text; `Full` also escapes quotes, as AWS's own SDKs do) rather than by hand.
fn change_batch_xml(changes: &[Change]) -> String {
    use quick_xml::se::{QuoteLevel, Serializer};
    use serde::Serialize;

    // element names exactly as the 2013-04-01 API spells them
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Request<'a> {
        #[serde(rename = "@xmlns")]
        xmlns: &'static str,
        change_batch: Batch<'a>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Batch<'a> {
        comment: &'static str,
        changes: XmlChanges<'a>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct XmlChanges<'a> {
        change: Vec<XmlChange<'a>>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct XmlChange<'a> {
        action: &'static str,
        resource_record_set: RrSetXml<'a>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct RrSetXml<'a> {
        name: String,
        #[serde(rename = "Type")]
        rtype: &'static str,
        #[serde(rename = "TTL")]
        ttl: u32,
        resource_records: ResourceRecords<'a>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct ResourceRecords<'a> {
        resource_record: Vec<ResourceRecord<'a>>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct ResourceRecord<'a> {
        value: &'a str,
    }

    let request = Request {
        xmlns: XMLNS,
        change_batch: Batch {
            comment: "backupmx",
            changes: XmlChanges {
                change: changes
                    .iter()
                    .map(|c| XmlChange {
                        action: c.action,
                        resource_record_set: RrSetXml {
                            name: format!("{}.", c.name),
                            rtype: c.rtype.as_str(),
                            ttl: c.ttl,
                            resource_records: ResourceRecords {
                                resource_record: c
                                    .values
                                    .iter()
                                    .map(|v| ResourceRecord { value: v })
                                    .collect(),
                            },
                        },
                    })
                    .collect(),
            },
        },
    };
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let mut ser = Serializer::with_root(&mut x, Some("ChangeResourceRecordSetsRequest"))
        .expect("a valid element name");
    ser.set_quote_level(QuoteLevel::Full);
    ser.expand_empty_elements(true);
    request
        .serialize(ser)
        .expect("strings and numbers serialize as XML");
    x
}

/// Members of an RRset: each value as held (or as it will be written) and its data, if it parses.
type Members = Vec<(String, Option<RData>)>;

/// One RRset a change touches: (TTL, members) now if it exists, the new members, the new TTL.
type Touched = (Option<(u32, Members)>, Members, u32);

/// The changes turning the `current` record sets into what `changes` asks for.
fn plan_changes(current: &[RrSet], changes: &Changes) -> Result<Vec<Change>, String> {
    // each touched RRset: (ttl, values as held) now, the new member list and its TTL
    let mut sets: BTreeMap<(String, RecordType), Touched> = BTreeMap::new();
    for r in changes.add.iter().chain(&changes.remove) {
        let key = (r.name.clone(), r.record_type());
        if sets.contains_key(&key) {
            continue;
        }
        let existing: Vec<&RrSet> = current
            .iter()
            .filter(|s| s.name == key.0 && RecordType::parse(&s.rtype) == Some(key.1))
            .collect();
        if existing.iter().any(|s| s.special) {
            return Err(format!(
                "{} {} is an alias or routing-policy record set; only simple record sets are managed",
                key.0,
                key.1.as_str()
            ));
        }
        let now = existing.first().map(|s| {
            let members: Members = s
                .values
                .iter()
                .map(|v| (v.clone(), RData::parse(key.1, v)))
                .collect();
            (s.ttl, members)
        });
        let members = now.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
        let ttl = now.as_ref().map_or(r.ttl, |(t, _)| *t);
        sets.insert(key, (now, members, ttl));
    }
    for r in &changes.remove {
        let (_, members, _) = sets
            .get_mut(&(r.name.clone(), r.record_type()))
            .expect("entry made above");
        members.retain(|(_, d)| d.as_ref() != Some(&r.data));
    }
    for r in &changes.add {
        let (now, members, ttl) = sets
            .get_mut(&(r.name.clone(), r.record_type()))
            .expect("entry made above");
        if now.is_none() && members.is_empty() {
            *ttl = r.ttl;
        }
        if !members.iter().any(|(_, d)| d.as_ref() == Some(&r.data)) {
            members.push((r.data.presentation(), Some(r.data.clone())));
        }
    }
    let mut out = Vec::new();
    for ((name, rtype), (now, members, ttl)) in sets {
        let values: Vec<String> = members.into_iter().map(|(v, _)| v).collect();
        match now {
            Some((now_ttl, now_members)) if values.is_empty() => out.push(Change {
                action: "DELETE",
                name,
                rtype,
                ttl: now_ttl,
                values: now_members.into_iter().map(|(v, _)| v).collect(),
            }),
            None if values.is_empty() => {}
            Some((_, now_members)) if now_members.iter().map(|(v, _)| v).eq(values.iter()) => {}
            _ => out.push(Change {
                action: "UPSERT",
                name,
                rtype,
                ttl,
                values,
            }),
        }
    }
    Ok(out)
}

#[async_trait::async_trait]
impl DnsProvider for Route53 {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn records(&self, _zone: &str, name: &str) -> Result<Vec<Record>, DnsError> {
        Ok(self
            .rrsets(name)
            .await?
            .iter()
            .flat_map(set_records)
            .collect())
    }

    async fn apply(&self, zone: &str, changes: &Changes) -> Result<(), DnsError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut current = Vec::new();
        for name in changes.names() {
            current.extend(self.rrsets(&name).await?);
        }
        let batch = plan_changes(&current, changes)
            .map_err(|e| DnsError::new(NAME, DnsErrorKind::Rejected, e))?;
        if batch.is_empty() {
            return Ok(());
        }
        let url = self.url("/rrset/", &[])?;
        self.send(
            Method::POST,
            url,
            Some(change_batch_xml(&batch)),
            &format!(
                "POST rrset (change batch of {} for zone {})",
                batch.len(),
                normalize_name(zone)
            ),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "route53_tests.rs"]
mod tests;
