//! `kill -9` during load, over and over: every message that got `250` is delivered; none is
//! lost. Duplicates (a delivery whose state update died with the process) are counted and
//! reported, not failed.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use backupmx_tests::{MxPod, MxPodConfig, Primary, message, require, send, seq_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kill9_under_load_loses_no_acknowledged_message() {
    require("smtp-source");
    let primary = Primary::start();
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.workers = 2; // replay runs during the kills too
    let mut pod = MxPod::start(cfg).await;
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let next = Arc::new(Mutex::new(0usize));
    let kills = 20;
    for round in 0..kills {
        if round > 0 {
            pod.restart().await;
        }
        // background load from smtp-source (bounded; it dies with the server, that is fine)
        let mut source = std::process::Command::new("smtp-source")
            .args([
                "-s",
                "4",
                "-m",
                "400",
                "-l",
                "2048",
                "-f",
                "load@sender.test",
                "-t",
                "user@example.test",
                &pod.smtp.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // tracked senders: record exactly which messages got 250
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (acked, next, stop, addr) = (acked.clone(), next.clone(), stop.clone(), pod.smtp);
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let seq = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n
                    };
                    match send(
                        addr,
                        "sender@sender.test",
                        &["user@example.test"],
                        &message("crash", seq, 1500),
                    )
                    .await
                    {
                        Ok(r) if r.ok() => {
                            acked.lock().unwrap().insert(seq);
                        }
                        Ok(_) | Err(_) => break, // refused or cut off: not acknowledged
                    }
                }
            }));
        }
        // let the load run for a varying moment (this is the fault's timing, not a synchronization)
        tokio::time::sleep(Duration::from_millis(150 + (round as u64 * 37) % 300)).await;
        pod.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let _ = source.kill();
        let _ = source.wait();
    }
    pod.restart().await;
    pod.wait_empty(Duration::from_secs(120)).await;

    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "too little load to mean anything: {} acknowledged",
        acked.len()
    );
    let mut missing = acked.clone();
    let start = std::time::Instant::now();
    let mut counts: HashMap<usize, usize> = HashMap::new();
    while !missing.is_empty() && start.elapsed() < Duration::from_secs(60) {
        counts.clear();
        for m in primary.delivered() {
            if let Some(s) = seq_of(&m) {
                *counts.entry(s).or_default() += 1;
            }
        }
        missing.retain(|s| !counts.contains_key(s));
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let duplicates: usize = counts.values().map(|c| c.saturating_sub(1)).sum();
    println!(
        "kill -9 x{kills}: {} acknowledged, {} lost, {} duplicates, {} delivered incl. unacknowledged",
        acked.len(),
        missing.len(),
        duplicates,
        counts.len()
    );
    assert!(
        missing.is_empty(),
        "lost {} acknowledged messages: {:?}",
        missing.len(),
        missing
    );
}
