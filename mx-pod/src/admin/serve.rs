//! The admin API's HTTP server. `axum::serve` bounds nothing, so this accept loop does:
//! - at most [`MAX_CONNECTIONS`] connections at once: the next one is not accepted until one
//!   ends, so a flood waits in the kernel's backlog and holds no descriptor of ours (SMTP keeps
//!   its file descriptors);
//! - the request head must arrive within [`HEADER_TIMEOUT`] (a half-open or silent connection
//!   is closed), and a whole request, body included, is answered within [`REQUEST_TIMEOUT`];
//! - one request per connection (no keep-alive): an idle connection cannot pin a slot.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time for the request line and headers to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a whole request (body read, handled, answered).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `stop`; connections in flight finish first.
pub async fn serve(listener: TcpListener, app: Router, stop: CancellationToken) {
    let app = app.layer(axum::middleware::from_fn(request_deadline));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tasks = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: wait a little instead of spinning
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(client = %peer, error = %e, "admin connection ended");
            }
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// Answers `408` when a request (its body included) takes longer than [`REQUEST_TIMEOUT`].
async fn request_deadline(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(r) => r,
        Err(_) => super::ApiError(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            format!("request not completed within {REQUEST_TIMEOUT:?}"),
        )
        .into_response(),
    }
}
