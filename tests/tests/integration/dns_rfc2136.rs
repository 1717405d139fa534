//! The RFC 2136 provider against a real BIND 9 (`tests/infra/bind.sh`: primary for
//! `example.test`, updates allowed with one hmac-sha256 TSIG key): the backup's MX, its A record
//! and the ownership TXT go in with one signed UPDATE beside the primary's MX, are read back
//! through the provider and with `dig`, and are removed again without touching the primary's
//! MX. Then every way the server says no, and the kind each one maps to.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Instant,
};

use backupmx_operator::dns::{
    Changes, DnsError, DnsErrorKind, DnsProvider, RData, Record, rfc2136::Rfc2136,
};
use backupmx_tests::{realparts::infra, repo, require, require_root, run, state_dir};

/// A real BIND in its own directory; stopped (`bind.sh stop DIR`) on drop, also on panic.
struct Bind {
    dir: tempfile::TempDir,
    dns: SocketAddr,
    zone: String,
    key_name: String,
    algorithm: String,
    secret: String,
}

impl Bind {
    fn start() -> Bind {
        require_root();
        let script = repo().join("tests/infra/bind.sh");
        assert!(
            script.exists(),
            "{} is missing: restore it from git; and run `make deps` (as root) for bind9",
            script.display()
        );
        for cmd in ["named", "tsig-keygen", "dig"] {
            require(cmd); // fails with "run `make deps`"
        }
        let dir = state_dir("bind");
        let env = infra("bind.sh", "start", dir.path(), &[]);
        let get = |k: &str| {
            env.get(k)
                .unwrap_or_else(|| panic!("bind.sh start did not print {k}: {env:?}"))
                .clone()
        };
        Bind {
            dns: get("BIND_DNS").parse().expect("BIND_DNS is ip:port"),
            zone: get("DDNS_ZONE"),
            key_name: get("TSIG_KEY_NAME"),
            algorithm: get("TSIG_ALGORITHM"),
            secret: get("TSIG_SECRET"),
            dir,
        }
    }

    /// The provider with the zone's key.
    fn provider(&self) -> Rfc2136 {
        Rfc2136::new(self.dns, &self.key_name, &self.algorithm, &self.secret)
            .expect("the key bind.sh made is usable")
    }

    /// `dig @THIS +tcp +norec OPTIONS NAME TYPE`: whether it succeeded, and its output.
    fn dig_with(&self, options: &[&str], name: &str, rtype: &str) -> (bool, String) {
        let port = self.dns.port().to_string();
        let mut args = vec!["@127.0.0.1", "-p", &port, "+tcp", "+norec"];
        args.extend_from_slice(options);
        args.extend([name, rtype]);
        run("dig", &args)
    }

    /// The lines of a successful `dig` with `options`, each through `line`, sorted.
    fn dig_lines(
        &self,
        options: &[&str],
        name: &str,
        rtype: &str,
        line: impl Fn(&str) -> Option<String>,
    ) -> Vec<String> {
        let (ok, out) = self.dig_with(options, name, rtype);
        assert!(ok, "dig {name} {rtype} failed: {out}");
        let mut lines: Vec<String> = out.lines().filter_map(line).collect();
        lines.sort();
        lines
    }

    /// `dig +short NAME TYPE` at this server: the answer lines, sorted.
    fn dig(&self, name: &str, rtype: &str) -> Vec<String> {
        let short = ["+time=2", "+tries=1", "+short"];
        self.dig_lines(&short, name, rtype, |l| {
            let l = l.trim();
            (!l.is_empty()).then(|| l.to_string())
        })
    }

