//! The objects a `BackupMx` becomes, as pure functions of the spec (and of what the API server
//! supports): no I/O here, so every object is unit-tested as data.
//!
//! | object | name | what |
//! |---|---|---|
//! | ConfigMap | `NAME-config` | `mx-pod.toml`, rendered from mx-pod's own `Config` type |
//! | Secret | `NAME-admin-token` | bearer token for the pods' mutating admin calls (made once) |
//! | StatefulSet | `NAME` | the mx-pods with one volume each |
//! | Service | `NAME-pods` | headless: stable pod names, admin port |
//! | Service | `NAME-smtp` | LoadBalancer on port 25, `externalTrafficPolicy: Local` |
//! | PodDisruptionBudget | `NAME` | at most one pod down at a time |
//! | NetworkPolicy | `NAME-mx-pod` | SMTP from anywhere, admin port from `adminFromNamespaces` (default: the operator's namespace); none if disabled |

pub mod config;
pub mod network;
pub mod secret;
pub mod workload;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::BackupMx;

/// Port mx-pod listens on for SMTP inside the pod (non-root: no port below 1024); the
/// LoadBalancer Service maps port 25 to it.
pub const SMTP_PORT: u16 = 2525;
/// Port of mx-pod's admin API (health, metrics, queue, replay).
pub const ADMIN_PORT: u16 = 8025;
/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "backupmx-operator";
/// Annotation on the pod template: hash of the rendered config, so a change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "backupmx.io/config-hash";
/// Key of the token in the admin-token Secret.
pub const TOKEN_KEY: &str = "token";

/// Names of the objects made for one `BackupMx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub statefulset: String,
    pub headless_service: String,
    pub smtp_service: String,
    pub configmap: String,
    pub secret: String,
    pub pdb: String,
    pub network_policy: String,
}

impl Names {
    pub fn of(bmx: &BackupMx) -> Self {
        let n = bmx.name_any();
        Self {
            statefulset: n.clone(),
            headless_service: format!("{n}-pods"),
            smtp_service: format!("{n}-smtp"),
            configmap: format!("{n}-config"),
            secret: format!("{n}-admin-token"),
            pdb: n.clone(),
            network_policy: format!("{n}-mx-pod"),
        }
    }
}

/// Labels that select this object's pods.
pub fn selector_labels(bmx: &BackupMx) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "mx-pod".to_string()),
        ("app.kubernetes.io/instance".to_string(), bmx.name_any()),
    ])
}

/// Labels on every object made for `bmx`.
pub fn labels(bmx: &BackupMx) -> BTreeMap<String, String> {
    let mut l = selector_labels(bmx);
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "backupmx-operator".into(),
    );
    l.insert("app.kubernetes.io/component".into(), "backup-mx".into());
    l
}

/// `app.kubernetes.io/name=mx-pod,app.kubernetes.io/instance=NAME`, for list calls.
pub fn selector_string(bmx: &BackupMx) -> String {
    selector_labels(bmx)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Metadata of a child object: name, namespace, labels and the controller owner reference.
pub fn child_meta(bmx: &BackupMx, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: bmx.namespace(),
        labels: Some(labels(bmx)),
        owner_references: Some(vec![owner_ref(bmx)]),
        ..Default::default()
    }
}

/// Controller owner reference to `bmx` (children are garbage-collected with it).
pub fn owner_ref(bmx: &BackupMx) -> OwnerReference {
    bmx.controller_owner_ref(&())
        .expect("a BackupMx from the API server has a name and uid")
}
