//! The admin-token Secret: a random bearer token, made once and then kept (the reconciler reads
//! the existing one back and applies it unchanged, so pods never see it rotate under them).

use k8s_openapi::{ByteString, api::core::v1::Secret};
use rand::RngCore;

use super::{Names, TOKEN_KEY, child_meta};
use crate::crd::BackupMx;

/// A new random token: 32 bytes from the OS generator, hex-encoded.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token held by an existing Secret, if it has a usable one.
pub fn token_of(secret: &Secret) -> Option<String> {
    let raw = secret.data.as_ref()?.get(TOKEN_KEY)?;
    let token = String::from_utf8(raw.0.clone()).ok()?;
    (!token.trim().is_empty()).then(|| token.trim().to_string())
}

/// The Secret with `token`.
pub fn secret(bmx: &BackupMx, token: &str) -> Secret {
    Secret {
        metadata: child_meta(bmx, &Names::of(bmx).secret),
        type_: Some("Opaque".into()),
        data: Some([(TOKEN_KEY.to_string(), ByteString(token.as_bytes().to_vec()))].into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::backupmx;

    #[test]
    fn tokens_are_random_and_read_back() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let s = secret(&backupmx(), &a);
        assert_eq!(token_of(&s).as_deref(), Some(a.as_str()));
        assert_eq!(token_of(&Secret::default()), None);
    }
}
