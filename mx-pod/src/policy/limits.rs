//! Abuse limits per client: concurrent connections, messages per minute, recipients per minute.
//!
//! A client is an IPv4 address or an IPv6 /64 (one host usually owns a whole /64, so counting
//! single IPv6 addresses would not limit anyone). Rates use a fixed one-minute window per client,
//! started by its first message or recipient. Memory is bounded: windows that ended are dropped
//! whenever the table grows past [`PRUNE_AT`] entries.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

/// The table of rate windows is pruned of ended windows when it grows past this.
const PRUNE_AT: usize = 4096;
const WINDOW: Duration = Duration::from_secs(60);

/// The key a client is counted under.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            IpAddr::V6([s[0], s[1], s[2], s[3], 0, 0, 0, 0].into())
        }
    }
}

#[derive(Debug)]
struct Window {
    start: Instant,
    messages: u32,
    recipients: u32,
}

/// Shared by every session.
#[derive(Debug)]
pub struct Limits {
    max_connections: usize,
    messages_per_minute: u32,
    recipients_per_minute: u32,
    connections: Mutex<HashMap<IpAddr, usize>>,
    windows: Mutex<HashMap<IpAddr, Window>>,
}

/// Holds one connection slot of a client; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<Limits>,
    key: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut conns = self.limits.connections.lock().expect("limits lock");
        if let Some(n) = conns.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                conns.remove(&self.key);
            }
        }
    }
}

impl Limits {
    /// Limits from the configuration (0 per minute = no limit).
    pub fn new(
        max_connections: usize,
        messages_per_minute: u32,
        recipients_per_minute: u32,
    ) -> Self {
        Self {
            max_connections,
            messages_per_minute,
            recipients_per_minute,
            connections: Mutex::default(),
            windows: Mutex::default(),
        }
    }

    /// Takes a connection slot for `ip`, or `None` when the client has too many open.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let key = client_key(ip);
        let mut conns = self.connections.lock().expect("limits lock");
        let n = conns.entry(key).or_insert(0);
        if *n >= self.max_connections {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            limits: self.clone(),
            key,
        })
    }

    /// Counts a message (a MAIL command) from `ip`; false when over the per-minute limit.
    pub fn message(&self, ip: IpAddr) -> bool {
        self.count(ip, |w| &mut w.messages, self.messages_per_minute)
    }

    /// Counts a recipient from `ip`; false when over the per-minute limit.
    pub fn recipient(&self, ip: IpAddr) -> bool {
        self.count(ip, |w| &mut w.recipients, self.recipients_per_minute)
    }

    fn count(&self, ip: IpAddr, field: impl Fn(&mut Window) -> &mut u32, limit: u32) -> bool {
        if limit == 0 {
            return true;
        }
        let now = Instant::now();
        let mut windows = self.windows.lock().expect("limits lock");
        if windows.len() >= PRUNE_AT {
            windows.retain(|_, w| now.duration_since(w.start) < WINDOW);
        }
        let w = windows.entry(client_key(ip)).or_insert(Window {
            start: now,
            messages: 0,
            recipients: 0,
        });
        if now.duration_since(w.start) >= WINDOW {
            *w = Window {
                start: now,
                messages: 0,
                recipients: 0,
            };
        }
        let n = field(w);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_per_client_are_capped_and_released() {
        let l = Arc::new(Limits::new(2, 0, 0));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = l.connect(ip).unwrap();
        let _b = l.connect(ip).unwrap();
        assert!(l.connect(ip).is_none());
        assert!(
            l.connect("192.0.2.2".parse().unwrap()).is_some(),
            "other clients unaffected"
        );
        drop(a);
        assert!(l.connect(ip).is_some());
    }

    #[test]
    fn ipv6_clients_are_counted_per_slash_64() {
        let l = Arc::new(Limits::new(1, 0, 0));
        let _a = l.connect("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(l.connect("2001:db8:1:2::99".parse().unwrap()).is_none());
        assert!(l.connect("2001:db8:1:3::1".parse().unwrap()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn rates_reset_after_a_minute() {
        let l = Limits::new(10, 2, 3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.message(ip) && l.message(ip));
        assert!(!l.message(ip));
        assert!(l.recipient(ip) && l.recipient(ip) && l.recipient(ip));
        assert!(!l.recipient(ip));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(l.message(ip));
        assert!(l.recipient(ip));
    }

    #[test]
    fn zero_means_no_limit() {
        let l = Limits::new(10, 0, 0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..10_000).all(|_| l.message(ip) && l.recipient(ip)));
    }
}
