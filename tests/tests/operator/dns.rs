//! DNS publication through a real PowerDNS: the operator adds the backup's MX beside the
//! primary's, its host's address from the LoadBalancer's ingress, ownership TXT records;
//! verifies them at the authoritative server; repairs drift; refuses unsafe priorities and
//! records it does not own (until adopted); and removes exactly its own records on deletion.
//!
//! The API is reached over HTTPS, as in production: a TLS front (a test CA's certificate) before
//! PowerDNS's plain-HTTP API, that CA in the BackupMx's `spec.caBundle`; a certificate from a CA
//! the BackupMx does not trust is `ProviderTlsFailed`.

use std::time::Duration;

use backupmx_tests::{
    kube::{Cluster, Operator, ca_bundle_secret, cluster, condition, eventually},
    realparts::PowerDns,
};
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use testkit::{TestCa, TlsFront};

/// The Secret of `spec.caBundle` in these tests.
const CA_SECRET: &str = "dns-ca";

fn credentials(cluster: &Cluster, ns: &str, pdns: &PowerDns) {
    cluster.apply(Some(ns), &pdns.credentials_secret());
}

/// `pdns`'s API behind TLS with a certificate from a new test CA, and that CA in the Secret
/// [`CA_SECRET`] of `ns`.
async fn api_over_tls(cluster: &Cluster, ns: &str, pdns: &PowerDns) -> TlsFront {
    let ca = TestCa::new("PowerDNS API test CA");
    let front = pdns
        .api_behind_tls(&ca.issue(&["127.0.0.1", "localhost"]))
        .await;
    cluster.apply(Some(ns), &ca_bundle_secret(CA_SECRET, &ca.pem()));
    front
}

/// The operator watching `ns` only, re-checking DNS records every 2 s.
fn dns_operator(cluster: &Cluster, ns: &str, identity: &str) -> Operator {
    let args = [
        "--namespace",
        ns,
        "--leader-elect=false",
        "--dns-resync",
        "2s",
    ];
    Operator::start(cluster, identity, &args)
}

/// A BackupMx publishing in example.test through the API at `api` (https), trusting the CA in
/// [`CA_SECRET`].
fn backupmx(name: &str, pdns: &PowerDns, api: &TlsFront, mx: Value, dns_extra: Value) -> Value {
    let mut dns = pdns.backupmx_dns_via("example.test", &api.url());
    dns.as_object_mut()
        .unwrap()
        .extend(dns_extra.as_object().unwrap().clone());
    json!({"apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx", "metadata": {"name": name},
        "spec": {"domains": ["example.test"], "primary": {"host": "127.0.0.1", "port": 9},
                 "storage": {"size": "1Gi"}, "mx": mx, "deletionPolicy": "Orphan", "dns": dns,
                 "caBundle": {"secretName": CA_SECRET}}})
}

