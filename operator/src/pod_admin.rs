//! Client for the mx-pods' admin API, reached at each pod's IP (the operator never goes through
//! a Service: it needs every pod, not any pod). Every call carries the bearer token from the
//! BackupMx's Secret: mx-pod answers no `/v1` call without it, reads included (a queue listing
//! holds senders and recipients). Response types are mx-pod's own, so they cannot drift.

use std::{net::IpAddr, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use mx_pod::admin::{QueueSummary, ReplayStatusBody};

use crate::render::ADMIN_PORT;

/// Timeout of one admin call: a pod that does not answer in this time counts as unreachable.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Talks to mx-pods' admin APIs.
#[derive(Clone)]
pub struct PodAdmin {
    http: reqwest::Client,
    port: u16,
}

impl Default for PodAdmin {
    fn default() -> Self {
        Self::new(ADMIN_PORT)
    }
}

impl PodAdmin {
    /// A client for admin APIs on `port`.
    pub fn new(port: u16) -> Self {
        Self {
            http: mx_pod::trust::Trust::webpki()
                .https()
                .timeout(TIMEOUT)
                .connect_timeout(TIMEOUT)
                .build()
                .expect("reqwest client builds"),
            port,
        }
    }

    fn url(&self, ip: IpAddr, path: &str) -> String {
        match ip {
            IpAddr::V4(v4) => format!("http://{v4}:{}{path}", self.port),
            IpAddr::V6(v6) => format!("http://[{v6}]:{}{path}", self.port),
        }
    }

    /// `GET /v1/queue` of the pod at `ip`.
    pub async fn queue(&self, ip: IpAddr, token: &str) -> Result<QueueSummary, String> {
        self.get(ip, "/v1/queue", token)
            .await?
            .ok_or_else(|| format!("GET {}: HTTP 404", self.url(ip, "/v1/queue")))
    }

    /// A `GET` with the token; `None` for a 404.
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        ip: IpAddr,
        path: &str,
        token: &str,
    ) -> Result<Option<T>, String> {
        let url = self.url(ip, path);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", error_text(&e)))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(format!("GET {url}: HTTP {status}: {}", text.trim()));
        }
        resp.json()
            .await
            .map(Some)
            .map_err(|e| format!("GET {url}: bad answer: {e}"))
    }

    /// `POST /v1/drain` on the pod at `ip`: it stops accepting mail and delivers what it holds.
    pub async fn drain(&self, ip: IpAddr, token: &str) -> Result<(), String> {
        self.drain_to(ip, token, None).await
    }

    /// `POST /v1/drain`, delivering to `forward_to` (`host:port`) instead of the primary when
    /// given (a scale-down while the primary is down: the queue moves to another pod).
    pub async fn drain_to(
        &self,
        ip: IpAddr,
        token: &str,
        forward_to: Option<&str>,
    ) -> Result<(), String> {
        let body = match forward_to {
            Some(t) => serde_json::json!({ "forward_to": t }),
            None => serde_json::json!({}),
        };
        self.send(reqwest::Method::POST, ip, "/v1/drain", token, body)
            .await
            .map(|_| ())
    }

    /// `GET /v1/replay` of the pod at `ip`.
    pub async fn replay(&self, ip: IpAddr, token: &str) -> Result<ReplayStatusBody, String> {
        self.get(ip, "/v1/replay", token)
            .await?
            .ok_or_else(|| format!("GET {}: HTTP 404", self.url(ip, "/v1/replay")))
    }

    /// `PUT /v1/replay`: the pod's replay workers and rate.
    pub async fn set_replay(
        &self,
        ip: IpAddr,
        token: &str,
        workers: u32,
        rate_per_second: u32,
    ) -> Result<(), String> {
        let body = serde_json::json!({"workers": workers, "rate_per_second": rate_per_second});
        self.send(reqwest::Method::PUT, ip, "/v1/replay", token, body)
            .await
            .map(|_| ())
    }

    /// `POST /v1/drill`: queues a held test message to `postmaster@DOMAIN`; returns its id.
    pub async fn drill(&self, ip: IpAddr, token: &str, domain: &str) -> Result<String, String> {
        let v = self
            .send(
                reqwest::Method::POST,
                ip,
                "/v1/drill",
                token,
                serde_json::json!({ "domain": domain }),
            )
            .await?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("POST /v1/drill: no id in {v}"))
    }

    /// `POST /v1/queue/release` of one message.
    pub async fn release(&self, ip: IpAddr, token: &str, id: &str) -> Result<(), String> {
        self.send(
            reqwest::Method::POST,
            ip,
            "/v1/queue/release",
            token,
            serde_json::json!({ "id": id }),
        )
        .await
        .map(|_| ())
    }

    /// `DELETE /v1/queue/messages/{id}`.
    pub async fn delete(&self, ip: IpAddr, token: &str, id: &str) -> Result<(), String> {
        self.send(
            reqwest::Method::DELETE,
            ip,
            &format!("/v1/queue/messages/{id}"),
            token,
            serde_json::Value::Null,
        )
        .await
        .map(|_| ())
    }

    /// `GET /v1/queue/messages/{id}`: the message (queued, or recently finished), if known.
    pub async fn message(
        &self,
        ip: IpAddr,
        token: &str,
        id: &str,
    ) -> Result<Option<serde_json::Value>, String> {
        self.get(ip, &format!("/v1/queue/messages/{id}"), token)
            .await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        ip: IpAddr,
        path: &str,
        token: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let url = self.url(ip, path);
        let resp = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {}", error_text(&e)))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!("{method} {url}: HTTP {status}: {}", text.trim()));
        }
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }
}

/// A reqwest error with its causes, e.g. "error sending request: Connection refused".
fn error_text(e: &reqwest::Error) -> String {
    mx_pod::trust::error_chain(e)
}

/// The pod's IP, if it has one.
pub fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

/// True when the pod has never run a container: it cannot hold mail yet.
pub fn never_started(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return true;
    };
    let statuses = status.container_statuses.as_deref().unwrap_or_default();
    statuses.iter().all(|c| {
        c.restart_count == 0
            && c.state.as_ref().and_then(|s| s.running.as_ref()).is_none()
            && c.state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_none()
            && c.last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_none()
    }) && status.phase.as_deref().is_none_or(|p| p == "Pending")
}

/// What one pod said about its queue.
#[derive(Debug, Clone)]
pub struct PodQueue {
    pub pod: String,
    pub result: Result<QueueSummary, String>,
}

impl PodAdmin {
    /// Reads every pod's queue concurrently. A pod without an IP that has run before is an
    /// error (it may hold mail); one that never started is left out. Without the admin token
    /// (not made yet) every pod counts as unreadable.
    pub async fn queues(&self, pods: &[Pod], token: Option<&str>) -> Vec<PodQueue> {
        let calls = pods.iter().filter_map(|p| {
            let name = p.name_any();
            match pod_ip(p) {
                Some(ip) => Some(futures::future::Either::Left(async move {
                    PodQueue {
                        pod: name,
                        result: match token {
                            Some(t) => self.queue(ip, t).await,
                            None => Err("no admin token to read the queue with".into()),
                        },
                    }
                })),
                None if never_started(p) => None,
                None => Some(futures::future::Either::Right(async move {
                    PodQueue {
                        pod: name,
                        result: Err("the pod has no IP address (not running)".to_string()),
                    }
                })),
            }
        });
        futures::future::join_all(calls).await
    }
}
