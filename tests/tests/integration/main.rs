//! Integration tests with real components (Postfix, smtp-sink, swaks, smtp-source) and the real
//! mx-pod binary, all on 127.0.0.1. One test binary with a module per area links faster than
//! many on two cores.

mod addresses;
mod admin;
mod check_mx;
mod commit_order;
mod crash;
mod disk_full;
mod dns_rfc2136;
mod dsn_params;
mod expiry;
mod faults;
mod filter_dns;
mod filter_recipients;
mod filter_rspamd;
mod filter_smtp;
mod ipv6;
mod lifecycle;
mod one_writer;
mod outage;
mod probe_tls;
mod rate;
mod recovery;
mod relay_battery;
mod replay_protocol;
mod slow_peers;
mod smuggling;
mod tls_primary;
