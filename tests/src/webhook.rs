//! A local alert webhook: an HTTP server on 127.0.0.1 that keeps every JSON body POSTed to
//! `/hook`, for the operator's `spec.alerts.webhookUrl`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, routing::post};
use serde_json::Value;

use crate::{free_port, kube::eventually};

/// The webhook server (runs until the test's runtime ends).
pub struct Webhook {
    /// What `spec.alerts.webhookUrl` names.
    pub url: String,
    received: Arc<Mutex<Vec<Value>>>,
}

impl Webhook {
    pub async fn start() -> Webhook {
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
        let port = free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Webhook {
            url: format!("http://127.0.0.1:{port}/hook"),
            received,
        }
    }

    /// Every body received so far, in order.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
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
