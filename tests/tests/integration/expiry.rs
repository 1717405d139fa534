//! Mail that cannot be delivered within `retention` is bounced with an RFC 3464 DSN, after
//! exactly one delay warning at `delay_warning`.

use std::time::Duration;

use backupmx_tests::{MxPod, MxPodConfig, Sink, free_port, message, send, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_warning_once_then_expiry_bounce() {
    let dsn_relay = Sink::start(&[], 0, true).await;
    let dead_primary = format!("127.0.0.1:{}", free_port()); // nothing listens there
    let mut cfg = MxPodConfig::new(&dead_primary);
    cfg.workers = 1;
    cfg.retention = "4s".into();
    cfg.delay_warning = "1s".into();
    cfg.dsn_relay = Some(dsn_relay.addr());
    let pod = MxPod::start(cfg).await;
    let r = send(
        pod.smtp,
        "alice@sender.test",
        &["user@example.test"],
        &message("expire", 1, 300),
    )
    .await
    .unwrap();
    assert!(r.ok(), "{r:?}");
    wait_for(
        "the delay warning and the bounce",
        Duration::from_secs(30),
        || async { dsn_relay.dumped().len() >= 2 },
    )
    .await;
    pod.wait_empty(Duration::from_secs(10)).await;
    let dumps: Vec<String> = dsn_relay
        .dumped()
        .iter()
        .map(|(_, m)| String::from_utf8_lossy(m).into_owned())
        .collect();
    let actions: Vec<&str> = dumps
        .iter()
        .flat_map(|d| {
            d.lines().filter(|l| {
                l.starts_with("Action:")
                    || l.starts_with("Subject:")
                    || l.starts_with("Final-Recipient:")
            })
        })
        .collect();
    assert_eq!(
        dumps.len(),
        2,
        "one warning, one bounce: {actions:?}\n{}",
        pod.log_text()
    );
    assert!(
        dumps[0].contains("Action: delayed") && dumps[0].contains("Will-Retry-Until:"),
        "{}",
        dumps[0]
    );
    assert!(
        dumps[1].contains("Action: failed") && dumps[1].contains("Status: 5.4.7"),
        "{}",
        dumps[1]
    );
    assert!(dumps.iter().all(|d| d.contains("To: <alice@sender.test>")));
}
