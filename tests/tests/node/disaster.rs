//! Issue 9: the disaster drill on the real node. Each scenario loses no acknowledged message
//! and keeps each pod's arrival order: a pod deleted and then killed (`kill -9` from the host)
//! under load, a rolling update under load, the operator's leader killed during replay, rspamd
//! refusing spam during an outage, a full volume on one pod, a BackupMx deleted (DNS records
//! gone, the volume's mail kept and picked up again), and spec errors in `kubectl describe`.
//!
//! Load comes from [`Load`]: a sender that retries every message until it is acknowledged and
//! follows the pod to its new IP, as a sending MTA behind a Service would.

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use backupmx_tests::{
    kube::{condition, eventually},
    message,
    node::{
        BridgePrimary, Load, LoadReport, NamespaceGuard, POD_TIMEOUT, STORAGE_CLASS, Setup,
        backupmx, node,
    },
    realparts::{PowerDns, Rspamd},
    scenarios::Deployment,
    send, send_n, with_tag,
};
use serde_json::{Value, json};

fn summary(what: &str, r: &LoadReport) {
    println!(
        "[{what}] {} acknowledged, {} attempts refused with 4xx, {} broke off ({} messages uncertain)",
        r.acked.len(),
        r.refused,
        r.broken,
        r.uncertain.len()
    );
}

/// (f) `kubectl delete pod` under load, then `kill -9` of the new pod's process from the host
/// under load: the StatefulSet makes a new pod on the same claim, the kubelet restarts the
/// killed container on the same volume, every acknowledged message is delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_and_killed_under_load_loses_nothing() {
    let node = node();
    let mut primary = BridgePrimary::start(node);
    primary.down();
    let s = Setup::new("podkill", &primary, 1, json!({})).await;
    s.wait_reason("PrimaryDown").await;
    let first = s.pods[0].clone();
    let load = Load::start(
        &s.ns,
        &first.name,
        "podkill",
        60,
        Duration::from_millis(100),
    );

    load.wait_acked(10).await;
    node.kubectl_ok(&["-n", &s.ns, "delete", "pod", &first.name, "--wait=false"]);
    let at_delete = load.acked();
    let second = node
        .ready_pod(&s.ns, &first.name, Some(&first.uid), POD_TIMEOUT)
        .await;
    println!(
        "[podkill] pod deleted after {at_delete} acks; its successor is Ready at {}",
        second.ip
    );
    load.wait_acked(load.acked() + 10).await;
    let at_kill = load.acked();
    node.kill_container(&second);
    let third = node.wait_restarted(&second).await;
    assert!(
        load.acked() < 60,
        "the kill came while the load was still running"
    );
    let report = load.finish().await;
    summary("podkill", &report);
    println!("[podkill] killed after {at_kill} acks");
    assert!(at_delete >= 10 && at_kill > at_delete);

    let admin = third.admin(&s.token);
    eventually("the restarted mx-pod answers", POD_TIMEOUT, || async {
        admin.try_get("/v1/queue").await.map(|_| ())
    })
    .await;
    let queued = admin.queued().await as usize;
    assert!(
        queued >= report.acked.len(),
        "{queued} queued on the volume, {} acknowledged",
        report.acked.len()
    );
    primary.up();
    admin.wait_empty(Duration::from_secs(120)).await;
    report.check_delivered(&primary.received_order());
    s.done("pod deleted and killed under load");
}

