//! Test fixtures: BackupMx builders and a mocked API server (tower-test) that answers a scenario
//! of expected calls in order, asserting each call's method and path and letting the test look
//! at its body. A call the scenario does not expect fails the reconcile (the mock is closed);
//! an expected call that never comes fails the test by timeout.

use std::{sync::Arc, time::Duration};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Client,
    client::Body,
    runtime::events::{Recorder, Reporter},
};
use serde_json::{Value, json};

use crate::{
    capabilities::Capabilities,
    crd::{BackupMx, BackupMxSpec},
    metrics::Metrics,
    pod_admin::PodAdmin,
    reconcile::{Context, FINALIZER, alerts::AlertQueue},
};

/// A valid spec: two domains, primary mail.example.com, 1Gi volumes.
pub fn spec() -> BackupMxSpec {
    serde_json::from_value::<BackupMxSpec>(json!({
        "domains": ["example.com", "example.org"],
        "primary": {"host": "mail.example.com"},
        "storage": {"size": "1Gi"},
        "mx": {"hostname": "mx2.example.com"},
    }))
    .expect("fixture spec deserializes")
}

/// BackupMx `mail/example` (generation 1, with a uid) without the finalizer yet.
pub fn backupmx() -> BackupMx {
    let mut b = BackupMx::new("example", spec());
    b.metadata = ObjectMeta {
        name: Some("example".into()),
        namespace: Some("mail".into()),
        uid: Some("6c3a3c43-0f8a-4f0e-9d5f-4d1f7a1c2b3e".into()),
        generation: Some(1),
        resource_version: Some("100".into()),
        ..Default::default()
    };
    b
}

/// Builder-style changes for scenarios.
pub trait BackupMxExt {
    fn finalized(self) -> Self;
    fn deleting(self) -> Self;
    fn with_spec(self, f: impl FnOnce(&mut BackupMxSpec)) -> Self;
}

impl BackupMxExt for BackupMx {
    fn finalized(mut self) -> Self {
        self.metadata.finalizers = Some(vec![FINALIZER.into()]);
        self
    }
    fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-30T12:00:00Z".parse().unwrap(),
            ));
        self
    }
    fn with_spec(mut self, f: impl FnOnce(&mut BackupMxSpec)) -> Self {
        f(&mut self.spec);
        self
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Builds the answer (status, JSON body) to a request from its JSON body.
pub type Responder = Box<dyn FnOnce(&Value) -> (StatusCode, Value) + Send>;

/// One expected API call: method, exact path, and the answer built from the request body.
pub struct Expect {
    pub method: Method,
    pub path: String,
    pub respond: Responder,
}

impl Expect {
    pub fn new(
        method: Method,
        path: impl Into<String>,
        respond: impl FnOnce(&Value) -> (StatusCode, Value) + Send + 'static,
    ) -> Self {
        Self {
            method,
            path: path.into(),
            respond: Box::new(respond),
        }
    }

    /// A server-side apply answered with the applied object itself.
    pub fn apply(path: impl Into<String>) -> Self {
        Self::new(Method::PATCH, path, |body| (StatusCode::OK, body.clone()))
    }

    /// A call answered `404 Not Found`.
    pub fn not_found(method: Method, path: impl Into<String>) -> Self {
        Self::new(method, path, |_| {
            (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "NotFound", "code": 404, "message": "not found"}),
            )
        })
    }
}

/// Plays the API server for one scenario.
pub struct ApiServerVerifier(Handle);

impl ApiServerVerifier {
    /// Answers `expects` in order; returns every request body seen, in order.
    pub fn run(self, expects: Vec<Expect>) -> tokio::task::JoinHandle<Vec<(String, Value)>> {
        let mut handle = self.0;
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for expect in expects {
                let (request, send) =
                    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                        .await
                        .unwrap_or_else(|_| {
                            panic!("timed out waiting for {} {}", expect.method, expect.path)
                        })
                        .unwrap_or_else(|| {
                            panic!("no request for {} {}", expect.method, expect.path)
                        });
                let method = request.method().clone();
                let path = request.uri().path().to_string();
                assert_eq!(
                    (&method, path.as_str()),
                    (&expect.method, expect.path.as_str()),
                    "unexpected call (query: {:?})",
                    request.uri().query()
                );
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
                };
                let (status, answer) = (expect.respond)(&body);
                seen.push((format!("{method} {path}"), body));
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
            seen
        })
    }
}

impl Context {
    /// A context whose client talks to a mocked API server.
    pub fn test(pods: PodAdmin) -> (Arc<Context>, ApiServerVerifier) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "backupmx-operator".into(),
                instance: Some("test".into()),
            },
        );
        let metrics = Arc::new(Metrics::default());
        // the delivery task ends with the context (its queue's last sender)
        let (alerts, _) = AlertQueue::spawn(
            recorder.clone(),
            metrics.clone(),
            tokio_util::sync::CancellationToken::new(),
        );
        let ctx = Context {
            recorder,
            client,
            metrics,
            caps: Capabilities::current(),
            mxpod_image: "backupmx/mx-pod:test".into(),
            operator_namespace: "backupmx-system".into(),
            pods,
            dns: crate::reconcile::dns::DnsFactory::FromSpec,
            dns_resync: std::time::Duration::from_secs(300),
            probers: Arc::new(crate::health::Probers::disabled()),
            alerts,
        };
        (Arc::new(ctx), ApiServerVerifier(handle))
    }
}
