//! Delivery status notifications (RFC 3464): `failed` when a recipient is refused by the
//! primary or its mail expires, one `delayed` warning after `delay_warning`. Built with
//! mail-builder as `multipart/report; report-type=delivery-status`.
//!
//! Never sent to the null sender (a bounce of a bounce), never for a DSN we generated, and only
//! for recipients whose NOTIFY asks for it. The notification itself is queued like any message
//! (durably, before the original is finished), with the null sender, so it is not lost either.

use mail_builder::{
    MessageBuilder,
    headers::{HeaderType, content_type::ContentType, raw::Raw},
    mime::MimePart,
};

use crate::queue::message::{DsnRet, Envelope, MessageKind, Micros, Notify, QueueId, Recipient};

/// Which notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnKind {
    Failed,
    Delayed,
}

/// One recipient reported in a DSN.
#[derive(Debug, Clone)]
pub struct DsnRecipient {
    pub address: String,
    pub orcpt: Option<String>,
    /// The reply (or our reason) that decided the outcome, e.g. `550 5.1.1 No such user`.
    pub diagnostic: String,
}

/// Which recipients of `env` should be reported for `kind`; empty when no DSN is due.
pub fn wanted<'a>(
    env: &Envelope,
    kind: DsnKind,
    rcpts: impl Iterator<Item = &'a Recipient>,
) -> bool {
    if env.sender.is_empty() || env.kind == MessageKind::Dsn {
        return false;
    }
    let mut any = false;
    for r in rcpts {
        any |= match kind {
            DsnKind::Failed => r.notify.on_failure(),
            DsnKind::Delayed => r.notify.on_delay(),
        };
    }
    any
}

/// Extracts the enhanced status code from a reply, or derives one from its class.
pub fn status_of(diagnostic: &str, kind: DsnKind) -> String {
    let mut words = diagnostic.split_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(esc) = words.next()
        && esc.split('.').count() == 3
        && esc
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return esc.to_owned();
    }
    match (kind, code.chars().next()) {
        (DsnKind::Delayed, _) => "4.0.0".into(),
        (_, Some('4')) => "4.0.0".into(),
        _ => "5.0.0".into(),
    }
}

/// What a DSN reports about a message.
pub struct Report<'a> {
    pub kind: DsnKind,
    pub recipients: &'a [DsnRecipient],
    /// The original message, for its headers (or all of it with `RET=FULL`).
    pub original: Option<&'a [u8]>,
    /// For delay warnings: until when we keep trying.
    pub retry_until: Option<Micros>,
}

/// Builds a DSN about `env`; returns the envelope and body to queue under `id`.
pub fn build(
    id: QueueId,
    hostname: &str,
    env: &Envelope,
    report: &Report<'_>,
    now: Micros,
) -> (Envelope, Vec<u8>) {
    let Report {
        kind,
        recipients: rcpts,
        original,
        retry_until,
    } = *report;
    let arrival = rfc2822(env.arrival);
    let (subject, intro) = match kind {
        DsnKind::Failed => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients.\r\n\
             It was accepted by this backup mail server while the primary was unavailable,\r\n\
             and then refused by the primary or kept for too long.",
        ),
        DsnKind::Delayed => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered yet to one or more recipients.\r\n\
             It is safely queued on this backup mail server while the primary mail server is\r\n\
             unavailable, and will be retried. No action is required.",
        ),
    };
    let mut human = format!(
        "This is the mail system at host {hostname}.\r\n\r\n{intro}\r\n\r\nQueue id: {}\r\nArrived: {arrival}\r\n\r\n",
        env.id
    );
    for r in rcpts {
        human.push_str(&format!("<{}>: {}\r\n", r.address, r.diagnostic));
    }

    let mut status = format!("Reporting-MTA: dns; {hostname}\r\n");
    if let Some(envid) = &env.env_id {
        status.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    status.push_str(&format!("Arrival-Date: {arrival}\r\n"));
    for r in rcpts {
        status.push_str("\r\n");
        status.push_str(&format!("Final-Recipient: rfc822; {}\r\n", r.address));
        if let Some(o) = &r.orcpt {
            let o = crate::outbound::orcpt_address(o);
            status.push_str(&format!("Original-Recipient: rfc822; {o}\r\n"));
        }
        let action = match kind {
            DsnKind::Failed => "failed",
            DsnKind::Delayed => "delayed",
        };
        status.push_str(&format!("Action: {action}\r\n"));
        status.push_str(&format!("Status: {}\r\n", status_of(&r.diagnostic, kind)));
        status.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", r.diagnostic));
        status.push_str(&format!("Last-Attempt-Date: {}\r\n", rfc2822(now)));
        if let Some(until) = retry_until {
            status.push_str(&format!("Will-Retry-Until: {}\r\n", rfc2822(until)));
        }
    }

    let mut parts = vec![
        MimePart::new("text/plain", human),
        MimePart::new("message/delivery-status", status.into_bytes()).header(
            "Content-Transfer-Encoding",
            HeaderType::Raw(Raw::new("7bit")),
        ),
    ];
    if let Some(original) = original {
        let (ctype, content) = match env.ret {
            Some(DsnRet::Full) => ("message/rfc822", original.to_vec()),
            _ => ("text/rfc822-headers", header_section(original).to_vec()),
        };
        parts.push(MimePart::new(ctype, content).header(
            "Content-Transfer-Encoding",
            HeaderType::Raw(Raw::new("8bit")),
        ));
    }
    let body = MessageBuilder::new()
        .from((
            "Mail Delivery System".to_owned(),
            format!("MAILER-DAEMON@{hostname}"),
        ))
        .to(env.sender.as_str())
        .subject(subject)
        .message_id(format!("{id}@{hostname}"))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
            parts,
        ))
        .write_to_vec()
        .expect("writing to a Vec cannot fail");

    let recipient = Recipient::new(
        env.sender.clone(),
        None,
        Notify {
            never: true,
            explicit: true,
            ..Default::default()
        },
    );
    let envelope = Envelope {
        id,
        kind: MessageKind::Dsn,
        arrival: now,
        sender: String::new(),
        recipients: vec![recipient],
        size: body.len() as u64,
        env_id: None,
        ret: None,
        // a DSN to a UTF-8 sender needs SMTPUTF8 like any mail to that address: passed on where
        // the sender's server offers it, never sent downgraded where it does not
        smtputf8: !env.sender.is_ascii(),
        eight_bit: true,
        client: Default::default(),
        held: false,
        delay_warned: false,
    };
    (envelope, body)
}