/// (g) A configuration change rolls the StatefulSet (pod 1, then pod 0) while both pods take
/// mail: senders retry through the restarts, every acknowledged message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_under_load_loses_nothing() {
    let node = node();
    let mut primary = BridgePrimary::start(node);
    primary.down();
    let s = Setup::new("roll", &primary, 2, json!({})).await;
    s.wait_reason("PrimaryDown").await;
    let loads = [
        Load::start(&s.ns, "example-0", "roll0", 50, Duration::from_millis(150)),
        Load::start(&s.ns, "example-1", "roll1", 50, Duration::from_millis(150)),
    ];
    for l in &loads {
        l.wait_acked(5).await;
    }
    let before = node.get(&s.ns, "statefulset/example").unwrap();
    let old_revision = before["status"]["updateRevision"]
        .as_str()
        .unwrap()
        .to_owned();
    s.patch(json!({"spec": {"retention": "6d"}}));
    // both pods are replaced by ones of the new revision
    let mut replaced = Vec::new();
    for p in &s.pods {
        replaced.push(
            node.ready_pod(&s.ns, &p.name, Some(&p.uid), POD_TIMEOUT)
                .await,
        );
    }
    let sts = eventually("the StatefulSet rolled out", POD_TIMEOUT, || async {
        let sts = node.get(&s.ns, "statefulset/example")?;
        let st = &sts["status"];
        (st["updateRevision"] != old_revision.as_str()
            && st["currentRevision"] == st["updateRevision"]
            && st["updatedReplicas"] == 2)
            .then_some(sts)
    })
    .await;
    println!(
        "[roll] revision {old_revision} -> {}",
        sts["status"]["updateRevision"]
    );
    let mut reports = Vec::new();
    for l in loads {
        let r = l.finish().await;
        summary("roll", &r);
        reports.push(r);
    }
    primary.up();
    for p in &replaced {
        p.admin(&s.token).wait_empty(Duration::from_secs(120)).await;
    }
    let got = primary.received_order();
    for r in &reports {
        r.check_delivered(&got);
    }
    s.done("rolling update under load");
}

/// (h) Two operators elect a leader; the leader is killed (`kill -9`) while the pod replays:
/// the pod keeps delivering with the workers it was given, the standby takes the Lease and
/// carries on; every message arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_during_replay_loses_nothing() {
    let node = node();
    let mut primary = BridgePrimary::start(node);
    primary.down();
    let mut s = Setup::new_with(
        "leader",
        &primary,
        1,
        json!({"replay": {"maxWorkers": 2, "ratePerSecond": 1, "rampUp": "2s"}}),
        true,
        |_, _| {},
    )
    .await;
    let mut standby = node.operator_with(&s.ns, "op-leader-b", &["--lease-namespace", &s.ns]);
    let holder = || {
        node.get(&s.ns, "lease/backupmx-operator")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    };
    let ns = s.ns.clone();
    let pod = s.pods[0].clone();
    let admin = pod.admin(&s.token);
    let sent = send_n(pod.smtp(), "leader", 30).await;
    s.wait_reason("PrimaryDown").await;
    primary.up();
    eventually("replay under way", Duration::from_secs(90), || async {
        (primary.received_order().len() >= 3).then_some(())
    })
    .await;
    let leader = holder().expect("a leader");
    let (dead, survivor) = if leader == s.op.identity {
        (&mut s.op, &mut standby)
    } else {
        (&mut standby, &mut s.op)
    };
    dead.kill9();
    let killed = Instant::now();
    let left = admin.queued().await;
    println!("[leader] {leader} killed with {left} messages still queued");
    let survivor_id = survivor.identity.clone();
    eventually(
        "the standby holds the Lease",
        Duration::from_secs(90),
        || async { (holder().as_deref() == Some(survivor_id.as_str())).then_some(()) },
    )
    .await;
    println!(
        "[leader] {survivor_id} took over after {:.1?}",
        killed.elapsed()
    );
    admin.wait_empty(Duration::from_secs(120)).await;
    assert_eq!(
        primary.received_order(),
        sent,
        "delivered once each, in arrival order"
    );
    // the new leader reconciles and reports the empty queue
    eventually(
        "the new leader's status",
        Duration::from_secs(90),
        || async {
            let st = &node.get(&ns, "bmx/example")?["status"];
            (st["queue"]["messages"] == 0 && st["replay"]["reason"] == "Full").then_some(())
        },
    )
    .await;
    assert!(survivor.reconciles(&s.ns, "example").await > 0);
    s.done("leader killed during replay");
}

