//! Bearer-token check for the admin API's `/v1` calls. Without a configured token they are
//! refused (secure by default), and the comparison takes the same time whatever the input.

use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION};

/// Checks `Authorization: Bearer <token>`; the error is the status and message to return.
pub fn check(expected: Option<&str>, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
    let Some(expected) = expected else {
        return Err((
            StatusCode::FORBIDDEN,
            "the queue API is disabled: no admin token is configured (set admin.token_file)".into(),
        ));
    };
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err((StatusCode::UNAUTHORIZED, "invalid bearer token".into())),
        None => Err((
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <token>)".into(),
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn token_rules() {
        assert!(check(Some("s3cret"), &headers("Bearer s3cret")).is_ok());
        assert_eq!(
            check(Some("s3cret"), &headers("Bearer nope"))
                .unwrap_err()
                .0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            check(Some("s3cret"), &HeaderMap::new()).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            check(None, &headers("Bearer s3cret")).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
    }
}