/// The header section of a message (up to and including the empty line).
fn header_section(msg: &[u8]) -> &[u8] {
    msg.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(msg, |p| &msg[..p + 4])
}

fn rfc2822(micros: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(micros as i64)
        .unwrap_or_default()
        .format("%a, %d %b %Y %H:%M:%S +0000")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original() -> Envelope {
        let mut env = Envelope {
            arrival: 1_700_000_000_000_000,
            size: 10,
            env_id: Some("ENV42".into()),
            ..Envelope::for_test(7, "alice@sender.test", &["bob@example.test"])
        };
        env.recipients[0].orcpt = Some("rfc822;bob@example.test".into());
        env
    }

    #[test]
    fn failure_dsn_is_a_delivery_status_report_to_the_sender() {
        let env = original();
        let rcpts = [DsnRecipient {
            address: "bob@example.test".into(),
            orcpt: Some("bob@example.test".into()),
            diagnostic: "550 5.1.1 No such user".into(),
        }];
        let report = Report {
            kind: DsnKind::Failed,
            recipients: &rcpts,
            original: Some(b"Subject: hi\r\nX: y\r\n\r\nsecret body\r\n"),
            retry_until: None,
        };
        let (dsn, body) = build(
            QueueId(8),
            "mx2.example.test",
            &env,
            &report,
            1_700_000_100_000_000,
        );
        assert_eq!(dsn.sender, "", "DSNs use the null sender");
        assert_eq!(dsn.kind, MessageKind::Dsn);
        assert!(!dsn.smtputf8, "an ASCII sender needs no SMTPUTF8");
        let utf8_sender = Envelope {
            sender: "jürgen@sender.test".into(),
            ..original()
        };
        let (to_utf8, _) = build(QueueId(9), "mx2.example.test", &utf8_sender, &report, 0);
        assert!(to_utf8.smtputf8, "a DSN to a UTF-8 sender needs SMTPUTF8");
        assert_eq!(dsn.recipients[0].address, "alice@sender.test");
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("multipart/report"), "{text}");
        assert!(
            text.contains("report-type=\"delivery-status\"")
                || text.contains("report-type=delivery-status"),
            "{text}"
        );
        assert!(text.contains("Action: failed"));
        assert!(text.contains("Status: 5.1.1"));
        assert!(text.contains("Original-Envelope-Id: ENV42"));
        assert!(text.contains("Original-Recipient: rfc822; bob@example.test"));
        assert!(text.contains("Subject: hi"), "headers returned");
        assert!(
            !text.contains("secret body"),
            "body not returned without RET=FULL"
        );
    }

    #[test]
    fn no_dsn_to_null_sender_or_for_dsns_or_when_never() {
        let mut env = original();
        assert!(wanted(&env, DsnKind::Failed, env.recipients.iter()));
        env.recipients[0].notify = Notify {
            never: true,
            explicit: true,
            ..Default::default()
        };
        assert!(!wanted(&env, DsnKind::Failed, env.recipients.iter()));
        let mut env = original();
        env.sender.clear();
        assert!(!wanted(&env, DsnKind::Failed, env.recipients.iter()));
        let mut env = original();
        env.kind = MessageKind::Dsn;
        assert!(!wanted(&env, DsnKind::Delayed, env.recipients.iter()));
    }

    #[test]
    fn status_codes() {
        assert_eq!(status_of("550 5.7.1 denied", DsnKind::Failed), "5.7.1");
        assert_eq!(status_of("554 no", DsnKind::Failed), "5.0.0");
        assert_eq!(status_of("451 try later", DsnKind::Delayed), "4.0.0");
    }
}
