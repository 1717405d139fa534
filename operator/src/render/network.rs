//! The pods' network: a headless Service that gives the StatefulSet's pods stable names and
//! exposes their admin port inside the cluster, the LoadBalancer that receives mail on port 25,
//! and the NetworkPolicy that fences the admin port.
//!
//! The LoadBalancer uses `externalTrafficPolicy: Local` so the pods see the senders' real IP
//! addresses, which filtering (DNSBL, rate limits, SPF) needs. Every port names its `protocol`
//! explicitly: server-side apply on Kubernetes 1.20 refuses Service ports without it.
//!
//! The admin port (queue API, replay control, `/metrics`) listens on every address of the pod,
//! so the NetworkPolicy admits it only from the operator's namespace (or
//! `spec.networkPolicy.adminFromNamespaces`); SMTP stays open to everyone, as a backup MX must.

use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1::Service, networking::v1::NetworkPolicy};
use serde_json::json;

use super::{ADMIN_PORT, Names, SMTP_PORT, child_meta, selector_labels};
use crate::crd::BackupMx;

/// Label the API server puts on every namespace (its name) from Kubernetes 1.21 on.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The headless Service of the StatefulSet.
pub fn headless_service(bmx: &BackupMx) -> Service {
    let names = Names::of(bmx);
    Service {
        metadata: child_meta(bmx, &names.headless_service),
        spec: Some(
            serde_json::from_value(json!({
                "clusterIP": "None",
                "publishNotReadyAddresses": true,
                "selector": selector_labels(bmx),
                "ports": [
                    {"name": "smtp", "port": SMTP_PORT, "targetPort": "smtp", "protocol": "TCP"},
                    {"name": "admin", "port": ADMIN_PORT, "targetPort": "admin", "protocol": "TCP"},
                ],
            }))
            .expect("the Service spec is well-formed"),
        ),
        status: None,
    }
}

/// The LoadBalancer Service on port 25.
pub fn smtp_service(bmx: &BackupMx) -> Service {
    let names = Names::of(bmx);
    Service {
        metadata: child_meta(bmx, &names.smtp_service),
        spec: Some(
            serde_json::from_value(json!({
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "selector": selector_labels(bmx),
                "ports": [
                    {"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"},
                ],
            }))
            .expect("the Service spec is well-formed"),
        ),
        status: None,
    }
}

/// The namespaces (as selector `matchLabels`) whose pods may reach the admin port: the
/// operator's own namespace by name, always (without it the operator could neither read the
/// queues nor steer replay), then `spec.networkPolicy.adminFromNamespaces`.
pub fn admin_namespaces(bmx: &BackupMx, operator_namespace: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = vec![BTreeMap::from([(
        NAMESPACE_NAME_LABEL.to_string(),
        operator_namespace.to_string(),
    )])];
    for listed in &bmx.spec.network_policy.admin_from_namespaces {
        if !out.contains(listed) {
            out.push(listed.clone());
        }
    }
    out
}

