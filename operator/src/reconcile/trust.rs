//! The CA bundle of a BackupMx (`spec.caBundle`), read from its Secret once per pass, so every
//! TLS connection the operator opens for the object (the DNS provider's API, the alert webhook,
//! the primary's probe under `tlsPolicy: verify`) trusts what its pods trust: the Mozilla roots
//! plus that bundle. A missing Secret, a missing key or a bundle without a certificate refuses
//! the object (`Ready=False`, reason `CaBundleInvalid`) before any pod would fail to mount it.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use mx_pod::trust::Trust;

use super::Context;
use crate::crd::BackupMx;

/// The condition reason of an unusable CA bundle.
pub const CA_BUNDLE_INVALID: &str = "CaBundleInvalid";

/// The CA bundle's PEM text and the trust it makes; the Mozilla roots alone without one.
#[derive(Clone, Debug, Default)]
pub struct Bundle {
    pub pem: Option<String>,
    pub trust: Trust,
}

/// Reads `spec.caBundle`; the error is the message of `CaBundleInvalid`.
pub async fn load(bmx: &BackupMx, ctx: &Context) -> Result<Bundle, String> {
    let Some(spec) = &bmx.spec.ca_bundle else {
        return Ok(Bundle::default());
    };
    let ns = bmx.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = api
        .get_opt(&spec.secret_name)
        .await
        .map_err(|e| {
            format!(
                "cannot read Secret {ns}/{} (spec.caBundle): {e}",
                spec.secret_name
            )
        })?
        .ok_or_else(|| {
            format!(
                "Secret {ns}/{} (spec.caBundle.secretName) does not exist",
                spec.secret_name
            )
        })?;
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&spec.key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .ok_or_else(|| {
            format!(
                "Secret {ns}/{} has no key {:?} (spec.caBundle.key)",
                spec.secret_name, spec.key
            )
        })?;
    bundle(
        &pem,
        &format!("Secret {ns}/{} key {:?}", spec.secret_name, spec.key),
    )
}

/// The trust of a PEM bundle; `origin` names it in errors.
pub fn bundle(pem: &str, origin: &str) -> Result<Bundle, String> {
    let trust = Trust::with_pem(pem.as_bytes(), origin).map_err(|e| e.0)?;
    Ok(Bundle {
        pem: Some(pem.to_owned()),
        trust,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_without_certificates_names_its_secret() {
        let e = bundle("no pem here", "Secret mail/ca key \"ca.crt\"").unwrap_err();
        assert!(e.contains("Secret mail/ca key \"ca.crt\""), "{e}");
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
