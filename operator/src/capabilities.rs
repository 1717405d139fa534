//! What the API server serves, found once at start-up by discovery, so one operator build works
//! from Kubernetes 1.20 to current versions without giving up features where they exist:
//! PodDisruptionBudget `policy/v1` (1.21+) or else `policy/v1beta1`, and the StatefulSet
//! `persistentVolumeClaimRetentionPolicy` field only where it is served and on by default (1.27+;
//! server-side apply of a field the server does not know fails with HTTP 500). Whether namespaces
//! carry the `kubernetes.io/metadata.name` label (1.21+) is only logged: the NetworkPolicy's
//! default peer relies on it, and on older servers someone must set it.

use kube::{
    Client,
    api::{ApiResource, GroupVersionKind},
};

/// API features the reconciler adapts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// `policy/v1` PodDisruptionBudget is served (else `policy/v1beta1`).
    pub pdb_v1: bool,
    /// StatefulSet `persistentVolumeClaimRetentionPolicy` can be set.
    pub pvc_retention_policy: bool,
    /// The API server labels every namespace `kubernetes.io/metadata.name=NAME` (1.21+).
    pub namespace_name_label: bool,
    /// `major.minor` of the API server, for logs.
    pub server_version: String,
}

impl Capabilities {
    /// A current API server (what the unit tests render against).
    pub fn current() -> Self {
        Self {
            pdb_v1: true,
            pvc_retention_policy: true,
            namespace_name_label: true,
            server_version: "1.33".into(),
        }
    }

    /// Asks the API server.
    pub async fn discover(client: &Client) -> Result<Self, kube::Error> {
        let info = client.apiserver_version().await?;
        let minor: u32 = info
            .minor
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .unwrap_or(0);
        let major: u32 = info.major.parse().unwrap_or(1);
        let pdb_v1 = match client.list_api_group_resources("policy/v1").await {
            Ok(list) => list
                .resources
                .iter()
                .any(|r| r.name == "poddisruptionbudgets"),
            Err(kube::Error::Api(e)) if e.code == 404 => false,
            Err(e) => return Err(e),
        };
        Ok(Self {
            pdb_v1,
            pvc_retention_policy: major > 1 || minor >= 27,
            namespace_name_label: major > 1 || minor >= 21,
            server_version: format!("{}.{}", info.major, info.minor),
        })
    }

    /// The PodDisruptionBudget API to use.
    pub fn pdb_resource(&self) -> ApiResource {
        let version = if self.pdb_v1 { "v1" } else { "v1beta1" };
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("policy", version, "PodDisruptionBudget"),
            "poddisruptionbudgets",
        )
    }
}