/// A GTUBE test message, `Message-ID: <spam.SEQ@test>`.
fn gtube(seq: usize) -> Vec<u8> {
    format!(
        "From: <spammer@sender.test>\r\nTo: <user@example.test>\r\nSubject: spam {seq}\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <spam.{seq}@test>\r\n\r\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"
    )
    .into_bytes()
}

/// (i) During an outage the pod scans every message with a real rspamd (reached on the
/// bridge): spam is refused with `550 5.7.1` at the end of DATA and never queued; when the
/// primary returns only the good mail reaches it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rspamd_refuses_spam_during_the_outage_and_none_reaches_the_primary() {
    let node = node();
    let (_rspamd, url) = Rspamd::start_also_on(node.gateway);
    let mut primary = BridgePrimary::start(node);
    primary.down();
    let s = Setup::new(
        "spam",
        &primary,
        1,
        json!({"filter": {"rspamd": {"url": url, "timeout": "20s"}}}),
    )
    .await;
    s.wait_reason("PrimaryDown").await;
    let pod = s.pods[0].clone();
    let mut hams = Vec::new();
    for i in 0..6 {
        let r = send(
            pod.smtp(),
            "sender@sender.test",
            &["user@example.test"],
            &message("ham", i, 600),
        )
        .await
        .unwrap();
        assert!(r.ok(), "good mail accepted: {r:?}");
        hams.push(format!("ham.{i}@test"));
        let r = send(
            pod.smtp(),
            "spammer@sender.test",
            &["user@example.test"],
            &gtube(i),
        )
        .await
        .unwrap();
        assert_eq!(r.code(), 550, "spam refused: {r:?}");
        assert!(r.reply.contains("5.7.1"), "{r:?}");
    }
    let admin = pod.admin(&s.token);
    assert_eq!(admin.queued().await, 6, "only the good mail is queued");
    primary.up();
    admin.wait_empty(Duration::from_secs(120)).await;
    let got = primary.received_order();
    assert!(
        !got.iter().any(|id| id.starts_with("spam.")),
        "no spam at the primary: {got:?}"
    );
    assert_eq!(got, hams, "the good mail, once each, in order");
    s.done("rspamd during the outage");
}

/// (j) Pod 1's volume fills up (a 12 MiB filesystem under a 64Mi claim): it answers
/// `452 4.3.1` and keeps serving, pod 0 keeps accepting, and when the primary returns every
/// acknowledged message of both is delivered in order and pod 1 accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_on_one_pod_refuses_with_452_and_loses_nothing() {
    let node = node();
    let mut primary = BridgePrimary::start(node);
    primary.down();
    let mut mount = None;
    let s = Setup::new_with(
        "fullvol",
        &primary,
        2,
        json!({"storage": {"size": "64Mi", "storageClassName": STORAGE_CLASS},
               "replay": {"maxWorkers": 3, "ratePerSecond": 50, "rampUp": "2s"}}),
        false,
        |_, dirs| mount = Some(node.mount_small_volume(&dirs[1], "12m")),
    )
    .await;
    s.wait_reason("PrimaryDown").await;
    let full = s.pods[1].clone();
    let mut acked = Vec::new();
    let refusal = loop {
        let i = acked.len();
        assert!(i < 2000, "pod 1's volume never filled");
        let r = send(
            full.smtp(),
            "sender@sender.test",
            &["user@example.test"],
            &message("full", i, 64 * 1024),
        )
        .await
        .unwrap();
        if !r.ok() {
            break r;
        }
        acked.push(format!("full.{i}@test"));
    };
    println!(
        "[fullvol] pod 1 accepted {} messages of 64 KiB, then: {}",
        acked.len(),
        refusal.reply
    );
    assert!(refusal.reply.starts_with("452 4.3.1"), "{refusal:?}");
    assert!(acked.len() >= 20, "{} accepted before full", acked.len());
    // still serving, still refusing politely; the other pod takes the mail
    let again = send(
        full.smtp(),
        "sender@sender.test",
        &["user@example.test"],
        &message("refused", 0, 64 * 1024),
    )
    .await
    .unwrap();
    assert_eq!(again.code(), 452, "{again:?}");
    let on_0 = send_n(s.pods[0].smtp(), "other", 5).await;

    primary.up();
    s.pods[0]
        .admin(&s.token)
        .wait_empty(Duration::from_secs(120))
        .await;
    full.admin(&s.token)
        .wait_empty(Duration::from_secs(180))
        .await;
    let got = primary.received_order();
    let of = |tag: &str| with_tag(&got, tag);
    assert_eq!(of("full"), acked, "pod 1's mail once each, in order");
    assert_eq!(of("other"), on_0, "pod 0's mail once each, in order");
    assert!(of("refused").is_empty(), "the refused message was not kept");
    let after = send(
        full.smtp(),
        "sender@sender.test",
        &["user@example.test"],
        &message("after", 0, 64 * 1024),
    )
    .await
    .unwrap();
    assert!(after.ok(), "space freed, pod 1 accepts again: {after:?}");
    s.done("a full volume");
    drop(s);
    drop(mount);
}