    /// `dig +noall +answer NAME TYPE` at this server: the answer records (`NAME TTL CLASS TYPE
    /// DATA`, single spaces), sorted.
    fn dig_answer(&self, name: &str, rtype: &str) -> Vec<String> {
        self.dig_lines(&["+noall", "+answer"], name, rtype, |l| {
            (!l.trim().is_empty() && !l.starts_with(';'))
                .then(|| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
    }

    /// `dig NAME TYPE` at this server: the status in the header (`NOERROR`, `REFUSED`, ...).
    fn dig_status(&self, name: &str, rtype: &str) -> String {
        let (_, out) = self.dig_with(&[], name, rtype);
        out.split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or_else(|| panic!("no status in dig's output: {out}"))
            .to_string()
    }

    /// named's log (for failure messages).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let out = Command::new("bash")
            .arg(repo().join("tests/infra/bind.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "bind.sh stop {} failed: {}",
                self.dir.path().display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("bind.sh stop: {e}"),
        }
    }
}

fn mx(name: &str, ttl: u32, pref: u16, host: &str) -> Record {
    Record::new(name, ttl, RData::Mx(pref, host.into()))
}

fn a(name: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::new(name, ttl, RData::A(Ipv4Addr::from(ip)))
}

fn txt(name: &str, ttl: u32, text: &str) -> Record {
    Record::new(name, ttl, RData::Txt(text.into()))
}

fn add(records: &[Record]) -> Changes {
    Changes {
        add: records.to_vec(),
        remove: vec![],
    }
}

fn remove(records: &[Record]) -> Changes {
    Changes {
        add: vec![],
        remove: records.to_vec(),
    }
}

/// None of the records of the test's change set is in the zone (dig says so).
fn nothing_written(bind: &Bind, why: &str) {
    let owner = format!("_backupmx.{}", bind.zone);
    assert!(bind.dig(&bind.zone, "MX").is_empty(), "{why}: an MX got in");
    assert!(
        bind.dig("mx2.example.test", "A").is_empty(),
        "{why}: an A got in"
    );
    assert!(bind.dig(&owner, "TXT").is_empty(), "{why}: a TXT got in");
}

/// `result` failed with `kind`, its message naming every one of `words`; prints the message.
fn expect_err(what: &str, result: Result<(), DnsError>, kind: DnsErrorKind, words: &[&str]) {
    let e = result.expect_err(what);
    eprintln!("{what}: {:?}: {e}", e.kind);
    assert_eq!(e.kind, kind, "{what}: {e}");
    for w in words {
        assert!(e.message.contains(w), "{what}: no {w:?} in: {e}");
    }
}

const OWNER_TXT: &str = "heritage=backupmx,v=1,owner=mail/backup";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc2136_adds_and_removes_the_backup_mx_beside_the_primary() {
    let t0 = Instant::now();
    let bind = Bind::start();
    let p = bind.provider();
    let zone = bind.zone.as_str();
    assert_eq!(zone, "example.test");
    let owner = format!("_backupmx.{zone}");

    // the primary's MX and its address (what the domain had before the operator came)
    let primary = [
        mx(zone, 3600, 10, "mail.example.test"),
        a("mail.example.test", 3600, [192, 0, 2, 10]),
    ];
    p.apply(zone, &add(&primary))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", bind.log()));

    // the backup: MX, the A it points to and the ownership TXT, one UPDATE
    let backup_mx = mx(zone, 300, 20, "mx2.example.test");
    let backup_a = a("mx2.example.test", 300, [192, 0, 2, 20]);
    let backup_txt = txt(&owner, 300, OWNER_TXT);
    p.apply(
        zone,
        &add(&[backup_mx.clone(), backup_a.clone(), backup_txt.clone()]),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bind.log()));

    // read back through the provider ... (the backup's MX joined the primary's RRset and took
    // its TTL: BIND would otherwise have lowered the primary's MX to 300 s)
    let backup_mx = mx(zone, 3600, 20, "mx2.example.test");
    assert_eq!(
        p.records(zone, zone).await.unwrap(),
        vec![primary[0].clone(), backup_mx.clone()],
        "the apex has both MX (and no other record of our types)"
    );
    assert_eq!(
        p.records(zone, "MX2.Example.Test.").await.unwrap(),
        vec![backup_a.clone()]
    );
    assert_eq!(
        p.records(zone, &owner).await.unwrap(),
        vec![backup_txt.clone()]
    );
    assert_eq!(
        p.records(zone, "nothing-here.example.test").await.unwrap(),
        vec![],
        "NXDOMAIN is no records"
    );
    // ... and with dig
    assert_eq!(
        bind.dig(zone, "MX"),
        ["10 mail.example.test.", "20 mx2.example.test."]
    );
    assert_eq!(
        bind.dig_answer(zone, "MX"),
        [
            "example.test. 3600 IN MX 10 mail.example.test.",
            "example.test. 3600 IN MX 20 mx2.example.test."
        ]
    );
    assert_eq!(bind.dig("mx2.example.test", "A"), ["192.0.2.20"]);
    assert_eq!(bind.dig(&owner, "TXT"), [format!("\"{OWNER_TXT}\"")]);

    // adding what is there changes nothing
    p.apply(zone, &add(&[backup_mx.clone(), backup_txt.clone()]))
        .await
        .unwrap();
    assert_eq!(
        bind.dig(zone, "MX"),
        ["10 mail.example.test.", "20 mx2.example.test."]
    );

    // remove only the backup's MX and TXT: the primary's MX stays
    p.apply(zone, &remove(&[backup_mx.clone(), backup_txt.clone()]))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", bind.log()));
    assert_eq!(
        p.records(zone, zone).await.unwrap(),
        vec![primary[0].clone()]
    );
    assert_eq!(bind.dig(zone, "MX"), ["10 mail.example.test."]);
    assert_eq!(p.records(zone, &owner).await.unwrap(), vec![]);
    assert!(bind.dig(&owner, "TXT").is_empty());
    assert_eq!(
        bind.dig("mx2.example.test", "A"),
        ["192.0.2.20"],
        "the A record was not asked to go"
    );

    // removing what is absent is harmless (RFC 2136 2.5.4: silently ignored)
    p.apply(zone, &remove(&[backup_mx.clone(), backup_txt.clone()]))
        .await
        .unwrap();
    assert_eq!(bind.dig(zone, "MX"), ["10 mail.example.test."]);

    // removal and addition in one message: swap the backup's priority 20 -> 30 atomically
    p.apply(zone, &add(std::slice::from_ref(&backup_mx)))
        .await
        .unwrap();
    let moved = mx(zone, 300, 30, "mx2.example.test");
    p.apply(
        zone,
        &Changes {
            add: vec![moved.clone()],
            remove: vec![backup_mx.clone()],
        },
    )
    .await
    .unwrap();
    assert_eq!(
        bind.dig(zone, "MX"),
        ["10 mail.example.test.", "30 mx2.example.test."]
    );
    assert_eq!(
        p.records(zone, zone).await.unwrap(),
        vec![primary[0].clone(), mx(zone, 3600, 30, "mx2.example.test")],
        "the moved MX took the RRset's TTL too"
    );
    eprintln!("rfc2136 add/remove against BIND: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc2136_server_refusals_map_to_error_kinds() {
    let t0 = Instant::now();
    let bind = Bind::start();
    let zone = &bind.zone.clone();
    let change = add(&[
        mx(zone, 300, 20, "mx2.example.test"),
        a("mx2.example.test", 300, [192, 0, 2, 20]),
        txt(&format!("_backupmx.{zone}"), 300, OWNER_TXT),
    ]);

    // a wrong secret: NOTAUTH with TSIG error BADSIG (an answer without MAC)
    let wrong = Rfc2136::new(
        bind.dns,
        &bind.key_name,
        &bind.algorithm,
        "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ=",
    )
    .unwrap();
    expect_err(
        "wrong secret",
        wrong.apply(zone, &change).await,
        DnsErrorKind::Auth,
        &["NOTAUTH", "BADSIG", "ddns-key"],
    );
    nothing_written(&bind, "wrong secret");

    // a key the server does not know: NOTAUTH, BADKEY
    let foreign = Rfc2136::new(bind.dns, "foreign-key", &bind.algorithm, &bind.secret).unwrap();
    expect_err(
        "foreign key",
        foreign.apply(zone, &change).await,
        DnsErrorKind::Auth,
        &["NOTAUTH", "BADKEY", "foreign-key"],
    );
    // the right name and secret with another algorithm: BIND knows no such key either
    let other_alg = Rfc2136::new(bind.dns, &bind.key_name, "hmac-sha512", &bind.secret).unwrap();
    expect_err(
        "other algorithm",
        other_alg.apply(zone, &change).await,
        DnsErrorKind::Auth,
        &["NOTAUTH", "BADKEY"],
    );

    // unsigned: REFUSED (allow-update names the key)
    expect_err(
        "unsigned",
        Rfc2136::unsigned(bind.dns).apply(zone, &change).await,
        DnsErrorKind::Auth,
        &["REFUSED"],
    );
    nothing_written(&bind, "foreign key, other algorithm, unsigned");

    // a zone the server does not serve: the signature is fine, BIND answers NOTAUTH with no
    // TSIG error ("not authoritative for update zone"), which is ZoneNotFound, not Auth
    let p = bind.provider();
    expect_err(
        "zone not served",
        p.apply(
            "other.test",
            &add(&[a("mx2.other.test", 300, [192, 0, 2, 20])]),
        )
        .await,
        DnsErrorKind::ZoneNotFound,
        &["NOTAUTH", "other.test"],
    );
    // reading it: BIND (recursion no) REFUSEs the query
    assert_eq!(bind.dig_status("other.test", "MX"), "REFUSED");
    expect_err(
        "reading a zone not served",
        p.records("other.test", "other.test").await.map(drop),
        DnsErrorKind::ZoneNotFound,
        &["REFUSED", "other.test"],
    );

    // BIND's check-integrity: an in-zone MX target without an address is REFUSED, and the
    // whole message with it (the TXT beside the MX does not get in: one message, atomic)
    expect_err(
        "MX without its A",
        p.apply(
            zone,
            &add(&[
                mx(zone, 300, 20, "mx2.example.test"),
                txt(&format!("_backupmx.{zone}"), 300, OWNER_TXT),
            ]),
        )
        .await,
        DnsErrorKind::Auth,
        &["REFUSED"],
    );
    nothing_written(&bind, "MX without its A");

    // the same with the A in the message goes through
    p.apply(zone, &change)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", bind.log()));
    assert_eq!(bind.dig(zone, "MX"), ["20 mx2.example.test."]);

    // a stopped server: Unreachable
    let dns = bind.dns;
    drop(bind);
    expect_err(
        "server stopped",
        p.apply(zone, &change).await,
        DnsErrorKind::Unreachable,
        &[&dns.to_string()],
    );
    eprintln!("rfc2136 refusals against BIND: {:?}", t0.elapsed());
}
