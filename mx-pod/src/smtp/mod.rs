//! Inbound SMTP: the listener and the per-connection session (its commands in `session/`).

pub mod budget;
pub mod listener;
pub mod proxy;
pub mod session;
pub mod tls;
