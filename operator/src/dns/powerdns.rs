//! PowerDNS authoritative server, through its HTTP API (`X-API-Key`).
//!
//! Reads `GET /api/v1/servers/{server}/zones/{zone}`; writes one
//! `PATCH .../zones/{zone}` carrying every touched RRset with `changetype: REPLACE` (or
//! `DELETE` once empty), which PowerDNS applies in one transaction. The API replaces whole
//! RRsets, so a change is read-modify-write: a concurrent edit of the same RRset between our read
//! and our write can be lost (the next reconcile pass re-reads and repairs ours, but not
//! someone else's); PowerDNS offers no compare-and-swap to close that window.

use std::collections::BTreeMap;

use mx_pod::trust::Trust;
use serde::Deserialize;
use serde_json::json;

use super::{
    Changes, DnsError, DnsErrorKind, DnsProvider, RData, Record, RecordType, http, normalize_name,
};

const NAME: &str = "powerdns";

/// A PowerDNS server.
pub struct PowerDns {
    http: reqwest::Client,
    base: String,
    server_id: String,
    api_key: String,
}

#[derive(Deserialize)]
struct Zone {
    #[serde(default)]
    rrsets: Vec<RrSet>,
}

#[derive(Deserialize)]
struct RrSet {
    name: String,
    #[serde(rename = "type")]
    rtype: String,
    ttl: u32,
    records: Vec<Content>,
}

#[derive(Deserialize)]
struct Content {
    content: String,
    #[serde(default)]
    disabled: bool,
}

impl PowerDns {
    /// `url` is the API's base (`https://pdns.example:8081`, or `http://` inside the cluster),
    /// `server_id` usually `localhost`; an `https://` API's certificate is verified against
    /// `trust` (the BackupMx's: the Mozilla roots and `spec.caBundle`).
    pub fn new(url: &str, server_id: &str, api_key: &str, trust: &Trust) -> Self {
        Self {
            http: http::client(trust),
            base: url.trim_end_matches('/').to_string(),
            server_id: server_id.to_string(),
            api_key: api_key.to_string(),
        }
    }

    fn zone_url(&self, zone: &str) -> String {
        format!(
            "{}/api/v1/servers/{}/zones/{}.",
            self.base,
            self.server_id,
            normalize_name(zone)
        )
    }

    async fn zone(&self, zone: &str) -> Result<Vec<Record>, DnsError> {
        let url = self.zone_url(zone);
        let resp = self
            .http
            .get(&url)
            .header("X-API-Key", &self.api_key)
            .send()
            .await
            .map_err(|e| DnsError::transport(NAME, &format!("GET {url}"), e))?;
        let status = resp.status().as_u16();
        let retry = http::header(&resp, "retry-after");
        let body = resp.text().await.unwrap_or_default();
        if status == 422 && body.contains("Could not find domain") {
            return Err(DnsError::new(
                NAME,
                DnsErrorKind::ZoneNotFound,
                format!("zone {zone} not found"),
            ));
        }
        if !(200..300).contains(&status) {
            return Err(DnsError::from_http(
                NAME,
                status,
                retry.as_deref(),
                &body,
                &format!("GET zone {zone}"),
            ));
        }
        let z: Zone = serde_json::from_str(&body).map_err(|e| {
            DnsError::new(NAME, DnsErrorKind::Protocol, format!("zone {zone}: {e}"))
        })?;
        let mut out = Vec::new();
        for set in z.rrsets {
            let Some(rtype) = RecordType::parse(&set.rtype) else {
                continue;
            };
            for c in set.records.iter().filter(|c| !c.disabled) {
                if let Some(data) = RData::parse(rtype, &c.content) {
                    out.push(Record::new(&set.name, set.ttl, data));
                }
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl DnsProvider for PowerDns {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn records(&self, zone: &str, name: &str) -> Result<Vec<Record>, DnsError> {
        let name = normalize_name(name);
        Ok(self
            .zone(zone)
            .await?
            .into_iter()
            .filter(|r| r.name == name)
            .collect())
    }

    async fn apply(&self, zone: &str, changes: &Changes) -> Result<(), DnsError> {
        if changes.is_empty() {
            return Ok(());
        }
        let current = self.zone(zone).await?;
        // every touched RRset, rebuilt from what is there now
        let mut sets: BTreeMap<(String, RecordType), (u32, Vec<Record>)> = BTreeMap::new();
        for r in changes.add.iter().chain(&changes.remove) {
            let key = (r.name.clone(), r.record_type());
            sets.entry(key.clone()).or_insert_with(|| {
                let members: Vec<Record> = current
                    .iter()
                    .filter(|c| c.name == key.0 && c.record_type() == key.1)
                    .cloned()
                    .collect();
                (members.first().map_or(r.ttl, |m| m.ttl), members)
            });
        }
        for r in &changes.remove {
            if let Some((_, members)) = sets.get_mut(&(r.name.clone(), r.record_type())) {
                members.retain(|m| !m.same(r));
            }
        }
        for r in &changes.add {
            let (ttl, members) = sets
                .get_mut(&(r.name.clone(), r.record_type()))
                .expect("entry made above");
            if members.is_empty() {
                *ttl = r.ttl;
            }
            if !members.iter().any(|m| m.same(r)) {
                members.push(r.clone());
            }
        }
        let rrsets: Vec<serde_json::Value> = sets
            .into_iter()
            .map(|((name, rtype), (ttl, members))| {
                if members.is_empty() {
                    json!({"name": format!("{name}."), "type": rtype.as_str(), "changetype": "DELETE"})
                } else {
                    json!({
                        "name": format!("{name}."), "type": rtype.as_str(), "ttl": ttl,
                        "changetype": "REPLACE",
                        "records": members.iter().map(|m| json!({
                            "content": m.data.presentation(), "disabled": false
                        })).collect::<Vec<_>>(),
                    })
                }
            })
            .collect();
        let url = self.zone_url(zone);
        let resp = self
            .http
            .patch(&url)
            .header("X-API-Key", &self.api_key)
            .json(&json!({ "rrsets": rrsets }))
            .send()
            .await
            .map_err(|e| DnsError::transport(NAME, &format!("PATCH {url}"), e))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let retry = http::header(&resp, "retry-after");
        let body = resp.text().await.unwrap_or_default();
        Err(DnsError::from_http(
            NAME,
            status,
            retry.as_deref(),
            &body,
            &format!("PATCH zone {zone}"),
        ))
    }
}
