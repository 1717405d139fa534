//! Replay is throttled: with `rate_per_second = R` the primary sees R messages per second.
//! The rate is computed from the arrival times at the primary, not asserted on wall-clock time.

use std::time::Duration;

use backupmx_tests::{MxPod, MxPodConfig, Sink, message, send, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rate_follows_rate_per_second() {
    let sink = Sink::start(&[], 0, true).await;
    let pod = MxPod::start(MxPodConfig::new(&sink.addr())).await;
    let n = 41;
    for i in 0..n {
        let r = send(
            pod.smtp,
            "sender@sender.test",
            &["user@example.test"],
            &message("rate", i, 300),
        )
        .await
        .unwrap();
        assert!(r.ok(), "{r:?}");
    }
    let rate = 20.0;
    pod.set_replay(4, rate as u32).await;
    wait_for(
        "all messages at the primary",
        Duration::from_secs(30),
        || async { sink.dumped().len() >= n },
    )
    .await;
    let times: Vec<_> = sink.dumped().into_iter().map(|(t, _)| t).collect();
    let span = times[n - 1].duration_since(times[0]).unwrap().as_secs_f64();
    let measured = (n - 1) as f64 / span;
    println!("replay rate: configured {rate}/s, measured {measured:.2}/s over {span:.2}s");
    assert!(
        (measured - rate).abs() <= rate * 0.10,
        "measured {measured:.2}/s, configured {rate}/s"
    );
}
