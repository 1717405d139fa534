//! A local alert webhook: an HTTPS server on 127.0.0.1 that keeps every JSON body POSTed to
//! `/hook`, for the operator's `spec.alerts.webhookUrl`. Its certificate comes from a CA made
//! for the test, which the BackupMx must trust through `spec.caBundle` (see
//! [`Webhook::ca_secret`]), as a Slack-style endpoint's is checked in production.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, routing::post};
use serde_json::Value;
use testkit::{Https, Leaf, TestCa};

use crate::kube::{ca_bundle_secret, eventually};

/// The webhook server (runs until the test's runtime ends).
pub struct Webhook {
    /// What `spec.alerts.webhookUrl` names (`https://127.0.0.1:PORT/hook`).
    pub url: String,
    /// The CA that issued the server's certificate, PEM.
    pub ca_pem: String,
    received: Arc<Mutex<Vec<Value>>>,
    server: Https,
}

impl Webhook {
    /// A webhook whose certificate (for 127.0.0.1) comes from a CA of its own.
    pub async fn start() -> Webhook {
        let ca = TestCa::new("webhook test CA");
        Self::start_with(&ca.issue(&["127.0.0.1", "localhost"])).await
    }

    /// A webhook presenting `leaf` (e.g. from a CA the operator is not told about).
    pub async fn start_with(leaf: &Leaf) -> Webhook {
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let app = Router::new().route(
            "/hook",
            post({
                let received = received.clone();
                move |Json(v): Json<Value>| async move {
                    received.lock().unwrap().push(v);
                    "ok"
                }
            }),
        );
        let server = testkit::serve_https(app, leaf).await;
        Webhook {
            url: format!("{}/hook", server.url),
            ca_pem: leaf.ca_pem.clone(),
            received,
            server,
        }
    }

    /// The Secret `name` holding this webhook's CA under `ca.crt`, for `spec.caBundle`.
    pub fn ca_secret(&self, name: &str) -> Value {
        ca_bundle_secret(name, &self.ca_pem)
    }

    /// Every body received so far, in order.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// TLS handshakes that failed so far (a client that refused the certificate).
    pub fn failed_handshakes(&self) -> usize {
        self.server.failed_handshakes()
    }

    /// Waits (up to 60 s) until an alert with `"event": event` arrived.
    pub async fn wait_for(&self, event: &str) {
        eventually(
            &format!("{event} at the webhook"),
            Duration::from_secs(60),
            || async {
                self.received()
                    .iter()
                    .any(|v| v["event"] == event)
                    .then_some(())
            },
        )
        .await;
    }
}

impl Webhook {
    /// Asserts exactly one `PrimaryDown` (with Slack-style text) and one `PrimaryRecovered`
    /// alert arrived, about BackupMx `ns/name`.
    pub fn assert_one_down_and_one_up(&self, backupmx: &str) {
        let got = self.received();
        let count = |e: &str| got.iter().filter(|v| v["event"] == e).count();
        assert_eq!(
            (count("PrimaryDown"), count("PrimaryRecovered")),
            (1, 1),
            "{got:?}"
        );
        let down = got.iter().find(|v| v["event"] == "PrimaryDown").unwrap();
        assert!(
            down["text"].as_str().unwrap().contains("is down"),
            "Slack-style text: {down}"
        );
        assert_eq!(down["backupmx"], backupmx);
    }
}
