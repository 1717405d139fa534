//! Envelope addresses exactly as the client spelled them.
//!
//! smtp-proto parses `MAIL FROM:` and `RCPT TO:` (and their parameters) but hands back the
//! mailbox *dequoted*: `"john doe"@example.test` comes back as `john doe@example.test`, which is
//! no address at all, and replaying it made the primary answer `501`. The path is therefore taken
//! from the command line itself ([`raw_path`]): quotes and quoted-pairs stay as they were, so the
//! queue, the replay and the DSNs carry the one spelling the sender used (RFC 5321 4.1.2: a
//! quoted local part is the mailbox; only the primary may interpret it).

/// The mailbox of a `MAIL FROM:<...>` or `RCPT TO:<...>` line as the client wrote it: what is
/// between the angle brackets, without a source route (`@a,@b:`, RFC 5321 4.1.1.3: accepted and
/// ignored), quotes and backslash escapes in a quoted local part kept. `None` when the line has
/// no complete `<...>` path or the path is not UTF-8.
pub fn raw_path(line: &[u8]) -> Option<String> {
    let lt = line.iter().position(|&b| b == b'<')?;
    let rest = &line[lt + 1..];
    let mut in_quote = false;
    let mut escaped = false;
    let mut end = None;
    for (i, &b) in rest.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            b'>' if !in_quote => {
                end = Some(i);
                break;
            }
            b'\r' | b'\n' => return None,
            _ => {}
        }
    }
    let path = std::str::from_utf8(&rest[..end?]).ok()?;
    // a source route ends at the first `:` (it has no quotes)
    let path = match path.strip_prefix('@') {
        Some(route) => route.split_once(':')?.1,
        None => path,
    };
    Some(path.to_owned())
}

/// The address with its local part's quoting undone (quotes dropped, quoted-pairs resolved): the
/// form smtp-proto gives, to check that [`raw_path`] read the same path it parsed.
pub fn dequoted(address: &str) -> String {
    let mut out = String::with_capacity(address.len());
    let mut in_quote = false;
    let mut chars = address.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => in_quote = !in_quote,
            '\\' if in_quote => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// A local part's content: a quoted string without its quotes and with its quoted-pairs
/// resolved, a dot-string as it is. `None` for a quoted string that is not well formed.
pub fn local_content(local: &str) -> Option<String> {
    match local.strip_prefix('"') {
        None => Some(local.to_owned()),
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.push(chars.next()?),
                    '"' => return None,
                    c => out.push(c),
                }
            }
            Some(out)
        }
    }
}

/// True for an RFC 5321 Dot-string (atoms of atext joined by single dots), with RFC 6531's
/// UTF-8 characters allowed in atext.
fn is_dot_string(s: &str) -> bool {
    const SPECIALS: &str = "!#$%&'*+-/=?^_`{|}~";
    !s.is_empty()
        && s.split('.').all(|atom| {
            !atom.is_empty()
                && atom
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || SPECIALS.contains(c) || !c.is_ascii())
        })
}

/// The key two spellings of one mailbox share, for recipient lists and the callout cache: the
/// local part's content when quoting it changes nothing (`"john"` is `john`; `"john doe"` stays
/// quoted), ASCII lower case, and the domain's `route` (its A-label form).
pub fn mailbox_key(address: &str, route: &str) -> String {
    let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
    let local = match local_content(local) {
        Some(content) if local.starts_with('"') && is_dot_string(&content) => content,
        _ => local.to_owned(),
    };
    format!("{}@{route}", local.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_is_taken_as_written() {
        let cases = [
            ("RCPT TO:<user@example.test>\r\n", Some("user@example.test")),
            (
                "RCPT TO:<\"john doe\"@example.test> NOTIFY=NEVER\r\n",
                Some("\"john doe\"@example.test"),
            ),
            (
                "RCPT TO:<\"a>b\\\"c\"@example.test>\r\n",
                Some("\"a>b\\\"c\"@example.test"),
            ),
            (
                "MAIL FROM:<@a.test,@b.test:s@sender.test> SIZE=10\r\n",
                Some("s@sender.test"),
            ),
            ("MAIL FROM:<>\r\n", Some("")),
            (
                "RCPT TO:<jürgen@bücher.example>\r\n",
                Some("jürgen@bücher.example"),
            ),
            ("RCPT TO:<\"unterminated@example.test>\r\n", None),
            ("RCPT TO:user@example.test\r\n", None),
        ];
        for (line, want) in cases {
            assert_eq!(raw_path(line.as_bytes()).as_deref(), want, "{line:?}");
        }
    }

    #[test]
    fn dequoting_matches_smtp_proto() {
        for (line, raw) in [
            (
                "RCPT TO:<\"john doe\"@example.test>\r\n",
                "\"john doe\"@example.test",
            ),
            (
                "RCPT TO:<\"x\\\"y\\\\z\"@example.test>\r\n",
                "\"x\\\"y\\\\z\"@example.test",
            ),
            ("RCPT TO:<plain@example.test>\r\n", "plain@example.test"),
        ] {
            let parsed = match smtp_proto::Request::parse(&mut line.as_bytes().iter()).unwrap() {
                smtp_proto::Request::Rcpt { to } => to.address,
                other => panic!("{other:?}"),
            };
            assert_eq!(raw_path(line.as_bytes()).as_deref(), Some(raw));
            assert_eq!(dequoted(raw), parsed, "{line:?}");
        }
    }

    #[test]
    fn local_part_content() {
        assert_eq!(local_content("john").as_deref(), Some("john"));
        assert_eq!(local_content("\"john doe\"").as_deref(), Some("john doe"));
        assert_eq!(local_content("\"a\\\"b\"").as_deref(), Some("a\"b"));
        assert_eq!(local_content("\"a\"b\""), None);
        assert_eq!(local_content("\"open"), None);
    }

    #[test]
    fn one_mailbox_one_key() {
        let route = "xn--bcher-kva.example";
        assert_eq!(
            mailbox_key("John@bücher.example", route),
            "john@xn--bcher-kva.example"
        );
        assert_eq!(
            mailbox_key("\"john\"@XN--BCHER-KVA.example", route),
            "john@xn--bcher-kva.example"
        );
        assert_eq!(
            mailbox_key("\"John Doe\"@bücher.example", route),
            "\"john doe\"@xn--bcher-kva.example"
        );
        assert_eq!(
            mailbox_key("jürgen@bücher.example", route),
            "jürgen@xn--bcher-kva.example"
        );
    }
}
