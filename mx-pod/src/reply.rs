//! Every SMTP reply mx-pod sends, with its code and enhanced status code (RFC 3463), in one
//! place, so the replies, the log fields and the metric labels cannot drift apart.

use std::{borrow::Cow, fmt};

/// One SMTP reply: code, enhanced status code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: &'static str,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, status: &'static str, text: &'static str) -> Self {
        Reply {
            code,
            status,
            text: Cow::Borrowed(text),
        }
    }

    pub fn dynamic(code: u16, status: &'static str, text: String) -> Self {
        Reply {
            code,
            status,
            text: Cow::Owned(text),
        }
    }

    /// Appends the reply in wire form (`CODE STATUS TEXT\r\n`).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.status.is_empty() {
            write!(f, "{} {}", self.code, self.text)
        } else {
            write!(f, "{} {} {}", self.code, self.status, self.text)
        }
    }
}

/// Why a command or message was refused: the `reason` label of `mxpod_rejected_total` and
/// the `reason` field of the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    Relay,
    SourceRoute,
    Size,
    TooManyRecipients,
    Loop,
    BareLineEnding,
    Syntax,
    BadSequence,
    QueueFull,
    StorageError,
    Shutdown,
    TooManyConnections,
    TooManyErrors,
    Timeout,
    LineTooLong,
    NotImplemented,
    /// rspamd said `reject`.
    Spam,
    /// rspamd said `soft reject` or `greylist`.
    SpamTempfail,
    /// rspamd could not be asked and `fail_mode = "tempfail"`.
    FilterUnavailable,
    /// The client IP is on a DNS blocklist.
    Dnsbl,
    /// DMARC failed where the sender's domain says `p=reject` (`auth = "enforce"`).
    AuthFailed,
    /// The recipient does not exist (list, or the primary said so).
    UnknownRecipient,
    /// The recipient could not be verified (primary down, not cached, `fail_mode = "tempfail"`).
    RecipientUnverified,
    /// Messages or recipients per minute from this IP over the limit.
    RateLimited,
    /// Too many connections from this IP.
    TooManyConnectionsFromIp,
    /// STARTTLS asked but not possible now (certificate unreadable).
    TlsUnavailable,
    /// `smtp.proxy_protocol` is on and the connection did not start with a valid PROXY header.
    ProxyHeader,
    /// The memory for messages in transit (`smtp.max_inflight_data`) stayed taken too long.
    Busy,
    /// A sender or recipient address with UTF-8 in it, in a transaction whose MAIL had no
    /// `SMTPUTF8` (RFC 6531 3.7.4.1).
    NonAsciiAddress,
}

