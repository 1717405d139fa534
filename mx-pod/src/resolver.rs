//! DNS resolvers (hickory) for the lookups mx-pod makes: MX of senders' domains for DSNs,
//! DNSBL lookups of clients, SPF/DMARC/DKIM records. Each is either the system's resolver or a
//! configured server (`ip:port`), with answers cached by their TTL.

use std::{net::SocketAddr, time::Duration};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
};

/// Answers kept in a resolver's cache (by TTL).
const CACHE_SIZE: u64 = 8192;

/// The configuration of a resolver asking `server`, or the system's (`/etc/resolv.conf`).
pub fn resolver_config(
    server: Option<SocketAddr>,
    timeout: Duration,
) -> Result<(ResolverConfig, ResolverOpts), String> {
    let (config, mut opts) = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            let mut rc = ResolverConfig::default();
            rc.add_name_server(ns);
            (rc, ResolverOpts::default())
        }
        None => hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?,
    };
    opts.timeout = timeout;
    opts.attempts = 2;
    opts.cache_size = CACHE_SIZE;
    Ok((config, opts))
}

/// A resolver asking `server` (or the system's), with `timeout` per query.
pub fn resolver(server: Option<SocketAddr>, timeout: Duration) -> Result<TokioResolver, String> {
    let (config, opts) = resolver_config(server, timeout)?;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| format!("cannot build a DNS resolver: {e}"))
}
