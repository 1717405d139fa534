//! The relay rule: accept a recipient only when it is a `local@domain` address in one of the
//! configured domains. Anything that could make the primary (or us) forward elsewhere is
//! refused: `%` and `!` routing in the local part, an `@` in it (quoted or escaped), source
//! routes, IP literals, trailing dots and any domain not configured.
//!
//! A quoted local part is a mailbox like any other (`"john doe"@example.test`) and is accepted,
//! and kept quoted all the way to the primary, unless its content holds one of those routing
//! characters: `"user@other.test"@example.test` or `"a@b"@example.test` is refused like
//! `user%other.test@example.test`, because a primary that looks inside the quotes would route
//! it elsewhere, and a default Postfix primary (`resolve_dequoted_address = yes`) refuses it as
//! "Relay access denied", so accepting it here would only turn into a bounce (backscatter).

use super::Verdict;
use crate::{address::local_content, config::Config, reply::RejectReason};

/// Checks one RCPT address (as the client wrote it, without brackets: a quoted local part keeps
/// its quotes). `raw_line` is the command as sent, used to spot source routes.
pub fn check(config: &Config, address: &str, raw_line: &[u8]) -> Verdict {
    if has_source_route(raw_line) {
        return Verdict::Reject(RejectReason::SourceRoute);
    }
    // a domain has no `@` and no quotes: the last `@` ends the local part, quoted or not
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Verdict::Reject(RejectReason::Relay);
    };
    let quoted = local.starts_with('"');
    let routes_elsewhere = match local_content(local) {
        None => true,
        Some(content) => {
            content.is_empty()
                || content.contains(['@', '%', '!'])
                || (!quoted && (content.contains(['"', '\\']) || content.starts_with('.')))
        }
    };
    if routes_elsewhere || config.domain(domain).is_none() {
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
            "\"a@b\"@example.com",
            "\"user%other.com\"@example.com",
            "\"user\\@other.com\"@example.com",
            "\"\"@example.com",
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
    fn quoted_local_parts_without_routing_characters_are_accepted() {
        for addr in [
            "\"john doe\"@example.com",
            "\"john..doe\"@example.com",
            "\"x\\\"y\"@example.com",
            "\"john\"@EXAMPLE.COM",
        ] {
            assert_eq!(verdict(addr), Verdict::Accept, "{addr}");
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
