use super::*;

#[test]
fn dot_stuffing() {
    assert_eq!(dot_stuff(b".a\r\nb\r\n.\r\n"), b"..a\r\nb\r\n..\r\n");
    assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n");
}

#[test]
fn capabilities_from_ehlo() {
    let r = ServerReply {
        code: 250,
        lines: vec![
            "mx Hello".into(),
            "PIPELINING".into(),
            "SIZE 1000".into(),
            "dsn".into(),
            "STARTTLS".into(),
        ],
    };
    let c = Capabilities::parse(&r);
    assert!(c.pipelining && c.dsn && c.starttls && !c.smtputf8);
    assert_eq!(c.size, Some(1000));
}

#[test]
fn classification() {
    let r = |code| ServerReply {
        code,
        lines: vec!["x".into()],
    };
    assert!(matches!(classify(&r(250)), RcptResult::Delivered(_)));
    assert!(matches!(classify(&r(451)), RcptResult::Deferred(_)));
    assert!(matches!(classify(&r(550)), RcptResult::Failed(_)));
}

#[test]
fn orcpt_is_sent_with_its_address_type_and_xtext() {
    let notify = Notify {
        failure: true,
        explicit: true,
        ..Notify::default()
    };
    let r = Rcpt {
        address: "bob@example.test",
        notify,
        orcpt: Some("Bob+Tax=1@Example.test"),
    };
    let dsn = Capabilities {
        dsn: true,
        ..Capabilities::default()
    };
    assert_eq!(
        rcpt_line(&dsn, &r),
        "RCPT TO:<bob@example.test> NOTIFY=FAILURE ORCPT=rfc822;Bob+2BTax+3D1@Example.test\r\n"
    );
    // without DSN at the primary: no parameters
    assert_eq!(
        rcpt_line(&Capabilities::default(), &r),
        "RCPT TO:<bob@example.test>\r\n"
    );
    assert_eq!(orcpt_address("rfc822; a@b.test"), "a@b.test");
    assert_eq!(orcpt_address("a@b.test"), "a@b.test");
}

#[tokio::test]
async fn may_falls_back_to_plaintext_on_a_new_connection_and_encrypt_does_not() {
    let trust = Trust::webpki();
    let t = Duration::from_secs(5);
    // a server offering STARTTLS whose TLS is broken: it says `220` and hangs up
    let (addr, seen) = scripted(Script {
        ehlo: send(b"250-p.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"),
        starttls: Answer::Last(b"220 2.0.0 go ahead\r\n".to_vec()),
        ..Script::default()
    })
    .await;
    let connections = || seen.lock().unwrap().connections;
    let c = SmtpClient::open(&addr, "mx2.test", t, TlsPolicy::May, &trust)
        .await
        .expect("may delivers without TLS");
    assert!(c.tls.is_none());
    assert_eq!(c.tls_fallback, Some(TlsFailure::Handshake));
    assert_eq!(connections(), 2, "a new connection for plaintext");
    c.quit().await;

    for policy in [TlsPolicy::Encrypt, TlsPolicy::Verify] {
        let before = connections();
        let err = SmtpClient::open(&addr, "mx2.test", t, policy, &trust)
            .await
            .err()
            .expect("no plaintext under encrypt/verify");
        assert_eq!(err.tls_failure(), Some(TlsFailure::Handshake), "{err}");
        assert_eq!(connections(), before + 1, "no second try");
    }

    // none never says STARTTLS
    let before = connections();
    let c = SmtpClient::open(&addr, "mx2.test", t, TlsPolicy::None, &trust)
        .await
        .unwrap();
    assert!(c.tls.is_none() && c.tls_fallback.is_none());
    assert_eq!(connections(), before + 1);
}

