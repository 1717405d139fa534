//! The two Services: a headless one that gives the StatefulSet's pods stable names and exposes
//! their admin port inside the cluster, and the LoadBalancer that receives mail on port 25.
//!
//! The LoadBalancer uses `externalTrafficPolicy: Local` so the pods see the senders' real IP
//! addresses, which filtering (DNSBL, rate limits, SPF) needs. Every port names its `protocol`
//! explicitly: server-side apply on Kubernetes 1.20 refuses Service ports without it.

use k8s_openapi::api::core::v1::Service;
use serde_json::json;

use super::{ADMIN_PORT, Names, SMTP_PORT, child_meta, selector_labels};
use crate::crd::BackupMx;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::backupmx;

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
}
