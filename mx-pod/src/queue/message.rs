//! What a queued message is: its envelope, its recipients and their delivery state.
//!
//! These types are written to the queue log as JSON (see `store`), so field changes must stay
//! backward compatible: add fields with `#[serde(default)]`, never rename.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A message's queue id: unique across restarts, increasing with time (16 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct QueueId(pub u64);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl std::str::FromStr for QueueId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16)
            .map(QueueId)
            .map_err(|_| format!("{s:?} is not a queue id (16 hex digits)"))
    }
}

/// Microseconds since the Unix epoch.
pub type Micros = u64;

/// Now, in microseconds since the Unix epoch.
pub fn now_micros() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Why a message is in the queue: mail for a served domain, or a DSN we generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    #[default]
    Mail,
    /// A delivery status notification, sent with the null sender to the original sender.
    Dsn,
}

pub use crate::outbound::{DsnRet, Notify};

/// Where a recipient stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RcptStatus {
    /// Not yet delivered; retried until it is delivered, fails or expires.
    Pending,
    /// The primary accepted it (`2xx`).
    Delivered { at: Micros, reply: String },
    /// Permanently failed (`5xx` or expired); the sender was notified if it asked to be.
    Failed { at: Micros, reply: String },
}

impl RcptStatus {
    pub fn is_final(&self) -> bool {
        !matches!(self, RcptStatus::Pending)
    }
}

/// One recipient of a message with its own delivery state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address as given in RCPT TO (without angle brackets).
    pub address: String,
    /// The route to its primary: the address' domain in its route form (A-label, lower case;
    /// [`route_of`]). Normalised again when read back, so a queue written by an older version
    /// (which kept a U-label here) still has one route per domain.
    #[serde(deserialize_with = "deserialize_route")]
    pub domain: String,
    /// RFC 3461 ORCPT, kept for the replay and for DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    #[serde(default)]
    pub notify: Notify,
    pub status: RcptStatus,
    /// Delivery attempts that ended in a temporary failure.
    #[serde(default)]
    pub attempts: u32,
    /// When this recipient may be tried again after a temporary failure.
    #[serde(default)]
    pub next_attempt: Micros,
    /// The last temporary failure, for `queue show` and DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Recipient {
    /// What the outbound client sends in RCPT TO for this recipient.
    pub fn rcpt(&self) -> crate::outbound::Rcpt<'_> {
        crate::outbound::Rcpt {
            address: &self.address,
            notify: self.notify,
            orcpt: self.orcpt.as_deref(),
        }
    }

    pub fn new(address: String, orcpt: Option<String>, notify: Notify) -> Self {
        let domain = address
            .rsplit_once('@')
            .map(|(_, d)| route_of(d))
            .unwrap_or_default();
        Self {
            address,
            domain,
            orcpt,
            notify,
            status: RcptStatus::Pending,
            attempts: 0,
            next_attempt: 0,
            last_error: None,
        }
    }
}

/// The route of an address' domain: its A-label form in lower case, so `bücher.example`,
/// `Bücher.example` and `XN--BCHER-KVA.example` are one route. A domain that is no host name (an
/// address literal of a DSN's sender) keeps its spelling, lower-cased.
pub fn route_of(domain: &str) -> String {
    crate::config::to_ascii_domain(domain).unwrap_or_else(|| domain.to_ascii_lowercase())
}

fn deserialize_route<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let stored = String::deserialize(d)?;
    // the DSN route's recipients keep the sender's domain; `_dsn` itself is never stored here
    Ok(route_of(&stored))
}

/// Facts about the SMTP client, for `Received:` and logs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClientInfo {
    pub ip: String,
    pub helo: String,
}

/// Everything about a message but its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    #[serde(default)]
    pub kind: MessageKind,
    /// When the message was accepted.
    pub arrival: Micros,
    /// Reverse path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Body size in bytes (including our `Received:` header).
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<DsnRet>,
    /// MAIL FROM had `SMTPUTF8`.
    #[serde(default)]
    pub smtputf8: bool,
    /// MAIL FROM had `BODY=8BITMIME`.
    #[serde(default)]
    pub eight_bit: bool,
    #[serde(default)]
    pub client: ClientInfo,
    /// Held by an admin: not delivered until released.
    #[serde(default)]
    pub held: bool,
    /// The one delay warning was sent.
    #[serde(default)]
    pub delay_warned: bool,
}

