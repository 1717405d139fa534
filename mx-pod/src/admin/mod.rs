//! The admin HTTP API (JSON): health, readiness, metrics, the queue and replay controls.
//! Paths and shapes are the contract in docs/operations.md. Every `/v1` call needs the bearer
//! token; `/healthz`, `/readyz` and `/metrics` are open and carry no addresses.

pub mod auth;
pub mod serve;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, route_from_admin},
    metrics::Metrics,
    queue::{
        Queue, QueueError,
        index::DSN_ROUTE,
        message::{QueueId, RcptStatus, now_micros},
    },
    replay::{Replay, ReplaySettings},
};

pub use crate::queue::damage::{Damage, DamageKind};

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub queue: Queue,
    pub replay: Replay,
    pub metrics: Arc<Metrics>,
    pub token: Option<Arc<str>>,
    pub ready: Arc<AtomicBool>,
    pub draining: Arc<AtomicBool>,
    /// Cancelled to stop accepting SMTP (drain or shutdown).
    pub smtp_stop: CancellationToken,
}

/// The router with every route. Only `/healthz`, `/readyz` and `/metrics` (no addresses in it)
/// answer without the token.
pub fn router(state: AdminState) -> Router {
    let v1 = Router::new()
        .route("/v1/queue", get(queue_summary))
        .route("/v1/queue/messages", get(list_messages))
        .route(
            "/v1/queue/messages/{id}",
            get(show_message).delete(delete_message),
        )
        .route("/v1/queue/hold", post(hold))
        .route("/v1/queue/release", post(release))
        .route("/v1/queue/flush", post(flush))
        .route("/v1/queue/repair", post(repair))
        .route("/v1/replay", get(get_replay).put(put_replay))
        .route("/v1/drain", post(drain))
        .route("/v1/drill", post(drill))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .with_state(state)
}

fn error(status: StatusCode, message: String) -> Response {
    ApiError(status, message).into_response()
}

/// A request body parsed as JSON; a body that does not parse is a 400 that shows `expected`, a
/// body that would, so a caller can fix the request from the answer alone.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("bad request body: {e}; expected {expected}"),
        )
    })
}

/// An error answer: a status and a message, sent as `{"error": message}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn queue_error(e: QueueError) -> Response {
    let status = match e {
        QueueError::NotFound(_) => StatusCode::NOT_FOUND,
        QueueError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
        QueueError::Storage(_) | QueueError::Locked(_) => StatusCode::CONFLICT,
    };
    error(status, e.to_string())
}

