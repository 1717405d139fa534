//! Recipient validation at RCPT: `verify` asks the real Postfix primary (a callout) and keeps
//! its answers, in memory and on disk, through a primary outage and an mx-pod restart; `list`
//! accepts exact addresses and `*@domain` wildcards.

use std::time::Duration;

use backupmx_tests::{
    MxPod, MxPodConfig, Primary,
    realparts::{Smtp, rejected},
};

/// `RCPT TO:<rcpt>` in a fresh session: the reply.
async fn rcpt(pod: &MxPod, rcpt: &str) -> String {
    let mut c = Smtp::connect(pod.smtp).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<someone@sender.test>", "250").await;
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    c.quit().await;
    r
}

fn verify(fail_mode: &str) -> String {
    format!(
        "recipients = {{ mode = \"verify\", cache_ttl = \"1d\", negative_ttl = \"1h\", fail_mode = \"{fail_mode}\" }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_asks_the_primary_and_remembers_through_outage_and_restart() {
    let mut primary = Primary::start();
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.domain_extra = verify("tempfail");
    let mut pod = MxPod::start(cfg.clone()).await;

    // the primary answers
    let r = rcpt(&pod, "user1@example.test").await;
    assert!(
        r.starts_with("250 2.1.5"),
        "existing user: {r}\n{}",
        pod.log_text()
    );
    let r = rcpt(&pod, "unknown@example.test").await;
    assert!(
        r.starts_with("550 5.1.1"),
        "the primary's 550 5.1.1, at RCPT: {r}\n{}",
        pod.log_text()
    );
    assert!(r.contains("unknown user"), "the primary's own text: {r}");

    // the primary goes down: cached answers still decide, an unseen address is tempfailed
    primary.down();
    let r = rcpt(&pod, "user1@example.test").await;
    assert!(r.starts_with("250 2.1.5"), "cached as existing: {r}");
    let r = rcpt(&pod, "USER1@Example.Test").await;
    assert!(r.starts_with("250 2.1.5"), "the cache ignores case: {r}");
    let r = rcpt(&pod, "unknown@example.test").await;
    assert!(r.starts_with("550 5.1.1"), "negative cache: {r}");
    let r = rcpt(&pod, "never-seen@example.test").await;
    assert!(
        r.starts_with("450 4.2.0"),
        "unverifiable, fail_mode tempfail: {r}"
    );
    assert_eq!(rejected(&pod, "unknown_recipient").await, 2);
    assert_eq!(rejected(&pod, "recipient_unverified").await, 1);

    // the same outage with fail_mode accept: the unseen address is taken
    let mut accept_cfg = cfg.clone();
    accept_cfg.domain_extra = verify("accept");
    let accepting = MxPod::start(accept_cfg).await;
    let r = rcpt(&accepting, "never-seen@example.test").await;
    assert!(
        r.starts_with("250 2.1.5"),
        "unverifiable, fail_mode accept: {r}"
    );
    drop(accepting);

    // a restart during the outage: the cache comes back from the queue directory
    pod.sigterm();
    let status = pod.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "clean exit: {status}\n{}", pod.log_text());
    let cache_file = pod.queue_dir.join("recipient-cache.json");
    let cache = std::fs::read_to_string(&cache_file)
        .unwrap_or_else(|e| panic!("{}: {e}", cache_file.display()));
    assert!(
        cache.contains("user1@example.test") && cache.contains("unknown@example.test"),
        "{cache}"
    );
    assert!(
        !cache.contains("never-seen"),
        "an unverified address is not cached: {cache}"
    );
    pod.restart().await;
    let r = rcpt(&pod, "user1@example.test").await;
    assert!(
        r.starts_with("250 2.1.5"),
        "still known after the restart: {r}\n{}",
        pod.log_text()
    );
    let r = rcpt(&pod, "unknown@example.test").await;
    assert!(
        r.starts_with("550 5.1.1"),
        "still unknown after the restart: {r}"
    );
    let r = rcpt(&pod, "never-seen@example.test").await;
    assert!(r.starts_with("450 4.2.0"), "{r}");

    // a whole message to the cached address is queued while the primary is down
    let mut c = Smtp::connect(pod.smtp).await;
    c.expect("EHLO client.test", "250").await;
    let r = c
        .mail(
            "someone@sender.test",
            &["user1@example.test"],
            &backupmx_tests::message("verify", 1, 200),
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    c.quit().await;
    assert_eq!(pod.queued().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_mode_takes_listed_addresses_and_wildcards() {
    let mut cfg = MxPodConfig::new("127.0.0.1:9");
    cfg.domain_extra =
        "recipients = { mode = \"list\", addresses = [\"alice@example.test\", \"Bob@Example.Test\"] }\n"
            .into();
    // a second domain taking every address (its own [[domains]] entry)
    cfg.extra = "[[domains]]\nname = \"wild.test\"\nprimary = \"127.0.0.1:9\"\nrecipients = { mode = \"list\", addresses = [\"*@wild.test\"] }\n".into();
    let pod = MxPod::start(cfg).await;

    for (addr, want) in [
        ("alice@example.test", "250 2.1.5"),
        ("ALICE@EXAMPLE.TEST", "250 2.1.5"),
        ("bob@example.test", "250 2.1.5"),
        ("carol@example.test", "550 5.1.1"),
        ("alice2@example.test", "550 5.1.1"),
        ("anyone@wild.test", "250 2.1.5"),
        ("Someone.Else@WILD.test", "250 2.1.5"),
        ("anyone@sub.wild.test", "550 5.7.1"),
    ] {
        let r = rcpt(&pod, addr).await;
        assert!(r.starts_with(want), "{addr}: expected {want}, got {r}");
    }
    assert_eq!(rejected(&pod, "unknown_recipient").await, 2);
}