impl Envelope {
    /// What the outbound client sends in MAIL FROM for this message.
    pub fn transaction(&self) -> crate::outbound::Transaction<'_> {
        crate::outbound::Transaction {
            sender: &self.sender,
            ret: self.ret,
            env_id: self.env_id.as_deref(),
            smtputf8: self.smtputf8,
            eight_bit: self.eight_bit,
        }
    }

    /// True when every recipient is delivered or failed.
    pub fn is_done(&self) -> bool {
        self.recipients.iter().all(|r| r.status.is_final())
    }

    /// The domains that still have pending recipients, each once, in recipient order.
    pub fn pending_domains(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.recipients {
            if !r.status.is_final() && !out.contains(&r.domain) {
                out.push(r.domain.clone());
            }
        }
        out
    }
}

#[cfg(test)]
impl Envelope {
    /// A plain message for tests: id `id` (also its arrival time), from `sender` to `rcpts`.
    pub fn for_test(id: u64, sender: &str, rcpts: &[&str]) -> Envelope {
        Envelope {
            id: QueueId(id),
            kind: MessageKind::Mail,
            arrival: id,
            sender: sender.into(),
            recipients: rcpts
                .iter()
                .map(|r| Recipient::new((*r).into(), None, Notify::default()))
                .collect(),
            size: 0,
            env_id: None,
            ret: None,
            smtputf8: false,
            eight_bit: false,
            client: ClientInfo::default(),
            held: false,
            delay_warned: false,
        }
    }
}

/// The part of an envelope that changes after acceptance, written as a state record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    pub id: QueueId,
    pub recipients: Vec<Recipient>,
    pub held: bool,
    pub delay_warned: bool,
}

impl MessageState {
    pub fn of(env: &Envelope) -> Self {
        Self {
            id: env.id,
            recipients: env.recipients.clone(),
            held: env.held,
            delay_warned: env.delay_warned,
        }
    }

    /// Applies this snapshot to an envelope read from the log.
    pub fn apply_to(self, env: &mut Envelope) {
        if self.recipients.len() == env.recipients.len() {
            env.recipients = self.recipients;
        }
        env.held = self.held;
        env.delay_warned = self.delay_warned;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_id_round_trips() {
        let id = QueueId(0x0123_4567_89AB_CDEF);
        assert_eq!(id.to_string(), "0123456789ABCDEF");
        assert_eq!("0123456789abcdef".parse::<QueueId>().unwrap(), id);
        assert!("xyz".parse::<QueueId>().is_err());
    }

    #[test]
    fn notify_defaults_follow_rfc3461() {
        let default = Notify::default();
        assert!(default.on_failure() && default.on_delay());
        let never = Notify {
            never: true,
            explicit: true,
            ..Default::default()
        };
        assert!(!never.on_failure() && !never.on_delay());
        let success_only = Notify {
            success: true,
            explicit: true,
            ..Default::default()
        };
        assert!(!success_only.on_failure());
    }

    #[test]
    fn an_idn_recipient_has_the_a_label_route_and_keeps_its_spelling() {
        for address in [
            "jürgen@bücher.example",
            "user@Bücher.EXAMPLE",
            "user@XN--BCHER-KVA.example",
        ] {
            let r = Recipient::new(address.into(), None, Notify::default());
            assert_eq!(r.domain, "xn--bcher-kva.example", "{address}");
            assert_eq!(r.address, address);
        }
        // a queue written before routes were normalised: read back with the A-label route
        let old = r#"{"address":"a@bücher.example","domain":"bücher.example","status":{"state":"pending"}}"#;
        let r: Recipient = serde_json::from_str(old).unwrap();
        assert_eq!(r.domain, "xn--bcher-kva.example");
    }

    #[test]
    fn recipient_domain_is_lowercased() {
        let r = Recipient::new("User@Example.COM".into(), None, Notify::default());
        assert_eq!(r.domain, "example.com");
        assert_eq!(r.address, "User@Example.COM");
    }
}
