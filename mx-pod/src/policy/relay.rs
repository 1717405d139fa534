//! The relay rule: accept a recipient only when it is a plain `local@domain` address in one of
//! the configured domains. Anything that could make the primary (or us) forward elsewhere is
//! refused: `%` and `!` routing in the local part, a quoted local part hiding an `@`, source
//! routes, IP literals, trailing dots and any domain not configured.

use super::Verdict;
use crate::{config::Config, smtp::reply::RejectReason};

/// Checks one RCPT address (as parsed, without brackets). `raw_line` is the command as sent,
/// used to spot source routes that a parser would strip.
pub fn check(config: &Config, address: &str, raw_line: &[u8]) -> Verdict {
    if has_source_route(raw_line) {
        return Verdict::Reject(RejectReason::SourceRoute);
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Verdict::Reject(RejectReason::Relay);
    };
    if local.is_empty()
        || local.contains(['@', '%', '!', '"', '\\'])
        || local.starts_with('.')
        || config.domain(domain).is_none()
    {
        return Verdict::Reject(RejectReason::Relay);
    }
    Verdict::Accept
}

/// True when the command's path starts with a source route (`<@a,@b:user@c>`).
fn has_source_route(raw_line: &[u8]) -> bool {
    let Some(lt) = raw_line.iter().position(|&b| b == b'<') else {
        return false;
    };
    raw_line[lt + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'@')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            "hostname = \"mx2.example.com\"\n[queue]\ndir = \"/tmp/q\"\n[[domains]]\nname = \"example.com\"\nprimary = \"127.0.0.1:25\"\n",
            "t",
        )
        .unwrap()
    }

    fn verdict(addr: &str) -> Verdict {
        check(&config(), addr, format!("RCPT TO:<{addr}>\r\n").as_bytes())
    }

    #[test]
    fn configured_domain_is_accepted_in_any_case() {
        assert_eq!(verdict("user@example.com"), Verdict::Accept);
        assert_eq!(verdict("User@EXAMPLE.COM"), Verdict::Accept);
    }

    #[test]
    fn relay_tricks_are_refused() {
        for addr in [
            "user@other.com",
            "user%other.com@example.com",
            "other.com!user@example.com",
            "\"user@other.com\"@example.com",
            "user@example.com.",
            "user@[127.0.0.1]",
            "user@mx2.example.com",
            "nodomain",
        ] {
            assert_eq!(
                verdict(addr),
                Verdict::Reject(RejectReason::Relay),
                "{addr}"
            );
        }
    }

    #[test]
    fn empty_local_part_is_refused() {
        assert!(matches!(verdict("@example.com"), Verdict::Reject(_)));
    }

    #[test]
    fn source_route_is_refused_even_if_the_final_address_is_ours() {
        let v = check(
            &config(),
            "user@example.com",
            b"RCPT TO:<@evil.com,@x.org:user@example.com>\r\n",
        );
        assert_eq!(v, Verdict::Reject(RejectReason::SourceRoute));
    }
}