async fn dns_ready(cluster: &Cluster, ns: &str, name: &str, reason: &str) -> Value {
    eventually(
        &format!("DNSReady reason {reason}"),
        Duration::from_secs(60),
        || async {
            let b = cluster.get(ns, &format!("bmx/{name}"))?;
            (condition(&b, "DNSReady")?.1 == reason).then_some(b)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_published_verified_repaired_and_removed() {
    let cluster = cluster();
    let ns = cluster.namespace("dns").await;
    let pdns = PowerDns::with_example_test().await;
    let api = api_over_tls(cluster, &ns, &pdns).await;
    credentials(cluster, &ns, &pdns);
    let _op = dns_operator(cluster, &ns, "op-dns");
    cluster.apply(
        Some(&ns),
        &backupmx(
            "example",
            &pdns,
            &api,
            json!({"hostname": "mx2.example.test", "priority": 20, "ttl": 300}),
            json!({}),
        ),
    );
    // no cloud load balancer yet: nothing is published
    let b = dns_ready(cluster, &ns, "example", "WaitingForAddress").await;
    assert_eq!(condition(&b, "DNSReady").unwrap().0, "False");
    assert_eq!(pdns.dig("example.test", "MX"), "10 mail.example.test.");

    // the "cloud controller" gives the LoadBalancer Service its address
    let client = cluster.client().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    eventually("the SMTP Service", Duration::from_secs(30), || async {
        svcs.get_opt("example-smtp").await.ok()?
    })
    .await;
    svcs.patch_status(
        "example-smtp",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.5"}]}}})),
    )
    .await
    .unwrap();
    let b = dns_ready(cluster, &ns, "example", "Published").await;
    assert_eq!(condition(&b, "DNSReady").unwrap().0, "True");
    assert_eq!(b["status"]["dns"]["verified"], true);
    let records: Vec<String> =
        serde_json::from_value(b["status"]["dns"]["records"].clone()).unwrap();
    assert!(
        records.contains(&"example.test MX 20 mx2.example.test".to_string()),
        "{records:?}"
    );
    assert!(
        records.contains(&"mx2.example.test A 198.51.100.5".to_string()),
        "{records:?}"
    );
    let mx = pdns.dig("example.test", "MX");
    assert!(
        mx.contains("10 mail.example.test.") && mx.contains("20 mx2.example.test."),
        "{mx}"
    );
    assert_eq!(pdns.dig("mx2.example.test", "A"), "198.51.100.5");
    let claim = pdns.dig("_backupmx.example.test", "TXT");
    assert!(claim.contains(&format!("owner={ns}/example")), "{claim}");

    // drift: someone puts the MX RRset back to the primary alone; the operator repairs it
    pdns.primary_mx_only().await;
    eventually(
        "the backup MX put back",
        Duration::from_secs(60),
        || async {
            pdns.dig("example.test", "MX")
                .contains("20 mx2.example.test.")
                .then_some(())
        },
    )
    .await;
    let events = cluster.events(&ns);
    assert!(events.contains("DriftRepaired"), "{events}");

    // an unsafe priority is refused and nothing changes
    cluster.patch(&ns, "bmx/example", &json!({"spec":{"mx":{"priority":5}}}));
    let b = dns_ready(cluster, &ns, "example", "PriorityNotHigherThanPrimary").await;
    assert!(
        condition(&b, "DNSReady").unwrap().2.contains("lowest, 10"),
        "{b}"
    );
    assert!(
        pdns.dig("example.test", "MX")
            .contains("20 mx2.example.test.")
    );
    // a safe change replaces only our own MX
    cluster.patch(&ns, "bmx/example", &json!({"spec":{"mx":{"priority":30}}}));
    dns_ready(cluster, &ns, "example", "Published").await;
    let mx = pdns.dig("example.test", "MX");
    assert!(
        mx.contains("30 mx2.example.test.") && !mx.contains("20 mx2") && mx.contains("10 mail"),
        "{mx}"
    );

    // deletion removes exactly our records (through the same HTTPS API and CA bundle)
    cluster.kubectl_ok(&["-n", &ns, "delete", "bmx/example", "--wait=false"]);
    eventually(
        "the BackupMx to be deleted",
        Duration::from_secs(60),
        || async { cluster.get(&ns, "bmx/example").is_none().then_some(()) },
    )
    .await;
    pdns.assert_only_primary_records();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_made_by_hand_conflict_until_adopted_and_another_owner_is_refused() {
    let cluster = cluster();
    let ns = cluster.namespace("dnsadopt").await;
    let pdns = PowerDns::with_example_test().await;
    let api = api_over_tls(cluster, &ns, &pdns).await;
    // a backup MX someone published by hand before the operator
    pdns.set_records(
        "example.test",
        "example.test",
        "MX",
        300,
        &["10 mail.example.test.", "20 mx2.example.test."],
    )
    .await;
    pdns.set_records(
        "example.test",
        "mx2.example.test",
        "A",
        300,
        &["198.51.100.5"],
    )
    .await;
    let _op = dns_operator(cluster, &ns, "op-dnsadopt");
    let mx = json!({"hostname": "mx2.example.test", "priority": 20, "addresses": ["198.51.100.5"]});
    cluster.apply(
        Some(&ns),
        &backupmx("first", &pdns, &api, mx.clone(), json!({})),
    );
    // provider errors are conditions with a precise reason, retried
    let b = dns_ready(cluster, &ns, "first", "CredentialsMissing").await;
    assert!(
        condition(&b, "DNSReady")
            .unwrap()
            .2
            .contains("dns-credentials"),
        "{b}"
    );
    cluster.apply(
        Some(&ns),
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dns-credentials"},
               "stringData": {"apiKey": "wrong-key"}}),
    );
    let b = dns_ready(cluster, &ns, "first", "ProviderAuthFailed").await;
    assert!(condition(&b, "DNSReady").unwrap().2.contains("401"), "{b}");
    credentials(cluster, &ns, &pdns);
    let b = dns_ready(cluster, &ns, "first", "Conflict").await;
    assert!(
        condition(&b, "DNSReady")
            .unwrap()
            .2
            .contains("spec.dns.adopt"),
        "{b}"
    );
    assert_eq!(
        pdns.dig("_backupmx.example.test", "TXT"),
        "",
        "nothing written while in conflict"
    );

    cluster.apply(
        Some(&ns),
        &backupmx("first", &pdns, &api, mx.clone(), json!({"adopt": true})),
    );
    dns_ready(cluster, &ns, "first", "Published").await;
    assert!(
        pdns.dig("_backupmx.example.test", "TXT")
            .contains(&format!("owner={ns}/first"))
    );

    // a second BackupMx naming the same host never takes the first one's records
    cluster.apply(
        Some(&ns),
        &backupmx("second", &pdns, &api, mx, json!({"adopt": true})),
    );
    let b = dns_ready(cluster, &ns, "second", "Conflict").await;
    assert!(
        condition(&b, "DNSReady")
            .unwrap()
            .2
            .contains(&format!("{ns}/first")),
        "{b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_certificate_from_a_ca_not_in_the_bundle_is_provider_tls_failed() {
    let cluster = cluster();
    let ns = cluster.namespace("dnstls").await;
    let pdns = PowerDns::with_example_test().await;
    // the API's certificate comes from a CA the BackupMx is not told about
    let issuer = TestCa::new("the API's real CA");
    let api = pdns
        .api_behind_tls(&issuer.issue(&["127.0.0.1", "localhost"]))
        .await;
    let other = TestCa::new("a CA that did not issue the API's certificate");
    cluster.apply(Some(&ns), &ca_bundle_secret(CA_SECRET, &other.pem()));
    credentials(cluster, &ns, &pdns);
    let _op = dns_operator(cluster, &ns, "op-dnstls");
    let mx = json!({"hostname": "mx2.example.test", "priority": 20, "addresses": ["198.51.100.5"]});
    cluster.apply(Some(&ns), &backupmx("example", &pdns, &api, mx, json!({})));
    let b = dns_ready(cluster, &ns, "example", "ProviderTlsFailed").await;
    let (status, _, message) = condition(&b, "DNSReady").unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains("invalid peer certificate: UnknownIssuer"),
        "the certificate problem is named: {message}"
    );
    assert!(message.contains(&api.url()), "the API is named: {message}");
    let events = cluster.events(&ns);
    assert!(events.contains("ProviderTlsFailed"), "{events}");
    assert_eq!(
        pdns.dig("_backupmx.example.test", "TXT"),
        "",
        "nothing written without a verified certificate"
    );

    // the right CA in the bundle's Secret: the next pass publishes
    cluster.apply(Some(&ns), &ca_bundle_secret(CA_SECRET, &issuer.pem()));
    dns_ready(cluster, &ns, "example", "Published").await;
    assert!(
        pdns.dig("example.test", "MX")
            .contains("20 mx2.example.test.")
    );
}