/// Every `/v1` call needs the bearer token: listings carry senders, recipients and client
/// addresses (personal data), and the rest changes the queue or replay.
async fn require_token(
    State(s): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match auth::check(s.token.as_deref(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err((status, msg)) => error(status, msg),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if !s.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    }
    if s.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let domains: Vec<String> = s
        .config
        .domains
        .iter()
        .map(|d| d.name.to_ascii_lowercase())
        .collect();
    let body = s.metrics.render(&s.queue, &domains);
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Per-domain queue figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DomainSummary {
    pub domain: String,
    pub messages: usize,
    pub bytes: u64,
    pub oldest_age_seconds: u64,
    pub held: bool,
}

/// `GET /v1/queue`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueSummary {
    pub messages: usize,
    pub bytes: u64,
    pub disk_bytes: u64,
    pub held: bool,
    pub draining: bool,
    pub domains: Vec<DomainSummary>,
    /// Unacknowledged damage in the queue directory (damaged records and bodies, missing
    /// segments, a lost or garbled holds file); empty when all is well. Absent from servers
    /// before it existed, hence the default.
    #[serde(default)]
    pub damage: Vec<Damage>,
}

async fn queue_summary(State(s): State<AdminState>) -> Response {
    let now = now_micros();
    let stats = s.queue.stats();
    let mut domains: Vec<DomainSummary> = s
        .config
        .domains
        .iter()
        .map(|d| d.name.to_ascii_lowercase())
        .filter(|d| !stats.iter().any(|st| st.route == *d))
        .map(|domain| DomainSummary {
            domain,
            messages: 0,
            bytes: 0,
            oldest_age_seconds: 0,
            held: false,
        })
        .collect();
    domains.extend(stats.into_iter().map(|st| {
        DomainSummary {
            domain: st.route,
            messages: st.messages,
            bytes: st.bytes,
            oldest_age_seconds: st
                .oldest_arrival
                .map_or(0, |a| now.saturating_sub(a) / 1_000_000),
            held: st.held,
        }
    }));
    domains.sort_by(|a, b| a.domain.cmp(&b.domain));
    let (messages, bytes) = s.queue.totals();
    Json(QueueSummary {
        messages,
        bytes,
        disk_bytes: s.queue.disk_bytes(),
        held: s.queue.all_held(),
        draining: s.draining.load(Ordering::Relaxed),
        domains,
        damage: s.queue.damage(),
    })
    .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepairBody {
    /// One segment (`0000000000000003` or `0000000000000003.seg`); all when absent.
    segment: Option<String>,
}

/// `POST /v1/queue/repair`: acknowledges the queue log's damage (see [`Queue::repair`]).
async fn repair(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let req = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(RepairBody::default())
    } else {
        json_body(&body, r#"{} or {"segment":"0000000000000003"}"#)
    };
    let req = match req {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let segment = match req.segment.as_deref() {
        None => None,
        Some(name) => match u64::from_str_radix(name.strip_suffix(".seg").unwrap_or(name), 16) {
            Ok(n) => Some(n),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{name:?} is not a segment name (16 hex digits)"),
                );
            }
        },
    };
    match s.queue.repair(segment) {
        Ok(done) => Json(json!({
            "acknowledged": done,
            "damage": s.queue.damage(),
        }))
        .into_response(),
        Err(e) => queue_error(e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    domain: Option<String>,
    limit: Option<usize>,
}

/// One message in a listing.
#[derive(Debug, Serialize, Deserialize)]
pub struct MessageSummary {
    pub id: String,
    pub arrival: String,
    pub age_seconds: u64,
    pub size: u64,
    pub sender: String,
    pub held: bool,
    pub kind: String,
    pub recipients: Vec<RecipientSummary>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RecipientSummary {
    pub address: String,
    pub status: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

fn summary(env: &crate::queue::message::Envelope, now: u64) -> MessageSummary {
    MessageSummary {
        id: env.id.to_string(),
        arrival: chrono::DateTime::from_timestamp_micros(env.arrival as i64)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        age_seconds: now.saturating_sub(env.arrival) / 1_000_000,
        size: env.size,
        sender: env.sender.clone(),
        held: env.held,
        kind: format!("{:?}", env.kind).to_lowercase(),
        recipients: env
            .recipients
            .iter()
            .map(|r| RecipientSummary {
                address: r.address.clone(),
                status: match r.status {
                    RcptStatus::Pending => "pending",
                    RcptStatus::Delivered { .. } => "delivered",
                    RcptStatus::Failed { .. } => "failed",
                }
                .into(),
                attempts: r.attempts,
                last_error: r.last_error.clone(),
            })
            .collect(),
    }
}

/// The route a `domain` given to the API names, normalised here at the edge: any spelling of a
/// domain (U-label or A-label, any case) is its one route (`config::route_from_admin`), and
/// `_dsn` is the DSN route. Anything else is `400`: a typo must not silently select nothing.
fn route_param(domain: Option<&str>) -> Result<Option<String>, ApiError> {
    match domain {
        None => Ok(None),
        Some(DSN_ROUTE) => Ok(Some(DSN_ROUTE.to_owned())),
        Some(d) => route_from_admin(d)
            .map(Some)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("domain: {e}"))),
    }
}

async fn list_messages(State(s): State<AdminState>, Query(q): Query<ListQuery>) -> Response {
    let now = now_micros();
    let limit = q.limit.unwrap_or(100).min(10_000);
    let route = match route_param(q.domain.as_deref()) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let list: Vec<MessageSummary> = s
        .queue
        .list(route.as_deref(), limit)
        .iter()
        .map(|e| summary(e, now))
        .collect();
    Json(list).into_response()
}

fn parse_id(id: &str) -> Result<QueueId, ApiError> {
    id.parse()
        .map_err(|e: String| ApiError(StatusCode::BAD_REQUEST, e))
}

async fn show_message(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match s.queue.get(id) {
        Some(env) => Json(env).into_response(),
        None => match s.queue.finished(id) {
            // it left the queue: its final per-recipient state, marked as finished
            Some(env) => {
                let mut v = serde_json::to_value(env).unwrap_or_default();
                v["finished"] = json!(true);
                Json(v).into_response()
            }
            None => queue_error(QueueError::NotFound(id)),
        },
    }
}

async fn delete_message(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match s.queue.remove(id).await {
        Ok(env) => {
            tracing::warn!(id = %id, from = %env.sender, "message deleted by admin");
            Json(json!({"deleted": id.to_string()})).into_response()
        }
        Err(e) => queue_error(e),
    }
}

/// Body of hold, release and flush: all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    pub domain: Option<String>,
    pub id: Option<String>,
}

fn selector(body: &[u8]) -> Result<Selector, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Selector::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

async fn set_hold(s: AdminState, body: axum::body::Bytes, held: bool) -> Response {
    let sel = match selector(&body) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let id = match sel.id.as_deref().map(parse_id).transpose() {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let route = match route_param(sel.domain.as_deref()) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match s.queue.set_hold(held, route.as_deref(), id).await {
        Ok(n) => {
            tracing::info!(held, domain = ?route, id = ?sel.id, messages = n, "hold changed by admin");
            Json(json!({"held": held, "domain": route, "id": sel.id, "messages": n}))
                .into_response()
        }
        Err(e) => queue_error(e),
    }
}

async fn hold(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    set_hold(s, body, true).await
}

async fn release(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    set_hold(s, body, false).await
}

async fn flush(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let sel = match selector(&body) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let route = match route_param(sel.domain.as_deref()) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let n = s.queue.flush(route.as_deref());
    s.replay.reset_backoff(route.as_deref());
    Json(json!({"flushed": n, "domain": route})).into_response()
}

/// `GET /v1/replay`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplayStatusBody {
    pub workers: usize,
    pub rate_per_second: u32,
    pub auto: bool,
    #[serde(default)]
    pub routes: Vec<serde_json::Value>,
}

async fn get_replay(State(s): State<AdminState>) -> Response {
    let st = s.replay.settings();
    let routes = s
        .replay
        .routes()
        .into_iter()
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .collect();
    Json(ReplayStatusBody {
        workers: st.workers,
        rate_per_second: st.rate_per_second,
        auto: s.config.replay.auto,
        routes,
    })
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayPatch {
    workers: Option<usize>,
    rate_per_second: Option<u32>,
}

const MAX_WORKERS: usize = 1024;

async fn put_replay(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let patch: ReplayPatch = match json_body(&body, r#"{"workers":N,"rate_per_second":R}"#) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut st = s.replay.settings();
    if let Some(w) = patch.workers {
        if w > MAX_WORKERS {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("workers must be at most {MAX_WORKERS}"),
            );
        }
        st.workers = w;
    }
    if let Some(r) = patch.rate_per_second {
        st.rate_per_second = r;
    }
    s.replay.set_settings(ReplaySettings { ..st });
    get_replay(State(s)).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    /// Deliver everything to this SMTP server (`host:port`) instead of the primaries: another
    /// backup that keeps it while the primary is down (scale-down).
    forward_to: Option<String>,
}

async fn drain(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let req = if body.is_empty() {
        Ok(DrainBody::default())
    } else {
        json_body(&body, r#"{} or {"forward_to":"host:port"}"#)
    };
    let req = match req {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if let Some(target) = &req.forward_to
        && let Err(e) = crate::config::parse_host_port(target)
    {
        return error(StatusCode::UNPROCESSABLE_ENTITY, format!("forward_to: {e}"));
    }
    if !s.draining.swap(true, Ordering::Relaxed) {
        tracing::warn!("drain requested: no longer accepting SMTP; delivering what is queued");
        s.smtp_stop.cancel();
    }
    if req.forward_to != s.replay.forward_to() {
        match &req.forward_to {
            Some(t) => {
                tracing::warn!(to = %t, "draining: forwarding every queued message to another server")
            }
            None => tracing::info!("draining: delivering to the primaries"),
        }
        s.replay.set_forward_to(req.forward_to.clone());
    }
    let (messages, bytes) = s.queue.totals();
    Json(
        json!({"draining": true, "messages": messages, "bytes": bytes,
        "forward_to": s.replay.forward_to()}),
    )
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrillBody {
    domain: String,
}

/// `POST /v1/drill`: queues a held test message from `<>` to `postmaster@DOMAIN` and returns
/// its id; the caller releases it and follows it with `GET /v1/queue/messages/{id}` (the
/// failover drill: the whole path through the backup, without touching the primary).
async fn drill(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let req: DrillBody = match json_body(&body, r#"{"domain":"example.com"}"#) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let configured = route_from_admin(&req.domain)
        .ok()
        .and_then(|route| s.config.domain(&route));
    let Some(domain) = configured else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{} is not a configured domain", req.domain),
        );
    };
    let id = s.queue.new_id();
    let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S +0000");
    let message = format!(
        "Received: by {host} (mx-pod failover drill) id {id}; {date}\r\nFrom: backupmx drill <postmaster@{domain}>\r\nTo: <postmaster@{domain}>\r\nSubject: backupmx failover drill {id}\r\nDate: {date}\r\nMessage-ID: <drill.{id}@{host}>\r\nAuto-Submitted: auto-generated\r\n\r\nThis message tests that mail queued on the backup MX {host} reaches the primary.\r\nIt can be deleted.\r\n",
        host = s.config.hostname,
        domain = domain.name,
    )
    .into_bytes();
    let reservation = match s.queue.reserve(message.len() as u64) {
        Ok(r) => r,
        Err(e) => return queue_error(e),
    };
    let env = crate::queue::message::Envelope {
        id,
        kind: crate::queue::message::MessageKind::Mail,
        arrival: crate::queue::message::now_micros(),
        sender: String::new(),
        recipients: vec![crate::queue::message::Recipient::new(
            format!("postmaster@{}", domain.name),
            None,
            crate::queue::message::Notify::default(),
        )],
        size: message.len() as u64,
        env_id: None,
        ret: None,
        smtputf8: false,
        eight_bit: false,
        client: crate::queue::message::ClientInfo {
            ip: "127.0.0.1".into(),
            helo: "drill".into(),
        },
        held: true,
        delay_warned: false,
    };
    match s.queue.enqueue(env, message, reservation).await {
        Ok(id) => {
            tracing::info!(id = %id, domain = %domain.name, "failover drill message queued (held)");
            Json(json!({"id": id.to_string()})).into_response()
        }
        Err(e) => queue_error(e),
    }
}
