//! TXT data as DNS character-strings, the one rule every provider uses.
//!
//! A TXT record holds one or more character-strings of at most 255 bytes each (RFC 1035
//! §3.3.14: the length is one octet). We keep the text joined ([`super::RData::Txt`]) and cut it
//! when writing: at 255 bytes, but never inside a UTF-8 character, so every piece is valid UTF-8
//! and reads back (joined) as written, whether the provider takes bytes (RFC 2136) or the
//! presentation form (PowerDNS, Cloudflare, Route 53).

/// Most bytes in one character-string.
pub const MAX_STRING: usize = 255;

/// `text` cut into character-strings of at most [`MAX_STRING`] bytes, each ending on a character
/// boundary; an empty text is one empty string (a TXT record has at least one).
pub fn split(text: &str) -> Vec<&str> {
    let mut parts = Vec::with_capacity(text.len() / MAX_STRING + 1);
    let mut rest = text;
    while rest.len() > MAX_STRING {
        let mut end = MAX_STRING;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (head, tail) = rest.split_at(end);
        parts.push(head);
        rest = tail;
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(rest);
    }
    parts
}

/// The presentation form (RFC 1035 §5.1): each character-string of [`split`] in double quotes,
/// `"` and `\` escaped with a backslash, separated by spaces (`"a..." "b"`).
pub fn presentation(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    for (i, part) in split(text).into_iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push('"');
        for c in part.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out
}

/// The inverse of [`presentation`]: the character-strings joined (`"a b" "c\"d"` → `a bc"d`).
/// Text without a leading quote is taken as it is (trimmed). A backslash takes the next
/// character literally.
pub fn unquote(text: &str) -> String {
    let t = text.trim();
    if !t.starts_with('"') {
        return t.to_string();
    }
    let mut out = String::new();
    let mut chars = t.chars();
    let mut inside = false;
    while let Some(c) = chars.next() {
        match (inside, c) {
            (false, '"') => inside = true,
            (true, '"') => inside = false,
            (true, '\\') => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            (true, c) => out.push(c),
            (false, _) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_string() {
        assert_eq!(split("v=spf1 mx -all"), ["v=spf1 mx -all"]);
        assert_eq!(presentation("v=spf1 mx -all"), "\"v=spf1 mx -all\"");
    }

    #[test]
    fn empty_text_is_one_empty_string() {
        assert_eq!(split(""), [""]);
        assert_eq!(presentation(""), "\"\"");
        assert_eq!(unquote("\"\""), "");
    }

    #[test]
    fn exactly_255_bytes_is_one_string_and_256_two() {
        let t = "a".repeat(255);
        assert_eq!(split(&t), [t.as_str()]);
        let t = "a".repeat(256);
        assert_eq!(split(&t), ["a".repeat(255).as_str(), "a"]);
        assert_eq!(presentation(&t), format!("\"{}\" \"a\"", "a".repeat(255)));
    }

    #[test]
    fn long_text_is_cut_every_255_bytes() {
        let t = "x".repeat(600);
        let parts = split(&t);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [255, 255, 90]
        );
        assert_eq!(parts.concat(), t);
    }

    #[test]
    fn never_cuts_inside_a_character() {
        // 254 ASCII bytes, then "é" (2 bytes) would straddle byte 255
        let t = format!("{}é{}", "a".repeat(254), "b".repeat(10));
        let parts = split(&t);
        assert_eq!(parts[0], "a".repeat(254));
        assert_eq!(parts[1], format!("é{}", "b".repeat(10)));
        // 4-byte characters: 63 of them fill 252 bytes, the 64th goes to the next string
        let t = "😀".repeat(100);
        let parts = split(&t);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [252, 148]
        );
        assert!(parts.iter().all(|p| p.len() <= MAX_STRING));
        assert_eq!(unquote(&presentation(&t)), t);
    }

    #[test]
    fn quotes_and_backslashes_are_escaped() {
        assert_eq!(presentation("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(presentation("a\\b"), "\"a\\\\b\"");
        assert_eq!(unquote("\"a b\" \"c\\\"d\""), "a bc\"d");
        assert_eq!(unquote("\"a\\\\b\""), "a\\b");
    }

    #[test]
    fn escapes_count_toward_nothing_but_the_text() {
        // 255 quotes are 255 bytes of text: one string, each escaped in presentation form
        let t = "\"".repeat(255);
        assert_eq!(split(&t).len(), 1);
        assert_eq!(presentation(&t), format!("\"{}\"", "\\\"".repeat(255)));
    }

    #[test]
    fn round_trips() {
        for t in [
            String::new(),
            "heritage=backupmx,v=1,owner=ns/b,type=MX,data=20 mx2.example.com.".to_string(),
            "q\"uo\\te".repeat(100),
            "ü".repeat(300),
            format!("{}\"{}", "a".repeat(254), "b".repeat(300)),
        ] {
            assert_eq!(unquote(&presentation(&t)), t, "{t}");
            assert_eq!(split(&t).concat(), t);
        }
    }

    #[test]
    fn unquoted_text_is_taken_as_it_is() {
        assert_eq!(unquote("  plain text "), "plain text");
    }
}