#[test]
fn smtputf8_is_never_downgraded() {
    // (sender, smtputf8, recipients)
    type Msg<'a> = (&'a str, bool, &'a [&'a str]);
    let env = |sender, smtputf8, rcpts| -> Msg { (sender, smtputf8, rcpts) };
    let refused = |(sender, smtputf8, rcpts): &Msg, body: &[u8], offered: bool| {
        let tx = Transaction {
            sender,
            smtputf8: *smtputf8,
            ..Transaction::default()
        };
        let rcpts: Vec<(usize, Rcpt)> = rcpts
            .iter()
            .enumerate()
            .map(|(i, a)| (i, Rcpt::plain(a)))
            .collect();
        smtputf8_refusals(&tx, &rcpts, body, offered)
    };
    let ascii_body = b"Subject: hi\r\n\r\nbody: gr\xc3\xbc\xc3\x9fe\r\n";
    let mixed = env(
        "s@sender.test",
        true,
        &["a@example.test", "jürgen@example.test"],
    );
    // offered: everything goes, with SMTPUTF8
    assert!(refused(&mixed, ascii_body, true).is_empty());
    // not offered: only the recipient that needs it fails (the body is 8BITMIME's business)
    assert_eq!(refused(&mixed, ascii_body, false), vec![1]);
    // a UTF-8 sender or header: the whole message needs it
    let from_utf8 = env("jürgen@sender.test", true, &["a@example.test"]);
    assert_eq!(refused(&from_utf8, ascii_body, false), vec![0]);
    let utf8_header = env("s@sender.test", true, &["a@example.test"]);
    assert_eq!(
        refused(&utf8_header, "Subject: grüße\r\n\r\nx".as_bytes(), false),
        vec![0]
    );
    // marked SMTPUTF8 but all ASCII: sent as it is; not marked: not our call
    assert!(refused(&utf8_header, ascii_body, false).is_empty());
    assert!(
        refused(
            &env("s@sender.test", false, &["a@example.test"]),
            ascii_body,
            false
        )
        .is_empty()
    );
}

#[test]
fn xtext_escapes() {
    assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
}

// === the scripted server (`script`) ===

use std::sync::{Arc, Mutex};

use super::script::{Answer, Script, Seen, scripted, send, serve};

fn envelope() -> Transaction<'static> {
    Transaction {
        sender: "a@sender.test",
        ..Transaction::default()
    }
}

const RCPT: [(usize, Rcpt<'static>); 1] = [(
    0,
    Rcpt {
        address: "u@example.test",
        notify: Notify {
            success: false,
            failure: false,
            delay: false,
            never: false,
            explicit: false,
        },
        orcpt: None,
    },
)];

const BODY: &[u8] = b"Subject: t\r\n\r\nhello\r\n";

/// Sends one message to one recipient over `c`.
async fn send_one(c: &mut SmtpClient) -> Result<TxResult, ClientError> {
    c.send(&envelope(), &RCPT, BODY, &AtOnce).await
}

/// A session with the server at `addr` (TCP), saying EHLO `mx2.test`.
async fn connect(addr: &str) -> Result<SmtpClient, ClientError> {
    SmtpClient::connect(addr, "mx2.test", Duration::from_secs(10)).await
}

/// Connects to `script` on TCP and sends one message; returns what `send` said, whether the
/// connection is still usable, and what the server saw.
async fn deliver_to(script: Script) -> (Result<TxResult, ClientError>, bool, Arc<Mutex<Seen>>) {
    let (addr, seen) = scripted(script).await;
    let mut c = connect(&addr).await.expect("the session opens");
    let r = send_one(&mut c).await;
    (r, c.usable(), seen)
}

/// Fails the test unless the one recipient was delivered.
fn assert_delivered(tx: &TxResult) {
    assert!(
        matches!(&tx.results[..], [(0, RcptResult::Delivered(_))]),
        "{tx:?}"
    );
}

fn violation_of(r: &Result<TxResult, ClientError>) -> Option<(Stage, &Violation)> {
    r.as_ref().err().and_then(violation_in)
}

fn violation_in(e: &ClientError) -> Option<(Stage, &Violation)> {
    match e {
        ClientError::Violation { stage, violation } => Some((*stage, violation)),
        _ => None,
    }
}

/// The protocol violation that left the outcome unknown (it came after the final dot).
fn violation_after_the_dot(r: &Result<TxResult, ClientError>) -> Option<(Stage, &Violation)> {
    match r {
        Err(ClientError::UnknownOutcome(e)) => violation_in(e),
        _ => None,
    }
}

fn code_of(v: Option<(Stage, &Violation)>) -> Option<(Stage, u16)> {
    match v {
        Some((stage, Violation::UnexpectedReply(reply))) => Some((stage, reply.code)),
        _ => None,
    }
}

/// One reply read from `bytes` at once: `None` if it wants more.
fn parse(bytes: &[u8]) -> Result<Option<ServerReply>, Violation> {
    ReplyReader::default().read(bytes).map(|(_, reply)| reply)
}

fn one_line(code: u16, text: &str) -> Result<Option<ServerReply>, Violation> {
    Ok(Some(ServerReply {
        code,
        lines: vec![text.into()],
    }))
}

