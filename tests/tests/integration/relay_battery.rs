//! The relay rule against a real mx-pod serving `example.test` and the IDN `bücher.test`:
//! address tricks that could make the backup (or the primary behind it) forward mail elsewhere
//! are all refused at RCPT, while the configured domains are accepted in every legitimate
//! spelling. Prints the table of (address, reply).

use backupmx_tests::{
    MxPod, MxPodConfig,
    realparts::{Smtp, rejected},
};

/// How a RCPT must be answered.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// `250 2.1.5`.
    Accept,
    /// `550 5.7.1` (the relay rule).
    Relay,
    /// `501` (the address does not parse).
    Syntax,
    /// Either of the refusals (syntactically valid but exotic forms, which a parser may refuse
    /// before the relay rule sees them).
    Refused,
}

impl Want {
    fn matches(self, reply: &str) -> bool {
        match self {
            Want::Accept => reply.starts_with("250 2.1.5"),
            Want::Relay => reply.starts_with("550 5.7.1"),
            Want::Syntax => reply.starts_with("501 "),
            Want::Refused => Want::Relay.matches(reply) || Want::Syntax.matches(reply),
        }
    }
}

/// (what follows `RCPT TO:`, expected answer, what the trick is)
const CASES: &[(&str, Want, &str)] = &[
    ("<user@example.test>", Want::Accept, "plain"),
    ("<User@EXAMPLE.TEST>", Want::Accept, "case"),
    ("<user@bücher.test>", Want::Accept, "IDN, UTF-8 (SMTPUTF8)"),
    ("<user@xn--bcher-kva.test>", Want::Accept, "IDN, A-label"),
    (
        "<user@XN--BCHER-KVA.TEST>",
        Want::Accept,
        "IDN, A-label upper case",
    ),
    ("<user@other.test>", Want::Relay, "foreign domain"),
    (
        "<user@OTHER.TEST>",
        Want::Relay,
        "foreign domain, upper case",
    ),
    ("<user%other.test@example.test>", Want::Relay, "%-hack"),
    (
        "<user%other.test%example.test@example.test>",
        Want::Relay,
        "double %-hack",
    ),
    ("<other.test!user@example.test>", Want::Relay, "bang path"),
    (
        "<a.test!b.test!user@example.test>",
        Want::Relay,
        "double bang path",
    ),
    (
        "<@a.test,@b.test:user@example.test>",
        Want::Relay,
        "source route",
    ),
    (
        "<@other.test:user@example.test>",
        Want::Relay,
        "one-hop source route",
    ),
    (
        "<@example.test:user@other.test>",
        Want::Relay,
        "source route via us",
    ),
    (
        "<\"user@other.test\"@example.test>",
        Want::Relay,
        "quoted local part with @",
    ),
    (
        "<\"user%other.test\"@example.test>",
        Want::Relay,
        "quoted local part with %",
    ),
    (
        "<\"user\\@other.test\"@example.test>",
        Want::Relay,
        "quoted, backslash-escaped @",
    ),
    (
        "<user\\@other.test@example.test>",
        Want::Syntax,
        "backslash-escaped @",
    ),
    ("<user@[127.0.0.1]>", Want::Refused, "IPv4 literal"),
    ("<user@[IPv6:::1]>", Want::Refused, "IPv6 literal"),
    ("<user@[192.0.2.1]>", Want::Refused, "foreign IP literal"),
    ("<user@example.test.>", Want::Relay, "trailing dot"),
    ("<user@bücher.test.>", Want::Relay, "IDN with trailing dot"),
    (
        "<user@exаmple.test>",
        Want::Relay,
        "Cyrillic 'а' look-alike",
    ),
    (
        "<user@xn--exmple-4nf.test>",
        Want::Relay,
        "look-alike as A-label",
    ),
    (
        "<user@mx2.example.test>",
        Want::Relay,
        "the backup's own hostname",
    ),
    ("<user@sub.example.test>", Want::Relay, "subdomain"),
    (
        "<user@example.test.evil.com>",
        Want::Relay,
        "our name as a prefix",
    ),
    (
        "<user@evilexample.test>",
        Want::Relay,
        "our name as a suffix",
    ),
    (
        "<user@EXAMPLE.TEST.EVIL.COM>",
        Want::Relay,
        "prefix, upper case",
    ),
    ("<user@localhost>", Want::Relay, "localhost"),
    ("<@example.test>", Want::Syntax, "empty local part"),
    (
        "<\"\"@example.test>",
        Want::Refused,
        "empty quoted local part",
    ),
    ("<user@@example.test>", Want::Syntax, "double @"),
    (
        "<user@other.test@example.test>",
        Want::Syntax,
        "two @, ours last",
    ),
    (
        "<user@example.test@other.test>",
        Want::Syntax,
        "two @, ours first",
    ),
    ("<.user@example.test>", Want::Syntax, "leading dot"),
    ("<user@example..test>", Want::Syntax, "empty label"),
    (
        "<user@.example.test>",
        Want::Syntax,
        "leading dot in domain",
    ),
    (
        "<user@example.test%other.test>",
        Want::Relay,
        "% in the domain",
    ),
    ("<user@ex ample.test>", Want::Syntax, "space in the domain"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_tricks_are_refused_at_rcpt() {
    let mut cfg = MxPodConfig::new("127.0.0.1:9");
    cfg.domains
        .push(("bücher.test".into(), "127.0.0.1:9".into()));
    cfg.smtp_extra.push_str("max_errors = 1000\n");
    let pod = MxPod::start(cfg).await;

    // each address in its own session
    let mut table = Vec::new();
    for (arg, want, what) in CASES {
        let mut c = Smtp::connect(pod.smtp).await;
        c.expect("EHLO client.test", "250").await;
        c.expect("MAIL FROM:<s@sender.test> SMTPUTF8", "250").await;
        let reply = c.cmd(&format!("RCPT TO:{arg}")).await;
        c.expect("RSET", "250").await;
        c.quit().await;
        table.push((*arg, *want, *what, reply));
    }
    println!("{:<50} {:<8} {:<32} reply", "RCPT TO:", "want", "trick");
    for (arg, want, what, reply) in &table {
        println!("{arg:<50} {:<8} {what:<32} {reply}", format!("{want:?}"));
    }
    let wrong: Vec<String> = table
        .iter()
        .filter(|(_, want, _, reply)| !want.matches(reply))
        .map(|(arg, want, what, reply)| format!("{arg} ({what}): want {want:?}, got {reply}"))
        .collect();
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    let refused = table.iter().filter(|t| t.1 != Want::Accept).count();
    assert!(refused >= 25, "{refused} tricks");
    assert_eq!(pod.queued().await, 0, "RCPT checks only: nothing queued");

    // all of them in one transaction: only the accepted recipients end up in the envelope
    let mut c = Smtp::connect(pod.smtp).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<s@sender.test> SMTPUTF8", "250").await;
    for (arg, want, _, _) in &table {
        let r = c.cmd(&format!("RCPT TO:{arg}")).await;
        assert!(want.matches(&r), "{arg}: {r}");
    }
    let r = c
        .data(b"Subject: relay battery\r\nMessage-ID: <battery@test>\r\n\r\nhi\r\n")
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    c.quit().await;
    let id = r.rsplit(' ').next().unwrap();
    let (code, env) = pod.get(&format!("/v1/queue/messages/{id}")).await;
    assert_eq!(code, 200, "{env}");
    let mut rcpts: Vec<String> = env["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .map(|r| r["address"].as_str().expect("address").to_owned())
        .collect();
    rcpts.sort();
    let mut want: Vec<String> = table
        .iter()
        .filter(|t| t.1 == Want::Accept)
        .map(|t| t.0.trim_matches(['<', '>']).to_owned())
        .collect();
    want.sort();
    assert_eq!(rcpts, want, "envelope: {env}");
    assert_eq!(pod.queued().await, 1);
    assert!(rejected(&pod, "relay").await >= 25);
}

/// Spellings of `example.test` that UTS #46 *maps* to it (fullwidth letters, the ideographic
/// full stop) are not the configured domain: IDNA2008 disallows them in a protocol element, and
/// the primary does not know them.
///
/// Regression guard: accepting them (an earlier `Config::domain` applied the UTS #46 mapping)
/// meant replay handed the primary an address it refuses (`554 5.7.1 ... Relay access denied`
/// from Postfix), and mx-pod then bounced to the unverified sender: backscatter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uts46_mapped_look_alikes_are_refused() {
    let pod = MxPod::start(MxPodConfig::new("127.0.0.1:9")).await;
    let mut c = Smtp::connect(pod.smtp).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<s@sender.test> SMTPUTF8", "250").await;
    for addr in [
        "user@\u{ff45}\u{ff58}\u{ff41}\u{ff4d}\u{ff50}\u{ff4c}\u{ff45}.test", // fullwidth
        "user@example\u{3002}test", // ideographic full stop
        "user@EXAMPLE\u{ff0e}TEST", // fullwidth full stop
    ] {
        let r = c.cmd(&format!("RCPT TO:<{addr}>")).await;
        assert!(r.starts_with("550 5.7.1"), "{addr}: {r}");
    }
    c.quit().await;
}
