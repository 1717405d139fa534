//! `backupmx-operator check-mx` against zones served by a real PowerDNS, with a real Postfix as
//! the primary and a real mx-pod as the backup answering SMTP.

use backupmx_tests::{
    MxPod, MxPodConfig, Primary, free_port, kube::operator_bin, realparts::PowerDns,
};
use serde_json::Value;

fn check_mx(pdns: &PowerDns, domain: &str, port: u16) -> (bool, Value, String) {
    let run = |output: &str| {
        std::process::Command::new(operator_bin())
            .args(["check-mx", domain, "--resolver", &pdns.dns_addr()])
            .args([
                "--smtp-port",
                &port.to_string(),
                "--timeout",
                "3s",
                "--output",
                output,
            ])
            .output()
            .expect("run backupmx-operator check-mx")
    };
    let json = run("json");
    let table = run("table");
    assert_eq!(json.status.success(), table.status.success());
    let report: Value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&json.stdout)));
    (
        json.status.success(),
        report,
        String::from_utf8_lossy(&table.stdout).into_owned(),
    )
}

fn has(list: &Value, needle: &str) -> bool {
    list.as_array()
        .unwrap()
        .iter()
        .any(|w| w.as_str().unwrap().contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_setup_passes_and_bad_ones_are_explained() {
    let port = free_port();
    let primary = Primary::start_on(port);
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.ip = [127, 0, 0, 3].into();
    cfg.smtp_port = Some(port);
    let _backup = MxPod::start(cfg).await;

    let pdns = PowerDns::start();
    pdns.create_zone("good.test").await;
    pdns.set_records(
        "good.test",
        "good.test",
        "MX",
        300,
        &["10 mail.good.test.", "20 mx2.good.test."],
    )
    .await;
    pdns.set_records("good.test", "mail.good.test", "A", 300, &["127.0.0.1"])
        .await;
    pdns.set_records("good.test", "mx2.good.test", "A", 300, &["127.0.0.3"])
        .await;
    let (ok, report, table) = check_mx(&pdns, "good.test", port);
    println!("{table}");
    assert!(ok, "{report}");
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(
        (targets[0]["priority"].as_u64(), targets[0]["host"].as_str()),
        (Some(10), Some("mail.good.test"))
    );
    assert_eq!(targets[1]["smtp"][0]["ok"], true);
    assert!(
        targets[1]["smtp"][0]["answer"]
            .as_str()
            .unwrap()
            .contains("mx-pod"),
        "{report}"
    );
    assert_eq!(report["ttl"], 300);
    // both on 127.0.0.0/24: the separation warning
    assert!(has(&report["warnings"], "same /24"), "{report}");
    assert!(
        table.contains("mx2.good.test") && table.contains("result: ok"),
        "{table}"
    );

    // single MX, long TTL, a target without an address, and an alias as target
    pdns.create_zone("bad.test").await;
    pdns.set_records(
        "bad.test",
        "bad.test",
        "MX",
        86400,
        &[
            "10 mail.bad.test.",
            "10 alias.bad.test.",
            "20 ghost.bad.test.",
        ],
    )
    .await;
    pdns.set_records("bad.test", "mail.bad.test", "A", 300, &["127.0.0.1"])
        .await;
    pdns.set_records(
        "bad.test",
        "alias.bad.test",
        "CNAME",
        300,
        &["mail.bad.test."],
    )
    .await;
    let (ok, report, table) = check_mx(&pdns, "bad.test", port);
    println!("{table}");
    assert!(!ok, "errors make it fail: {report}");
    assert!(
        has(&report["errors"], "ghost.bad.test does not resolve"),
        "{report}"
    );
    assert!(
        has(&report["errors"], "alias.bad.test is an alias"),
        "{report}"
    );
    assert!(has(&report["warnings"], "over an hour"), "{report}");

    pdns.create_zone("single.test").await;
    pdns.set_records(
        "single.test",
        "single.test",
        "MX",
        300,
        &["10 mail.single.test."],
    )
    .await;
    pdns.set_records("single.test", "mail.single.test", "A", 300, &["127.0.0.1"])
        .await;
    let (ok, report, _) = check_mx(&pdns, "single.test", port);
    assert!(ok, "a single MX is a warning, not an error: {report}");
    assert!(has(&report["warnings"], "single MX"), "{report}");

    let (ok, report, _) = check_mx(&pdns, "nomx.good.test", port);
    assert!(!ok);
    assert!(has(&report["errors"], "no MX"), "{report}");
}