#[test]
fn only_smtp_reply_lines_parse() {
    assert_eq!(parse(b"250\r\n"), one_line(250, ""));
    assert_eq!(parse(b"250 ok\r\n"), one_line(250, "ok"));
    assert_eq!(parse(b"250-PIPELINING\r\n"), Ok(None));
    assert_eq!(parse(b"554 5.7.1 a\tb\r\n"), one_line(554, "5.7.1 a\tb"));
    for bad in [
        &b""[..],
        b"25",
        b"hello world",
        b"2500 ok",
        b"250x",
        b"150 not smtp",
        b"600 not smtp",
        b"250 a\0b",
        b"250 \x1b[31mred",
        // smtp-proto would drop the CR
        b"250 a\rb",
    ] {
        assert!(
            matches!(
                parse(&[bad, b"\r\n"].concat()),
                Err(Violation::Malformed(_))
            ),
            "{:?} parsed",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn every_line_of_a_reply_has_its_code() {
    // smtp-proto alone would call both a 250
    for (reply, first, then) in [
        (&b"250-ok\r\n550 5.7.1 no\r\n"[..], 250, 550),
        (b"550-no\r\n250 ok\r\n", 550, 250),
        (b"250-a\r\n250-b\r\n251 c\r\n", 250, 251),
    ] {
        assert_eq!(parse(reply), Err(Violation::MixedCodes { first, then }));
    }
}

#[test]
fn the_enhanced_status_code_leads_the_reply_text() {
    let lines = |bytes: &[u8]| parse(bytes).unwrap().unwrap().lines;
    // smtp-proto takes it off every line; the first line gets it back, once
    assert_eq!(
        lines(b"550-5.7.1 first\r\n550 5.7.1 second\r\n"),
        ["5.7.1 first", "second"]
    );
    // on the last line only: it still leads, where a DSN's `Status:` is looked for
    let r = parse(b"550-first\r\n550 5.7.26 second\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(r.text(), "550 5.7.26 first / second");
    assert_eq!(lines(b"250 2.0.0\r\n"), ["2.0.0"]);
    // not a status code: text as written, bare LF or CRLF
    assert_eq!(lines(b"250 2.1\r\n"), ["2.1"]);
    assert_eq!(lines(b"250-8BITMIME\n250 2.1\n"), ["8BITMIME", "2.1"]);
    assert_eq!(lines(b"250 192.0.2.1 hi\r\n"), ["192.0.2.1 hi"]);
}

#[test]
fn a_reply_ends_at_its_last_line() {
    let bytes = b"250-a\r\n250 b\r\n250 next\r\n";
    let mut reader = ReplyReader::default();
    let (taken, reply) = reader.read(&bytes[..3]).unwrap();
    assert_eq!(
        (taken, reply),
        (0, None),
        "nothing taken from a partial line"
    );
    let (taken, reply) = reader.read(bytes).unwrap();
    assert_eq!(taken, 14, "the next reply is left for expect_quiet");
    assert_eq!(reply.unwrap().lines, ["a", "b"]);
}

#[tokio::test]
async fn a_2xx_to_data_is_a_protocol_error_not_a_delivery() {
    for base in [Script::default(), Script::lockstep()] {
        let (r, usable, seen) = deliver_to(Script {
            data: send(b"250 2.0.0 Ok\r\n"),
            ..base
        })
        .await;
        assert_eq!(code_of(violation_of(&r)), Some((Stage::Data, 250)), "{r:?}");
        assert!(!usable, "the connection is dropped");
        assert_eq!(seen.lock().unwrap().dots, 0, "no data was sent");
    }
}

#[tokio::test]
async fn a_refusal_of_data_is_the_recipients_result() {
    for (reply, want) in [
        (&b"451 4.3.0 try later\r\n"[..], "Deferred"),
        (b"554 5.5.1 no valid recipients\r\n", "Failed"),
    ] {
        let (r, usable, _) = deliver_to(Script {
            data: send(reply),
            ..Script::default()
        })
        .await;
        let tx = r.expect("a refusal is a result");
        let got = match &tx.results[..] {
            [(0, RcptResult::Deferred(_))] => "Deferred",
            [(0, RcptResult::Failed(_))] => "Failed",
            other => panic!("{other:?}"),
        };
        assert_eq!(got, want);
        assert!(usable, "RSET was answered: the connection is kept");
    }
}

#[tokio::test]
async fn only_a_2xx_to_the_final_dot_delivers() {
    let (r, usable, seen) = deliver_to(Script::default()).await;
    assert_delivered(&r.unwrap());
    assert!(usable);
    assert_eq!(seen.lock().unwrap().dots, 1);
    // a 3xx to the dot: the server is out of step, and may have committed
    let (r, _, _) = deliver_to(Script {
        dot: send(b"354 more?\r\n"),
        ..Script::default()
    })
    .await;
    assert_eq!(
        code_of(violation_after_the_dot(&r)),
        Some((Stage::FinalDot, 354)),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_line_after_the_greeting_is_a_protocol_error() {
    /// The session with a server that greets with `greeting`, which must fail.
    async fn refused(greeting: &[u8]) -> (ClientError, Arc<Mutex<Seen>>) {
        let (addr, seen) = scripted(Script {
            greeting: send(greeting),
            ..Script::default()
        })
        .await;
        (connect(&addr).await.err().expect("refused"), seen)
    }
    let (err, seen) = refused(b"220 p.test ESMTP\r\n250 2.0.0 extra\r\n").await;
    assert!(
        matches!(&err, ClientError::Violation { stage: Stage::Ehlo, violation: Violation::Unsolicited(line) } if line == "250 2.0.0 extra"),
        "{err}"
    );
    assert!(
        seen.lock().unwrap().commands.is_empty(),
        "EHLO was not sent"
    );

    // a line with another code inside the greeting
    let (err, _) = refused(b"220-p.test ESMTP\r\n250 2.0.0 extra\r\n").await;
    assert!(
        matches!(
            err,
            ClientError::Violation {
                stage: Stage::Greeting,
                violation: Violation::MixedCodes {
                    first: 220,
                    then: 250
                }
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn two_replies_to_one_command_are_a_protocol_error() {
    // in lockstep: the second reply to MAIL is waiting when RCPT would be sent
    let (r, usable, seen) = deliver_to(Script {
        mail: send(b"250 2.1.0 Ok\r\n250 2.1.0 Ok\r\n"),
        ..Script::lockstep()
    })
    .await;
    assert!(
        matches!(
            violation_of(&r),
            Some((Stage::Rcpt, Violation::Unsolicited(_)))
        ),
        "{r:?}"
    );
    assert!(!usable);
    assert_eq!(seen.lock().unwrap().commands.len(), 2, "EHLO and MAIL only");

    // pipelined: the second reply to RCPT is taken for DATA's, and DATA is owed a 354
    let (r, _, seen) = deliver_to(Script {
        rcpt: send(b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"),
        ..Script::default()
    })
    .await;
    assert_eq!(code_of(violation_of(&r)), Some((Stage::Data, 250)), "{r:?}");
    assert_eq!(seen.lock().unwrap().dots, 0);

    // a second reply to DATA would be read as the dot's
    let (r, _, seen) = deliver_to(Script {
        data: send(b"354 go\r\n250 2.0.0 Ok\r\n"),
        ..Script::default()
    })
    .await;
    assert!(
        matches!(
            violation_of(&r),
            Some((Stage::DataBlock, Violation::Unsolicited(_)))
        ),
        "{r:?}"
    );
    assert_eq!(
        seen.lock().unwrap().dots,
        0,
        "no data after an out-of-step 354"
    );

    // two replies to the dot: neither can be trusted, and the server may have committed
    let (r, usable, _) = deliver_to(Script {
        dot: send(b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"),
        ..Script::default()
    })
    .await;
    assert!(
        matches!(
            violation_after_the_dot(&r),
            Some((Stage::FinalDot, Violation::Unsolicited(_)))
        ),
        "{r:?}"
    );
    assert!(!usable);
}

#[tokio::test]
async fn a_421_after_the_reply_to_the_dot_only_ends_the_session() {
    let (r, usable, _) = deliver_to(Script {
        dot: send(b"250 2.0.0 Ok\r\n421 4.3.2 shutting down\r\n"),
        ..Script::default()
    })
    .await;
    assert_delivered(&r.expect("the 250 stands"));
    assert!(!usable, "the server is closing");
}

#[tokio::test]
async fn acceptances_after_a_refused_pipelined_mail_are_a_protocol_error() {
    // the RCPT and DATA were answered as if MAIL had been taken: a 354 here would make the
    // server read what follows as message data
    let (r, usable, _) = deliver_to(Script {
        mail: send(b"550 5.1.0 sender refused\r\n"),
        ..Script::default()
    })
    .await;
    assert_eq!(code_of(violation_of(&r)), Some((Stage::Rcpt, 250)), "{r:?}");
    assert!(!usable);
    // refused properly: the sender's refusal is every recipient's result
    let (r, usable, _) = deliver_to(Script {
        mail: send(b"550 5.1.0 sender refused\r\n"),
        rcpt: send(b"503 5.5.1 need MAIL\r\n"),
        data: send(b"503 5.5.1 need RCPT\r\n"),
        ..Script::default()
    })
    .await;
    assert!(matches!(
        &r.unwrap().results[..],
        [(0, RcptResult::Failed(_))]
    ));
    assert!(usable);
}

/// Reads at most one byte per call: every reply arrives split across reads.
struct OneByteReads<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for OneByteReads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut one = [0u8; 1];
        let mut b = ReadBuf::new(&mut one);
        match Pin::new(&mut self.0).poll_read(cx, &mut b) {
            Poll::Ready(Ok(())) => {
                buf.put_slice(b.filled());
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OneByteReads<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn replies_split_across_reads_parse() {
    let trickle = |b: &[u8]| Answer::Trickle(b.to_vec());
    let script = Script {
        greeting: trickle(b"220-p.test\r\n220 ESMTP\r\n"),
        ehlo: trickle(b"250-p.test\r\n250-PIPELINING\r\n250-DSN\r\n250 SIZE 1000000\r\n"),
        mail: trickle(b"250 2.1.0 Ok\r\n"),
        rcpt: trickle(b"250 2.1.5 Ok\r\n"),
        data: trickle(b"354 go ahead\r\n"),
        dot: trickle(b"250 2.0.0 Ok: queued\r\n"),
        ..Script::default()
    };
    let (addr, seen) = scripted(script).await;
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let mut c = SmtpClient::start(
        Box::new(OneByteReads(tcp)),
        "mx2.test",
        Timeouts::uniform(Duration::from_secs(10)),
    )
    .await
    .expect("the session opens");
    assert_eq!(c.greeting.lines, ["p.test", "ESMTP"]);
    assert!(c.caps.pipelining && c.caps.dsn);
    assert_eq!(c.caps.size, Some(1_000_000));
    for _ in 0..2 {
        assert_delivered(&send_one(&mut c).await.unwrap());
    }
    assert!(c.usable());
    assert_eq!(seen.lock().unwrap().dots, 2);
}

#[tokio::test]
async fn an_oversized_reply_is_a_protocol_error() {
    // many lines
    let mut long = Vec::new();
    while long.len() <= MAX_REPLY {
        long.extend_from_slice(
            b"250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n",
        );
    }
    long.extend_from_slice(b"250 Ok\r\n");
    let (r, usable, _) = deliver_to(Script {
        mail: Answer::Send(long),
        ..Script::default()
    })
    .await;
    assert!(
        matches!(violation_of(&r), Some((Stage::Mail, Violation::TooLong))),
        "{r:?}"
    );
    assert!(!usable);
    // one line that never ends
    let (r, _, _) = deliver_to(Script {
        rcpt: Answer::Stall(vec![b'2'; MAX_REPLY + 10]),
        ..Script::default()
    })
    .await;
    assert!(
        matches!(violation_of(&r), Some((Stage::Rcpt, Violation::TooLong))),
        "{r:?}"
    );
}

#[tokio::test]
async fn garbage_is_a_protocol_error() {
    let (r, usable, seen) = deliver_to(Script {
        rcpt: send(b"hello there\r\n"),
        ..Script::default()
    })
    .await;
    assert!(
        matches!(violation_of(&r), Some((Stage::Rcpt, Violation::Malformed(line))) if line == "hello there"),
        "{r:?}"
    );
    assert!(!usable);
    assert_eq!(seen.lock().unwrap().dots, 0);
    // a reply to the dot that is not one: unknown whether the server committed
    let (r, _, _) = deliver_to(Script {
        dot: send(b"\x00\x01garbage\r\n"),
        ..Script::default()
    })
    .await;
    assert!(
        matches!(
            violation_after_the_dot(&r),
            Some((Stage::FinalDot, Violation::Malformed(_)))
        ),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_connection_closed_after_the_dot_is_an_unknown_outcome() {
    let (r, usable, seen) = deliver_to(Script {
        dot: Answer::Close,
        ..Script::default()
    })
    .await;
    match r {
        Err(ClientError::UnknownOutcome(e)) => {
            assert!(matches!(*e, ClientError::Closed(Stage::FinalDot)), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!usable);
    assert_eq!(seen.lock().unwrap().dots, 1);
}

#[tokio::test]
async fn a_reused_connection_the_server_closed_is_stale() {
    let (addr, seen) = scripted(Script {
        dot: Answer::Last(b"250 2.0.0 Ok\r\n".to_vec()),
        ..Script::default()
    })
    .await;
    let mut c = connect(&addr).await.unwrap();
    let tx = send_one(&mut c)
        .await
        .expect("a hang-up after the reply does not undo it");
    assert_delivered(&tx);
    // the next message: the hang-up is seen before its dot, so a new connection may retry
    let err = send_one(&mut c).await.expect_err("the connection is gone");
    assert!(err.is_stale_connection(), "{err}");
    assert!(!err.is_unknown_outcome());
    assert_eq!(seen.lock().unwrap().dots, 1);
}

/// A session over an in-memory stream to `script`, under the replay time-outs (commands
/// 60 s, final dot 10 min). For tests under a paused clock: waits cost no real time.
async fn paused_session(script: Script) -> Result<(SmtpClient, Arc<Mutex<Seen>>), ClientError> {
    let (client, server) = tokio::io::duplex(1024);
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(serve(server, script, seen.clone()));
    let timeouts = Timeouts::rfc5321(Duration::from_secs(60), Duration::from_secs(600));
    let c = SmtpClient::start(Box::new(client), "mx2.test", timeouts).await?;
    Ok((c, seen))
}

fn timed_out(e: &ClientError) -> Option<(Stage, Duration)> {
    match e {
        ClientError::Timeout { stage, after } => Some((*stage, *after)),
        ClientError::UnknownOutcome(inner) => timed_out(inner),
        _ => None,
    }
}

const MIN: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn each_wait_lasts_as_long_as_rfc_5321_says() {
    let late = |after: Duration, b: &[u8]| Answer::Late(after, b.to_vec());
    // just within every limit: the message is delivered
    let d = Script::lockstep();
    let (mut c, _) = paused_session(Script {
        greeting: late(5 * MIN - Duration::from_secs(1), b"220 p.test\r\n"),
        mail: late(5 * MIN - Duration::from_secs(1), b"250 Ok\r\n"),
        rcpt: late(5 * MIN - Duration::from_secs(1), b"250 Ok\r\n"),
        data: late(2 * MIN - Duration::from_secs(1), b"354 go\r\n"),
        dot: late(10 * MIN - Duration::from_secs(1), b"250 Ok: queued\r\n"),
        ..d.clone()
    })
    .await
    .expect("a slow greeting is waited for");
    assert_delivered(&send_one(&mut c).await.expect("slow replies are waited for"));

    // silent at each step: each times out after its own limit
    let silent = |s: &dyn Fn(&mut Script)| {
        let mut script = d.clone();
        s(&mut script);
        script
    };
    let err = paused_session(silent(&|s| s.greeting = Answer::Silence))
        .await
        .err()
        .unwrap();
    assert_eq!(timed_out(&err), Some((Stage::Greeting, 5 * MIN)), "{err}");
    let err = paused_session(silent(&|s| s.ehlo = Answer::Silence))
        .await
        .err()
        .unwrap();
    assert_eq!(timed_out(&err), Some((Stage::Ehlo, MIN)), "{err}");
    for (script, want) in [
        (
            silent(&|s| s.mail = Answer::Silence),
            (Stage::Mail, 5 * MIN),
        ),
        (
            silent(&|s| s.rcpt = Answer::Silence),
            (Stage::Rcpt, 5 * MIN),
        ),
        (
            silent(&|s| s.data = Answer::Silence),
            (Stage::Data, 2 * MIN),
        ),
        // the server takes no data: the first block that does not fit waits 3 minutes
        (
            silent(&|s| s.data = Answer::Stall(b"354 go\r\n".to_vec())),
            (Stage::DataBlock, 3 * MIN),
        ),
        (
            silent(&|s| s.dot = Answer::Silence),
            (Stage::FinalDot, 10 * MIN),
        ),
    ] {
        let (mut c, _) = paused_session(script).await.unwrap();
        let body = vec![b'x'; 200_000];
        let err = c
            .send(&envelope(), &RCPT, &body, &AtOnce)
            .await
            .err()
            .unwrap();
        assert_eq!(timed_out(&err), Some(want), "{err}");
        assert_eq!(
            err.is_unknown_outcome(),
            want.0 == Stage::FinalDot,
            "only a wait after the dot leaves the outcome unknown: {err}"
        );
        assert!(!c.usable());
    }
}
