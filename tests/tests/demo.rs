//! `make demo` end to end: `demo/cluster.sh` (the README's main command) builds the mx-pod
//! image, starts a real control plane and node, runs the operator's outage drill with PowerDNS,
//! a Postfix primary, a sending Postfix and smtp-source load, and restores the host. The test
//! checks its exit status, its summary table and that the host is clean afterwards, so the
//! main command cannot rot unnoticed.
//!
//! A separate test binary: cargo runs test binaries one after another, and only one real node
//! can run on a machine (the `node` binary's node is stopped before this one starts).

use std::{path::Path, process::Command};

use backupmx_tests::{clean_cargo_env, kube::operator_bin, repo, require_root};

/// The summary row `name` of the demo's output: (value, expected, result).
fn row<'a>(out: &'a str, name: &str) -> (&'a str, &'a str, &'a str) {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(name))
        .unwrap_or_else(|| panic!("no summary row {name:?} in:\n{out}"));
    let cols: Vec<&str> = line[line.find(name).unwrap() + name.len()..]
        .split_whitespace()
        .collect();
    (cols[0], cols[1], cols.get(2).copied().unwrap_or(""))
}

#[test]
fn make_demo_runs_the_outage_drill_and_restores_the_host() {
    require_root();
    let out = clean_cargo_env(&mut Command::new("bash"))
        .arg(repo().join("demo/cluster.sh"))
        .current_dir(repo())
        // the operator the other tiers built (debug) instead of a release build; replay at
        // 10 messages/s per pod so the drill's drain is short
        .env("OPERATOR_BIN", operator_bin())
        .env("DEMO_RATE", "10")
        .env_remove("KUBECONFIG")
        .output()
        .expect("run demo/cluster.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the demo failed:\n{text}");
    assert!(text.contains("demo OK"), "{text}");
    for (name, want) in [
        ("sent (numbered messages)", "20"),
        ("sender's Postfix tried the primary first", "20"),
        ("then relayed them to the backup (fallback)", "20"),
        ("smtp-source load through the load balancer", "60"),
        ("queued (kubectl get bmx: status.queue)", "80"),
        ("delivered to the primary's maildir", "20"),
        ("and the smtp-source load", "60"),
        ("lost", "0"),
        ("duplicates", "0"),
        ("out of order (per pod)", "0"),
    ] {
        assert_eq!(row(&text, name), (want, want, "ok"), "row {name:?}");
    }
    let steps = row(&text, "replay steps seen").2;
    assert!(!steps.is_empty(), "replay steps in the summary");
    assert!(
        !Path::new("/sys/class/net/knode0").exists(),
        "the node's bridge is gone after the demo"
    );
    assert!(
        text.contains("host restored: no bridge knode0, no kubelet"),
        "{text}"
    );
}