/// (k) The operator publishes the backup MX and its address (from the LoadBalancer ingress the
/// harness writes, as a cloud controller would) in a real PowerDNS, and mail sent to that
/// address on port 25 reaches the pod through kube-proxy; deleting the BackupMx
/// removes exactly those records, and its claim and the mail on it stay: a BackupMx applied
/// again picks the mail up and delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_backupmx_removes_its_dns_records_and_keeps_the_mail() {
    let node = node();
    let pdns = PowerDns::with_example_test().await;
    let mut primary = BridgePrimary::start(node);
    primary.down();
    let dns = pdns.backupmx_dns("example.test");
    let extra = json!({"dns": dns, "mx": {"hostname": "mx2.example.test", "priority": 20}});
    let mut volume = PathBuf::new();
    let s = Setup::new_with("dnsdel", &primary, 1, extra.clone(), false, |ns, dirs| {
        node.apply(Some(ns), &pdns.credentials_secret());
        volume = dirs[0].clone();
    })
    .await;
    let lb = IpAddr::V4(node.lb_ip);
    node.set_load_balancer(&s.ns, "example-smtp", lb).await;
    let published = |reason: &'static str| {
        let s = &s;
        async move {
            eventually(
                &format!("DNSReady {reason}"),
                Duration::from_secs(90),
                || async {
                    let b = s.bmx()?;
                    (condition(&b, "DNSReady")?.1 == reason).then_some(b)
                },
            )
            .await
        }
    };
    let b = published("Published").await;
    assert_eq!(b["status"]["dns"]["verified"], true);
    let mx = pdns.dig("example.test", "MX");
    assert!(
        mx.contains("10 mail.example.test.") && mx.contains("20 mx2.example.test."),
        "{mx}"
    );
    assert_eq!(pdns.dig("mx2.example.test", "A"), lb.to_string());
    // a sending MTA reaches the backup where the MX points: the load balancer's address,
    // port 25 (kube-proxy forwards it to the pod's 2525)
    // (kube-proxy programs the address a moment after the Service's status changed)
    let lb_smtp = std::net::SocketAddr::new(lb, 25);
    eventually(
        "kube-proxy routes the load balancer's address",
        Duration::from_secs(60),
        || async {
            tokio::net::TcpStream::connect(lb_smtp)
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let sent = send_n(lb_smtp, "kept", 5).await;
    assert_eq!(s.pods[0].admin(&s.token).queued().await, 5);

    node.kubectl_ok(&["-n", &s.ns, "delete", "bmx/example", "--wait=false"]);
    eventually("the BackupMx deleted", Duration::from_secs(90), || async {
        s.bmx().is_none().then_some(())
    })
    .await;
    pdns.assert_only_primary_records();
    // the garbage collector removes the StatefulSet, its pod and the admin Secret; the claim
    // and the queue on the volume stay
    node.pod_gone(&s.ns, &s.pods[0].name, &s.pods[0].uid, POD_TIMEOUT)
        .await;
    eventually(
        "the owned objects collected",
        Duration::from_secs(90),
        || async {
            (node.get(&s.ns, "statefulset/example").is_none()
                && node.get(&s.ns, "secret/example-admin-token").is_none())
            .then_some(())
        },
    )
    .await;
    let pvc = node
        .get(&s.ns, "persistentvolumeclaim/queue-example-0")
        .expect("the claim is kept");
    assert_eq!(pvc["status"]["phase"], "Bound");
    let on_disk = std::fs::read_dir(&volume).unwrap().count();
    assert!(on_disk > 0, "the queue's files are on the volume");

    // applied again: the new pod mounts the same claim and finds the 5 messages
    node.apply(Some(&s.ns), &backupmx(&primary, 1, extra));
    let token = node.admin_token(&s.ns, "example").await;
    let pod = node
        .ready_pod(&s.ns, "example-0", Some(&s.pods[0].uid), POD_TIMEOUT)
        .await;
    let admin = pod.admin(&token);
    eventually("the queue found again", Duration::from_secs(60), || async {
        (admin.try_get("/v1/queue").await?.1["messages"] == 5).then_some(())
    })
    .await;
    primary.up();
    admin.wait_empty(Duration::from_secs(120)).await;
    assert_eq!(
        primary.received_order(),
        sent,
        "the kept mail, once each, in order"
    );
    s.done("delete keeps the mail, removes the records");
}

/// (l) Spec errors: what the API server's schema refuses, `kubectl apply` names; what only the
/// operator can judge, `kubectl describe` shows as `Ready=False InvalidSpec` with every problem
/// and a Warning event; nothing is deployed until it is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_errors_show_in_kubectl_describe() {
    let node = node();
    let ns = node.namespace("badspec").await;
    let _guard = NamespaceGuard { ns: ns.clone() };
    let _op = node.operator(&ns, "op-badspec");
    let bad = |spec: Value| {
        json!({"apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx",
               "metadata": {"name": "bad"}, "spec": spec})
    };
    // the schema: a duration that is not one
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(
        &file,
        bad(
            json!({"domains": ["example.test"], "primary": {"host": "mail.example.test"},
                   "storage": {"size": "1Gi"}, "mx": {"hostname": "mx2.example.test"},
                   "replay": {"rampUp": "soon"}}),
        )
        .to_string(),
    )
    .unwrap();
    let out = node
        .cluster
        .kubectl(&["-n", &ns, "apply", "-f", &file.to_string_lossy()]);
    let err = backupmx_tests::kube::text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("spec.replay.rampUp"), "{err}");

    // the operator: a backup MX named like the primary, a volume below the minimum
    node.apply(
        Some(&ns),
        &bad(
            json!({"domains": ["example.test"], "primary": {"host": "mail.example.test"},
                    "storage": {"size": "16Mi"}, "mx": {"hostname": "mail.example.test"}}),
        ),
    );
    let described = eventually(
        "InvalidSpec in kubectl describe",
        Duration::from_secs(60),
        || async {
            let d = node.kubectl_ok(&["-n", &ns, "describe", "bmx/bad"]);
            (d.contains("InvalidSpec") && d.contains("Warning")).then_some(d)
        },
    )
    .await;
    println!("{described}");
    for needle in [
        "spec.mx.hostname: \"mail.example.test\" is the primary's own name",
        "spec.storage.size: 16Mi is smaller than the minimum 64Mi",
    ] {
        assert!(
            described.contains(needle),
            "{needle:?} not in:\n{described}"
        );
    }
    assert!(
        node.get(&ns, "statefulset/bad").is_none(),
        "nothing deployed"
    );

    // fixed: the condition clears and the StatefulSet is made
    node.cluster.patch(
        &ns,
        "bmx/bad",
        &json!({"spec":{"storage":{"size":"1Gi"},"mx":{"hostname":"mx2.example.test"}}}),
    );
    eventually("the StatefulSet", Duration::from_secs(60), || async {
        node.get(&ns, "statefulset/bad").map(|_| ())
    })
    .await;
    let b = node.get(&ns, "bmx/bad").unwrap();
    assert_ne!(
        condition(&b, "Ready").map(|c| c.1),
        Some("InvalidSpec".to_string()),
        "{b}"
    );
}