/// The pods' NetworkPolicy, or `None` when `spec.networkPolicy.enabled` is false (the
/// reconciler then deletes the one it made). Ingress only: the pods' own connections (to the
/// primary, DNS, rspamd) are not restricted.
pub fn network_policy(bmx: &BackupMx, operator_namespace: &str) -> Option<NetworkPolicy> {
    if !bmx.spec.network_policy.enabled {
        return None;
    }
    let names = Names::of(bmx);
    let admin_from: Vec<_> = admin_namespaces(bmx, operator_namespace)
        .into_iter()
        .map(|labels| json!({"namespaceSelector": {"matchLabels": labels}}))
        .collect();
    Some(NetworkPolicy {
        metadata: child_meta(bmx, &names.network_policy),
        spec: Some(
            serde_json::from_value(json!({
                "podSelector": {"matchLabels": selector_labels(bmx)},
                "policyTypes": ["Ingress"],
                "ingress": [
                    // no `from`: mail comes from anywhere
                    {"ports": [{"port": SMTP_PORT, "protocol": "TCP"}]},
                    {"ports": [{"port": ADMIN_PORT, "protocol": "TCP"}], "from": admin_from},
                ],
            }))
            .expect("the NetworkPolicy spec is well-formed"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{BackupMxExt, backupmx};
    use serde_json::Value;

    #[test]
    fn smtp_service_keeps_client_ips_and_names_protocols() {
        let bmx = backupmx();
        let v = serde_json::to_value(smtp_service(&bmx)).unwrap();
        assert_eq!(v["spec"]["type"], "LoadBalancer");
        assert_eq!(v["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(v["spec"]["ports"][0]["port"], 25);
        assert_eq!(v["spec"]["ports"][0]["protocol"], "TCP");
        let h = serde_json::to_value(headless_service(&bmx)).unwrap();
        assert_eq!(h["spec"]["clusterIP"], "None");
        assert!(
            h["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["protocol"] == "TCP")
        );
    }

    /// The rendered NetworkPolicy as JSON, the operator running in `backupmx-system`.
    fn policy(bmx: &BackupMx) -> Option<Value> {
        network_policy(bmx, "backupmx-system").map(|p| serde_json::to_value(p).unwrap())
    }

    /// The ingress rule that opens `port`, whatever its position.
    fn rule_for(policy: &Value, port: u16) -> Value {
        let rules = policy["spec"]["ingress"].as_array().unwrap();
        let matching: Vec<&Value> = rules
            .iter()
            .filter(|r| {
                r["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"] == port)
            })
            .collect();
        assert_eq!(matching.len(), 1, "one rule for port {port}: {policy}");
        matching[0].clone()
    }

    #[test]
    fn network_policy_fences_the_admin_port_to_the_operator_namespace_by_default() {
        let bmx = backupmx();
        let p = policy(&bmx).expect("on by default");
        assert_eq!(p["metadata"]["name"], "example-mx-pod");
        assert_eq!(p["metadata"]["namespace"], "mail");
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "BackupMx");
        assert_eq!(p["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(
            p["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "backupmx-operator"
        );
        // exactly the StatefulSet's pods, ingress only
        assert_eq!(
            p["spec"]["podSelector"]["matchLabels"],
            json!(selector_labels(&bmx))
        );
        assert_eq!(p["spec"]["policyTypes"], json!(["Ingress"]));
        assert_eq!(p["spec"]["ingress"].as_array().unwrap().len(), 2);
        let admin = rule_for(&p, ADMIN_PORT);
        assert_eq!(
            admin["ports"],
            json!([{"port": ADMIN_PORT, "protocol": "TCP"}]),
            "only the admin port in this rule"
        );
        assert_eq!(
            admin["from"],
            json!([{"namespaceSelector": {"matchLabels":
                {"kubernetes.io/metadata.name": "backupmx-system"}}}])
        );
    }

    #[test]
    fn network_policy_leaves_smtp_open_to_everyone() {
        let bmx = backupmx().with_spec(|s| {
            s.network_policy.admin_from_namespaces = vec![BTreeMap::from([(
                "team".to_string(),
                "monitoring".to_string(),
            )])]
        });
        let p = policy(&bmx).unwrap();
        let smtp = rule_for(&p, SMTP_PORT);
        assert_eq!(
            smtp["ports"],
            json!([{"port": SMTP_PORT, "protocol": "TCP"}])
        );
        assert!(smtp.get("from").is_none(), "no `from`: any source: {smtp}");
    }

    #[test]
    fn network_policy_admits_each_listed_namespace_selector_besides_the_operators() {
        let monitoring = BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            "monitoring".to_string(),
        )]);
        let ops = BTreeMap::from([
            ("team".to_string(), "mail".to_string()),
            ("tier".to_string(), "ops".to_string()),
        ]);
        let operator = BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            "backupmx-system".to_string(),
        )]);
        let bmx = backupmx().with_spec(|s| {
            s.network_policy.admin_from_namespaces =
                vec![monitoring.clone(), ops.clone(), operator.clone()]
        });
        let p = policy(&bmx).unwrap();
        // one peer per entry (OR); the labels of one entry all apply (AND); the operator's
        // namespace always, once
        assert_eq!(
            rule_for(&p, ADMIN_PORT)["from"],
            json!([
                {"namespaceSelector": {"matchLabels": operator}},
                {"namespaceSelector": {"matchLabels": monitoring}},
                {"namespaceSelector": {"matchLabels": ops}},
            ]),
            "a list adds to the operator's namespace, it cannot lock the operator out"
        );
    }

    #[test]
    fn a_disabled_network_policy_is_not_rendered() {
        let bmx = backupmx().with_spec(|s| s.network_policy.enabled = false);
        assert_eq!(policy(&bmx), None);
        let from_yaml: crate::crd::BackupMxSpec = serde_json::from_value(json!({
            "domains": ["example.com"], "primary": {"host": "mail.example.com"},
            "storage": {"size": "1Gi"}, "mx": {"hostname": "mx2.example.com"},
            "networkPolicy": {"adminFromNamespaces": [{"team": "ops"}]},
        }))
        .unwrap();
        assert!(from_yaml.network_policy.enabled, "enabled defaults to true");
    }
}