impl RejectReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Relay => "relay",
            RejectReason::SourceRoute => "source_route",
            RejectReason::Size => "size",
            RejectReason::TooManyRecipients => "too_many_recipients",
            RejectReason::Loop => "loop",
            RejectReason::BareLineEnding => "bare_line_ending",
            RejectReason::Syntax => "syntax",
            RejectReason::BadSequence => "bad_sequence",
            RejectReason::QueueFull => "queue_full",
            RejectReason::StorageError => "storage_error",
            RejectReason::Shutdown => "shutdown",
            RejectReason::TooManyConnections => "too_many_connections",
            RejectReason::TooManyErrors => "too_many_errors",
            RejectReason::Timeout => "timeout",
            RejectReason::LineTooLong => "line_too_long",
            RejectReason::NotImplemented => "not_implemented",
            RejectReason::Spam => "spam",
            RejectReason::SpamTempfail => "spam_tempfail",
            RejectReason::FilterUnavailable => "filter_unavailable",
            RejectReason::Dnsbl => "dnsbl",
            RejectReason::AuthFailed => "auth_failed",
            RejectReason::UnknownRecipient => "unknown_recipient",
            RejectReason::RecipientUnverified => "recipient_unverified",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::TooManyConnectionsFromIp => "too_many_connections_from_ip",
            RejectReason::TlsUnavailable => "tls_unavailable",
            RejectReason::ProxyHeader => "proxy_header",
            RejectReason::Busy => "busy",
            RejectReason::NonAsciiAddress => "non_ascii_address",
        }
    }

    /// All reasons, for pre-registering metric series.
    pub const ALL: [RejectReason; 29] = [
        RejectReason::Relay,
        RejectReason::SourceRoute,
        RejectReason::Size,
        RejectReason::TooManyRecipients,
        RejectReason::Loop,
        RejectReason::BareLineEnding,
        RejectReason::Syntax,
        RejectReason::BadSequence,
        RejectReason::QueueFull,
        RejectReason::StorageError,
        RejectReason::Shutdown,
        RejectReason::TooManyConnections,
        RejectReason::TooManyErrors,
        RejectReason::Timeout,
        RejectReason::LineTooLong,
        RejectReason::NotImplemented,
        RejectReason::Spam,
        RejectReason::SpamTempfail,
        RejectReason::FilterUnavailable,
        RejectReason::Dnsbl,
        RejectReason::AuthFailed,
        RejectReason::UnknownRecipient,
        RejectReason::RecipientUnverified,
        RejectReason::RateLimited,
        RejectReason::TooManyConnectionsFromIp,
        RejectReason::TlsUnavailable,
        RejectReason::ProxyHeader,
        RejectReason::Busy,
        RejectReason::NonAsciiAddress,
    ];

    /// The reply sent for this reason.
    pub fn reply(self) -> Reply {
        match self {
            RejectReason::Relay => Reply::new(550, "5.7.1", "Relay access denied"),
            RejectReason::SourceRoute => Reply::new(550, "5.7.1", "Source routes are not accepted"),
            RejectReason::Size => Reply::new(552, "5.3.4", "Message size exceeds fixed limit"),
            RejectReason::TooManyRecipients => Reply::new(452, "4.5.3", "Too many recipients"),
            RejectReason::Loop => Reply::new(
                554,
                "5.4.6",
                "Too many Received: headers - mail loop detected",
            ),
            RejectReason::BareLineEnding => Reply::new(
                550,
                "5.6.11",
                "Bare CR or LF in message; lines must end with CRLF",
            ),
            RejectReason::Syntax => Reply::new(500, "5.5.2", "Syntax error, command unrecognized"),
            RejectReason::BadSequence => Reply::new(503, "5.5.1", "Bad sequence of commands"),
            RejectReason::QueueFull => Reply::new(452, "4.3.1", "Insufficient system storage"),
            RejectReason::StorageError => {
                Reply::new(451, "4.3.0", "Local error in processing; try again later")
            }
            RejectReason::Shutdown => {
                Reply::new(421, "4.3.2", "Service shutting down, try again later")
            }
            RejectReason::TooManyConnections => {
                Reply::new(421, "4.7.0", "Too many connections, try again later")
            }
            RejectReason::TooManyErrors => {
                Reply::new(421, "4.7.0", "Too many errors, closing connection")
            }
            RejectReason::Timeout => Reply::new(421, "4.4.2", "Timeout, closing connection"),
            RejectReason::LineTooLong => Reply::new(500, "5.5.2", "Line too long"),
            RejectReason::NotImplemented => Reply::new(502, "5.5.1", "Command not implemented"),
            RejectReason::Spam => Reply::new(550, "5.7.1", "Message rejected as spam"),
            RejectReason::SpamTempfail => Reply::new(
                451,
                "4.7.1",
                "Message deferred by the spam filter, try again later",
            ),
            RejectReason::FilterUnavailable => {
                Reply::new(451, "4.7.1", "Content filter unavailable, try again later")
            }
            RejectReason::Dnsbl => Reply::new(554, "5.7.1", "Client host blocked"),
            RejectReason::AuthFailed => Reply::new(
                550,
                "5.7.1",
                "Message refused: DMARC policy of the sender's domain says reject",
            ),
            RejectReason::UnknownRecipient => {
                Reply::new(550, "5.1.1", "Recipient address rejected: user unknown")
            }
            RejectReason::RecipientUnverified => Reply::new(
                450,
                "4.2.0",
                "Recipient address cannot be verified now, try again later",
            ),
            RejectReason::RateLimited => Reply::new(
                451,
                "4.7.1",
                "Rate limit exceeded, slow down and try again later",
            ),
            RejectReason::TooManyConnectionsFromIp => {
                Reply::new(421, "4.7.0", "Too many connections from your address")
            }
            RejectReason::TlsUnavailable => {
                Reply::new(454, "4.7.0", "TLS not available due to temporary reason")
            }
            RejectReason::ProxyHeader => {
                Reply::new(421, "4.7.0", "Missing or invalid PROXY protocol header")
            }
            RejectReason::Busy => Reply::new(
                451,
                "4.3.2",
                "Too much mail in transit at the moment, try again later",
            ),
            RejectReason::NonAsciiAddress => Reply::new(
                553,
                "5.6.7",
                "Non-ASCII address not permitted without SMTPUTF8",
            ),
        }
    }
}

pub const OK_MAIL: Reply = Reply::new(250, "2.1.0", "Sender OK");
pub const OK_RCPT: Reply = Reply::new(250, "2.1.5", "Recipient OK");
pub const OK: Reply = Reply::new(250, "2.0.0", "OK");
pub const START_DATA: Reply = Reply::new(354, "", "End data with <CR><LF>.<CR><LF>");
pub const BYE: Reply = Reply::new(221, "2.0.0", "Bye");
pub const VRFY: Reply = Reply::new(252, "2.5.0", "Cannot VRFY user, but will accept message");
pub const HELP: Reply = Reply::new(214, "2.0.0", "See RFC 5321");
pub const NO_RECIPIENTS: Reply = Reply::new(554, "5.5.1", "No valid recipients");
pub const NEED_HELO: Reply = Reply::new(503, "5.5.1", "Send HELO/EHLO first");
pub const NESTED_MAIL: Reply = Reply::new(503, "5.5.1", "Nested MAIL command");
pub const NEED_MAIL: Reply = Reply::new(503, "5.5.1", "Need MAIL command first");
pub const BAD_SENDER: Reply = Reply::new(501, "5.1.7", "Bad sender address syntax");
pub const BAD_RECIPIENT: Reply = Reply::new(501, "5.1.3", "Bad recipient address syntax");
pub const READY_TLS: Reply = Reply::new(220, "2.0.0", "Ready to start TLS");
pub const BAD_SEQUENCE_TLS: Reply = Reply::new(503, "5.5.1", "TLS already active");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_has_code_status_and_crlf() {
        let mut out = Vec::new();
        RejectReason::Relay.reply().write_to(&mut out);
        assert_eq!(out, b"550 5.7.1 Relay access denied\r\n");
        let mut out = Vec::new();
        START_DATA.write_to(&mut out);
        assert_eq!(out, b"354 End data with <CR><LF>.<CR><LF>\r\n");
    }

    #[test]
    fn reasons_have_distinct_labels_and_error_codes() {
        let mut labels = std::collections::HashSet::new();
        for r in RejectReason::ALL {
            assert!(labels.insert(r.as_str()), "duplicate label {}", r.as_str());
            let reply = r.reply();
            assert!(reply.code >= 400, "{r:?} must be an error reply");
            assert_eq!(
                reply.status.as_bytes()[0] as char,
                char::from_digit(u32::from(reply.code / 100), 10).unwrap(),
                "{r:?}: enhanced status class matches the code"
            );
        }
    }
}
