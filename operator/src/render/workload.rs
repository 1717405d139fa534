//! The StatefulSet of mx-pods and its PodDisruptionBudget.
//!
//! Choices, and why:
//! - one volume per pod from `volumeClaimTemplates`; the claims are never owned by the BackupMx,
//!   and where the API serves it `persistentVolumeClaimRetentionPolicy` says `Retain` for both
//!   delete and scale-down: queued mail outlives the objects;
//! - `podManagementPolicy: Parallel`: after an outage every pod should come back at once;
//! - non-root (uid 65532), read-only root filesystem, every capability dropped, RuntimeDefault
//!   seccomp: SMTP listens on 2525 and the Service maps 25 to it, so no capability is needed;
//! - readiness on `/readyz` (false while recovering the queue or draining), liveness on `/healthz`;
//! - `terminationGracePeriodSeconds` covers mx-pod's SMTP shutdown grace plus the queue sync;
//! - spread over zones and nodes (soft, so a small cluster still schedules every pod);
//! - the config hash on the pod template: a config change rolls the pods one by one.

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::DynamicObject;
use serde_json::json;

use super::{
    ADMIN_PORT, CONFIG_HASH_ANNOTATION, Names, SMTP_PORT, TOKEN_KEY, child_meta,
    config::{
        CA_FILE, CONFIG_DIR, CONFIG_FILE, DATA_DIR, SHUTDOWN_GRACE, TLS_DIR, TOKEN_DIR, TRUST_DIR,
    },
    labels, selector_labels,
};
use crate::{capabilities::Capabilities, crd::BackupMx};

/// User and group the mx-pod container runs as.
pub const RUN_AS: i64 = 65532;
/// Name of the volume claim template (claims are `queue-NAME-N`).
pub const VOLUME_NAME: &str = "queue";
/// Name of the mx-pod container.
pub const CONTAINER: &str = "mx-pod";

/// The StatefulSet for `bmx`, its pods running `image` with config hash `config_hash`.
pub fn statefulset(
    bmx: &BackupMx,
    image: &str,
    config_hash: &str,
    caps: &Capabilities,
) -> StatefulSet {
    let names = Names::of(bmx);
    let spec = &bmx.spec;
    let selector = selector_labels(bmx);
    let mut pod_labels = spec.pod_labels.clone();
    pod_labels.extend(labels(bmx));
    let grace = SHUTDOWN_GRACE.as_secs() + 30;
    // `volumeClaimTemplates` is an atomic list: the API server's defaults (volumeMode, status)
    // are spelled out so the applied templates equal the stored ones (see `apply_body`)
    let mut claim_spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": spec.storage.size}},
        "volumeMode": "Filesystem",
    });
    if let Some(class) = &spec.storage.storage_class_name {
        claim_spec["storageClassName"] = json!(class);
    }
    let spread = |key: &str| {
        json!({
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector},
        })
    };
    let mut sts_spec = json!({
        "replicas": spec.replicas,
        "serviceName": names.headless_service,
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate"},
        "selector": {"matchLabels": selector},
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
            },
            "spec": {
                "terminationGracePeriodSeconds": grace,
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": RUN_AS,
                    "runAsGroup": RUN_AS,
                    "fsGroup": RUN_AS,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "topologySpreadConstraints": [
                    spread("topology.kubernetes.io/zone"),
                    spread("kubernetes.io/hostname"),
                ],
                "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": selector},
                    },
                }]}},
                "containers": [{
                    "name": CONTAINER,
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "args": ["serve", "--config", format!("{CONFIG_DIR}/{CONFIG_FILE}")],
                    "env": [{"name": "MXPOD_LOG_FORMAT", "value": "json"}],
                    "ports": [
                        {"name": "smtp", "containerPort": SMTP_PORT, "protocol": "TCP"},
                        {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
                    ],
                    "readinessProbe": {
                        "httpGet": {"path": "/readyz", "port": "admin"},
                        "periodSeconds": 5,
                        "timeoutSeconds": 2,
                        "failureThreshold": 2,
                    },
                    "livenessProbe": {
                        "httpGet": {"path": "/healthz", "port": "admin"},
                        "periodSeconds": 10,
                        "timeoutSeconds": 5,
                        "failureThreshold": 6,
                    },
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "128Mi"},
                        "limits": {"memory": "512Mi"},
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "privileged": false,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": VOLUME_NAME, "mountPath": DATA_DIR},
                        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
                        {"name": "token", "mountPath": TOKEN_DIR, "readOnly": true},
                    ],
                }],
                "volumes": [
                    {"name": "config", "configMap": {"name": names.configmap}},
                    {"name": "token", "secret": {
                        "secretName": names.secret,
                        "defaultMode": 0o440,
                        "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}],
                    }},
                ],
            },
        },
        "volumeClaimTemplates": [{
            "metadata": {"name": VOLUME_NAME, "labels": selector},
            "spec": claim_spec,
            "status": {"phase": "Pending"},
        }],
    });
    if let Some(tls) = &spec.tls {
        let pod = &mut sts_spec["template"]["spec"];
        pod["volumes"].as_array_mut().expect("volumes").push(json!({
            "name": "tls",
            "secret": {"secretName": tls.secret_name, "defaultMode": 0o440},
        }));
        pod["containers"][0]["volumeMounts"]
            .as_array_mut()
            .expect("mounts")
            .push(json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}));
    }
    if let Some(ca) = &spec.ca_bundle {
        let pod = &mut sts_spec["template"]["spec"];
        pod["volumes"].as_array_mut().expect("volumes").push(json!({
            "name": "trust",
            "secret": {
                "secretName": ca.secret_name,
                "defaultMode": 0o444,
                "items": [{"key": ca.key, "path": CA_FILE}],
            },
        }));
        pod["containers"][0]["volumeMounts"]
            .as_array_mut()
            .expect("mounts")
            .push(json!({"name": "trust", "mountPath": TRUST_DIR, "readOnly": true}));
    }
    if caps.pvc_retention_policy {
        sts_spec["persistentVolumeClaimRetentionPolicy"] =
            json!({"whenDeleted": "Retain", "whenScaled": "Retain"});
    }
    StatefulSet {
        metadata: child_meta(bmx, &names.statefulset),
        spec: serde_json::from_value(sts_spec).expect("the StatefulSet spec is well-formed"),
        status: None,
    }
}

