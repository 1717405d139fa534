//! IPv6: mx-pod takes mail from an IPv6 client (on `::1`) and replays it; `[::]` and
//! `0.0.0.0` on one port bind side by side and each family reaches the server (the standalone
//! default and the pods' rendered config list both).

use std::{net::SocketAddr, time::Duration};

use backupmx_tests::{MxPod, MxPodConfig, Primary, free_port_on, message, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_an_ipv6_client_is_accepted_and_replayed() {
    let primary = Primary::start();
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.ip = "::1".parse().unwrap(); // SMTP and the admin API on [::1]
    let pod = MxPod::start(cfg).await;
    assert!(pod.smtp.is_ipv6(), "{}", pod.smtp);
    let r = send(
        pod.smtp,
        "alice@sender.test",
        &["user@example.test"],
        &message("v6", 0, 500),
    )
    .await
    .unwrap();
    assert!(r.ok(), "{r:?}");
    pod.set_replay(1, 0).await;
    pod.wait_empty(Duration::from_secs(30)).await;
    let delivered = primary.delivered();
    assert_eq!(delivered.len(), 1);
    let text = String::from_utf8_lossy(&delivered[0]);
    assert!(
        text.contains("Received: from client.test ([IPv6:::1])"),
        "the Received: header names the IPv6 client as an RFC 5321 address literal:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_wildcards_on_one_port_take_ipv4_and_ipv6_clients() {
    let primary = Primary::start();
    let port = free_port_on("::".parse().unwrap());
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.smtp_port = Some(port);
    cfg.smtp_listen = vec![
        format!("[::]:{port}").parse().unwrap(),
        format!("0.0.0.0:{port}").parse().unwrap(),
    ];
    let pod = MxPod::start(cfg).await;
    let clients: [SocketAddr; 2] = [
        format!("[::1]:{port}").parse().unwrap(),
        format!("127.0.0.1:{port}").parse().unwrap(),
    ];
    for (i, to) in clients.iter().enumerate() {
        let r = send(
            *to,
            "alice@sender.test",
            &["user@example.test"],
            &message("both", i, 300),
        )
        .await
        .unwrap();
        assert!(r.ok(), "{to}: {r:?}");
    }
    assert_eq!(pod.queued().await, 2);
    let log = pod.log_text();
    assert!(
        !log.contains("no IPv6 here"),
        "IPv6 is present here:\n{log}"
    );
}

#[test]
fn the_default_configuration_listens_on_both_families() {
    let dir = backupmx_tests::state_dir("defaults");
    let path = dir.path().join("mx-pod.toml");
    std::fs::write(
        &path,
        "hostname = \"mx2.example.test\"\n[queue]\ndir = \"/var/lib/mx-pod/queue\"\n[[domains]]\nname = \"example.test\"\nprimary = \"mail.example.test:25\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(backupmx_tests::mxpod_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("listen = [\"[::]:25\", \"0.0.0.0:25\"]"),
        "defaults: {text}"
    );
}
