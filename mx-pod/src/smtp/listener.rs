//! Accepts SMTP connections: one session task per connection, bounded by
//! `smtp.max_connections` (a permit is taken before the session starts; without one the client
//! gets `421 4.7.0`). On shutdown the listeners stay open and answer new connections with
//! `421 4.3.2` while the sessions in flight finish, up to `smtp.shutdown_grace`.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use super::session::{Session, SessionContext};
use crate::reply::RejectReason;

/// Binds every configured SMTP address ([`crate::listen`]: IPv6 wildcards left out where there
/// is no IPv6); fails with the address in the error.
pub fn bind(addrs: &[std::net::SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    crate::listen::bind_all(addrs, "SMTP")
}

/// The running SMTP side: accept loops and the sessions they started.
pub struct SmtpServer {
    sessions: TaskTracker,
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
    close: CancellationToken,
    grace: Duration,
}

/// Starts serving SMTP. Once `stop` is cancelled (drain or shutdown) new connections get
/// `421 4.3.2` and open sessions end after their transaction; the listeners stay open until
/// [`SmtpServer::close`].
pub fn serve(
    listeners: Vec<TcpListener>,
    ctx: Arc<SessionContext>,
    stop: CancellationToken,
) -> SmtpServer {
    let sessions = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(ctx.config.smtp.max_connections));
    let close = CancellationToken::new();
    let grace = ctx.config.smtp.shutdown_grace.0;
    let accept_loops = listeners
        .into_iter()
        .map(|listener| {
            tokio::spawn(accept_loop(
                listener,
                ctx.clone(),
                stop.clone(),
                close.clone(),
                sessions.clone(),
                permits.clone(),
            ))
        })
        .collect();
    SmtpServer {
        sessions,
        accept_loops,
        close,
        grace,
    }
}

impl SmtpServer {
    /// Waits until every session has ended, at most `smtp.shutdown_grace` (call after `stop`).
    pub async fn drained(&self) {
        info!(sessions = self.sessions.len(), grace = ?self.grace, "SMTP draining: new connections get 421");
        // no session starts after `stop`, so closing the tracker only lets `wait` finish
        self.sessions.close();
        if tokio::time::timeout(self.grace, self.sessions.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = self.sessions.len(),
                "grace period over; closing remaining sessions"
            );
        }
    }

    /// Closes the listeners.
    pub async fn close(self) {
        self.close.cancel();
        for l in self.accept_loops {
            let _ = l.await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<SessionContext>,
    shutdown: CancellationToken,
    stop: CancellationToken,
    sessions: TaskTracker,
    permits: Arc<Semaphore>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                // an IPv4 client of a dual-stack `[::]` socket arrives as ::ffff:a.b.c.d: filters,
                // limits and logs must see a.b.c.d
                (
                    stream,
                    std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port()),
                )
            }
            Err(e) => {
                // e.g. EMFILE: wait a little instead of spinning
                error!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if shutdown.is_cancelled() {
            refuse(stream, &ctx, RejectReason::Shutdown);
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refuse(stream, &ctx, RejectReason::TooManyConnections);
            continue;
        };
        let ctx2 = ctx.clone();
        let token = shutdown.clone();
        sessions.spawn(async move {
            ctx2.metrics.smtp_sessions.inc();
            Session::new(stream, ctx2.clone(), peer, token).run().await;
            ctx2.metrics.smtp_sessions.dec();
            drop(permit);
        });
    }
}

/// Answers a connection we will not serve with a 421 and closes it.
fn refuse(mut stream: TcpStream, ctx: &Arc<SessionContext>, reason: RejectReason) {
    ctx.metrics.reject(reason);
    let reply = reason.reply();
    tokio::spawn(async move {
        let mut out = Vec::new();
        reply.write_to(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
        })
        .await;
    });
}
