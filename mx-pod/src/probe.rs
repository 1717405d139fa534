//! The SMTP health probe of a primary: connect, `220` greeting, `EHLO`, `QUIT`. Shared by
//! mx-pod's standalone `replay.auto` mode and the operator's health checks, so both judge a
//! primary the same way. A greeting other than `220` (a `421` or `554` "go away") is a failure.

use std::time::{Duration, Instant};

use crate::replay::client::{Capabilities, ClientError, SmtpClient};

/// What a successful probe saw.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// The greeting text (first line).
    pub banner: String,
    pub capabilities: Capabilities,
    pub elapsed: Duration,
}

/// Probes `addr` (`host:port`), saying `helo`; the whole exchange must end within `timeout`.
pub async fn probe(addr: &str, helo: &str, timeout: Duration) -> Result<ProbeReport, ClientError> {
    let started = Instant::now();
    let run = async {
        let client = SmtpClient::connect(addr, helo, timeout).await?;
        let report = ProbeReport {
            banner: client.greeting.lines.first().cloned().unwrap_or_default(),
            capabilities: client.caps.clone(),
            elapsed: started.elapsed(),
        };
        client.quit().await;
        Ok(report)
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Err(ClientError::Timeout("the whole probe")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
        net::TcpListener,
    };

    /// A scripted server: greets with `greeting`, answers EHLO and QUIT.
    async fn server(greeting: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            w.write_all(greeting.as_bytes()).await.unwrap();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                let reply: &[u8] = if line.starts_with("EHLO") {
                    b"250-primary.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
                } else {
                    b"221 bye\r\n"
                };
                let _ = w.write_all(reply).await;
                line.clear();
            }
        });
        addr
    }

    #[tokio::test]
    async fn healthy_primary_reports_banner_and_features() {
        let addr = server("220 primary.test ESMTP\r\n").await;
        let r = probe(&addr, "mx2.test", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.banner, "primary.test ESMTP");
        assert!(r.capabilities.pipelining && r.capabilities.starttls);
    }

    #[tokio::test]
    async fn busy_greeting_is_unhealthy() {
        let addr = server("421 4.3.2 busy\r\n").await;
        let err = probe(&addr, "mx2.test", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.is_throttle(), "{err}");
        let addr = server("554 5.3.2 no service\r\n").await;
        assert!(
            probe(&addr, "mx2.test", Duration::from_secs(5))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn closed_port_is_unhealthy() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let err = probe(&addr, "mx2.test", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
