//! mx-pod: a backup MX queue server.
//!
//! Mail flows one way: [`smtp`] accepts a message after the [`policy`] checks and hands it to
//! the [`queue`], which answers only once it is durable; [`replay`] takes it from the queue,
//! oldest first, and delivers it to the domain's primary, throttled; [`dsn`] tells senders about
//! failures. [`admin`] exposes the queue and the replay controls over HTTP, [`metrics`] the
//! counters. [`trust`] says what outbound TLS trusts and how SMTP uses it (the TLS policy).
//! [`outbound`] is the one SMTP client (replay, DSNs, the recipient callout, the probe), with
//! its own transaction type; [`reply`] the replies mx-pod sends, [`address`] envelope addresses
//! as written, [`resolver`] DNS lookups. [`config`], [`probe`], [`outbound`] and [`trust`] are
//! shared with the operator.
//!
//! Imports run one way: `smtp` → `policy` → `queue` → `replay` → `outbound`; the shared
//! leaves (`config`, `reply`, `address`, `trust`, `resolver`) import none of those.
//!
//! ```text
//! client ──SMTP──▶ smtp ─▶ policy ─▶ queue (log on disk) ─▶ replay ──SMTP──▶ primary
//!                                        ▲                     │
//!                                   admin API            dsn (to senders)
//! ```
#![forbid(unsafe_code)]

pub mod address;
pub mod admin;
pub mod config;
pub mod dsn;
pub mod listen;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod queue;
pub mod replay;
pub mod reply;
pub mod resolver;
pub mod server;
pub mod smtp;
pub mod trust;
