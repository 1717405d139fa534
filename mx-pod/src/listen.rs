//! Listening sockets for SMTP and the admin API, IPv6 included.
//!
//! `[::]` and `0.0.0.0` on the same port can only both be bound when the IPv6 socket is
//! IPv6-only, so that is set whenever the list has both. A lone `[::]` is dual-stack (it also
//! takes IPv4, as IPv4-mapped addresses). Where the host or the pod has no IPv6 at all, an
//! IPv6 wildcard is left out quietly (IPv4 then falls back to `0.0.0.0` on that port), so one
//! default serves IPv4-only, IPv6-only and dual-stack machines.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
};

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tracing::info;

/// Pending connections the kernel queues before `accept`.
const BACKLOG: i32 = 1024;

/// Binds every address of `addrs`; `what` names the listener in errors ("SMTP").
pub fn bind_all(addrs: &[SocketAddr], what: &str) -> anyhow::Result<Vec<TcpListener>> {
    let mut out: Vec<TcpListener> = Vec::new();
    let mut v4_fallbacks = Vec::new();
    for a in addrs {
        let v4_too = addrs
            .iter()
            .any(|b| b.port() == a.port() && b.ip() == std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        match bind(*a, a.is_ipv6() && a.ip().is_unspecified() && v4_too) {
            Ok(l) => out.push(l),
            Err(e) if a.is_ipv6() && a.ip().is_unspecified() && no_ipv6(&e) => {
                info!(address = %a, error = %e, "no IPv6 here: {what} listens on IPv4 only");
                if !v4_too {
                    v4_fallbacks.push(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), a.port()));
                }
            }
            Err(e) => anyhow::bail!("cannot listen for {what} on {a}: {e}"),
        }
    }
    for a in v4_fallbacks {
        out.push(
            bind(a, false).map_err(|e| anyhow::anyhow!("cannot listen for {what} on {a}: {e}"))?,
        );
    }
    Ok(out)
}

/// Binds one address; the admin API has exactly one.
pub fn bind_one(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let mut v = bind_all(&[addr], what)?;
    Ok(v.remove(0))
}

fn bind(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(v6_only)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// True for the errors of a machine or pod without IPv6.
fn no_ipv6(e: &io::Error) -> bool {
    // EAFNOSUPPORT (IPv6 not compiled in / disabled), EADDRNOTAVAIL (no IPv6 address)
    matches!(e.raw_os_error(), Some(97) | Some(99))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn both_wildcards_on_one_port_bind_together() {
        let port = free_port();
        let addrs: Vec<SocketAddr> = vec![
            format!("[::]:{port}").parse().unwrap(),
            format!("0.0.0.0:{port}").parse().unwrap(),
        ];
        let ls = bind_all(&addrs, "SMTP").unwrap();
        assert!(!ls.is_empty());
        assert!(
            ls.iter()
                .any(|l| l.local_addr().unwrap().ip() == Ipv4Addr::UNSPECIFIED),
            "IPv4 wildcard bound"
        );
        // IPv4 reaches it whatever the IPv6 situation
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_busy_port_names_the_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let err = bind_all(&[a], "SMTP").unwrap_err().to_string();
        assert!(
            err.contains(&format!("cannot listen for SMTP on {a}")),
            "{err}"
        );
    }
}