/// The server-side apply body of a StatefulSet. `volumeClaimTemplates` is an atomic list, so
/// each template must equal what the API server stores, or every apply counts as a change
/// (a new managed-fields timestamp and resourceVersion each pass): the server keeps
/// `metadata.creationTimestamp: null` in the templates, which the typed object cannot carry.
pub fn apply_body(sts: &StatefulSet) -> serde_json::Value {
    let mut body = serde_json::to_value(sts).expect("a StatefulSet serializes");
    if let Some(templates) = body["spec"]["volumeClaimTemplates"].as_array_mut() {
        for t in templates {
            t["metadata"]["creationTimestamp"] = serde_json::Value::Null;
        }
    }
    body
}

/// The PodDisruptionBudget: voluntary disruptions (drains, upgrades) take one pod at a time.
pub fn pdb(bmx: &BackupMx, caps: &Capabilities) -> DynamicObject {
    let ar = caps.pdb_resource();
    let mut obj = DynamicObject::new(&Names::of(bmx).pdb, &ar).data(json!({
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(bmx)},
        }
    }));
    obj.metadata = child_meta(bmx, &Names::of(bmx).pdb);
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::backupmx;

    fn caps(old: bool) -> Capabilities {
        Capabilities {
            pdb_v1: !old,
            pvc_retention_policy: !old,
            namespace_name_label: !old,
            server_version: if old { "1.20" } else { "1.33" }.into(),
        }
    }

    #[test]
    fn statefulset_is_locked_down_and_keeps_its_volumes() {
        let bmx = backupmx();
        let sts = statefulset(&bmx, "mx-pod:1", "abc", &caps(false));
        let v = serde_json::to_value(&sts).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(
            v["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION],
            "abc"
        );
        assert_eq!(
            v["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
            "1Gi"
        );
        assert_eq!(
            v["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"],
            "Retain"
        );
        assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 60);
        let body = apply_body(&sts);
        assert!(body["spec"]["volumeClaimTemplates"][0]["metadata"]["creationTimestamp"].is_null());
        assert!(
            body["spec"]["volumeClaimTemplates"][0]["metadata"]
                .as_object()
                .unwrap()
                .contains_key("creationTimestamp")
        );
        assert_eq!(
            v["metadata"]["ownerReferences"][0]["kind"], "BackupMx",
            "owned by its BackupMx"
        );
    }

    #[test]
    fn old_api_servers_get_no_newer_fields_and_pdb_v1beta1() {
        let bmx = backupmx();
        let v = serde_json::to_value(statefulset(&bmx, "i", "h", &caps(true))).unwrap();
        assert!(
            v["spec"]
                .get("persistentVolumeClaimRetentionPolicy")
                .is_none()
        );
        let p = serde_json::to_value(pdb(&bmx, &caps(true))).unwrap();
        assert_eq!(p["apiVersion"], "policy/v1beta1");
        assert_eq!(p["spec"]["maxUnavailable"], 1);
        let p = serde_json::to_value(pdb(&bmx, &caps(false))).unwrap();
        assert_eq!(p["apiVersion"], "policy/v1");
    }

    #[test]
    fn a_tls_secret_is_mounted_for_starttls() {
        let mut bmx = backupmx();
        bmx.spec.tls = Some(crate::crd::TlsSpec {
            secret_name: "mx-tls".into(),
        });
        let v = serde_json::to_value(statefulset(&bmx, "i", "h", &caps(false))).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        assert!(
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|vol| vol["secret"]["secretName"] == "mx-tls")
        );
        assert!(
            pod["containers"][0]["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == TLS_DIR)
        );
    }

    #[test]
    fn the_ca_bundle_key_is_mounted_where_the_config_names_it() {
        let mut bmx = backupmx();
        bmx.spec.ca_bundle = Some(crate::crd::CaBundleSpec {
            secret_name: "private-ca".into(),
            key: "bundle.pem".into(),
        });
        let v = serde_json::to_value(statefulset(&bmx, "i", "h", &caps(false))).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        let vol = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|vol| vol["name"] == "trust")
            .expect("trust volume");
        assert_eq!(vol["secret"]["secretName"], "private-ca");
        assert_eq!(vol["secret"]["items"][0]["key"], "bundle.pem");
        assert_eq!(vol["secret"]["items"][0]["path"], CA_FILE);
        let valid = crate::validate::validate(&bmx.spec).unwrap();
        let config = crate::render::config::mxpod_config(&bmx, &valid).unwrap();
        let file = config.trust.ca_file.unwrap();
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "trust")
            .unwrap()["mountPath"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(file, std::path::Path::new(&mount).join(CA_FILE));
    }

    #[test]
    fn user_pod_labels_cannot_replace_the_selector() {
        let mut bmx = backupmx();
        bmx.spec.pod_labels.insert("team".into(), "mail".into());
        let v = serde_json::to_value(statefulset(&bmx, "i", "h", &caps(false))).unwrap();
        let l = &v["spec"]["template"]["metadata"]["labels"];
        assert_eq!(l["team"], "mail");
        assert_eq!(l["app.kubernetes.io/instance"], "example");
    }
}
