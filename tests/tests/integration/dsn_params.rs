//! DSN parameters from a sending MTA (RFC 3461 `NOTIFY`, `ORCPT`, `ENVID`, `RET`) pass through
//! the backup to a real Postfix primary and are accepted there: a malformed `ORCPT` on replay
//! made the primary answer `501 5.5.4` and every such message was bounced.

use std::time::Duration;

use backupmx_tests::{MxPod, MxPodConfig, Primary, message, send_with_params, seq_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_pass_through_to_a_real_postfix_primary() {
    let mut primary = Primary::start();
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.workers = 1;
    let pod = MxPod::start(cfg).await;
    pod.set_replay(0, 0).await; // hold while we queue
    primary.down();
    let params = [
        // what Postfix sends for each recipient
        "NOTIFY=FAILURE,DELAY ORCPT=rfc822;user@example.test",
        // xtext in the original recipient (`+` and `=` are escaped)
        "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;first+2Blast+3Dx@example.test",
        "NOTIFY=NEVER",
    ];
    for (i, p) in params.iter().enumerate() {
        let sent = send_with_params(
            pod.smtp,
            "sender@sender.test",
            &[("user@example.test", p)],
            &message("dsn", i, 300),
        )
        .await
        .unwrap();
        assert!(sent.ok(), "{p}: {sent:?}");
    }
    assert_eq!(pod.queued().await, 3);

    primary.up();
    pod.set_replay(1, 0).await;
    pod.wait_empty(Duration::from_secs(60)).await;
    let mut got: Vec<usize> = primary
        .delivered()
        .iter()
        .filter_map(|m| seq_of(m))
        .collect();
    got.sort();
    assert_eq!(got, vec![0, 1, 2], "every message accepted by the primary");
    // A refusal on replay is logged as "bounced", "deferred" or "delivery failed". Match those
    // words, not bare digits such as `501`, which also occur in ports and queue ids.
    let log = pod.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["bounced", "deferred", "delivery failed"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    assert!(refusals.is_empty(), "no refusal on replay:\n{log}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("delivered") && l.contains("250 2.0.0"))
            .count(),
        3,
        "three deliveries logged:\n{log}"
    );
}
