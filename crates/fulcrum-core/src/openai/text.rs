//! Prompt text kept as the JSON string literals of the body, decoded on demand.
//!
//! Decoding a 200 KB prompt into a new string costs an allocation as large as the prompt
//! (and, with the system allocator, its page faults); routing only needs to stream the text
//! through the block hasher, so the parser keeps the literals and [`JsonText::for_each_piece`]
//! decodes them piece by piece (runs between escapes are passed as they are).

use std::borrow::Cow;

/// Text of the body: one JSON string literal (a message's string content, a prompt), several
/// (the text parts of a content list, in order), or none (`null` content).
///
/// Each literal was checked by serde_json while parsing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JsonText<'a>(Literals<'a>);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Literals<'a> {
    #[default]
    Empty,
    One(&'a str),
    Many(Vec<&'a str>),
}

// === impl JsonText ===

impl<'a> JsonText<'a> {
    /// One literal, quotes included.
    pub(super) fn one(literal: &'a str) -> Self {
        JsonText(Literals::One(literal))
    }

    /// Several literals, joined in order.
    pub(super) fn many(mut literals: Vec<&'a str>) -> Self {
        match literals.len() {
            0 => JsonText(Literals::Empty),
            1 => JsonText(Literals::One(literals.swap_remove(0))),
            _ => JsonText(Literals::Many(literals)),
        }
    }

    fn literals(&self) -> &[&'a str] {
        match &self.0 {
            Literals::Empty => &[],
            Literals::One(l) => std::slice::from_ref(l),
            Literals::Many(v) => v,
        }
    }

    /// Passes the decoded text to `f` in order, in pieces (no allocation).
    pub fn for_each_piece(&self, mut f: impl FnMut(&str)) {
        for literal in self.literals() {
            unescape_pieces(literal, &mut f);
        }
    }

    /// The decoded text; borrowed from the body when it is one literal without escapes.
    pub fn to_text(&self) -> Cow<'a, str> {
        if let Literals::One(l) = self.0
            && let Some(inner) = inner(l)
            && !inner.contains('\\')
        {
            return Cow::Borrowed(inner);
        }
        let mut out = String::new();
        self.for_each_piece(|p| out.push_str(p));
        Cow::Owned(out)
    }

    /// Characters (Unicode scalar values) of the decoded text.
    pub fn char_count(&self) -> u64 {
        let mut n = 0u64;
        self.for_each_piece(|p| n += p.chars().count() as u64);
        n
    }
}

impl PartialEq<&str> for JsonText<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.to_text() == *other
    }
}

fn inner(literal: &str) -> Option<&str> {
    literal.strip_prefix('"')?.strip_suffix('"')
}

/// Decodes a JSON string literal (quotes included) into `f`, piece by piece. Returns false,
/// having stopped, at anything that is not valid JSON (serde_json has already checked the
/// literals the parser keeps). A lone surrogate escape, which serde_json's scan lets through,
/// becomes U+FFFD.
pub(super) fn unescape_pieces(literal: &str, f: &mut impl FnMut(&str)) -> bool {
    let Some(mut rest) = inner(literal) else { return false };
    loop {
        let Some(at) = rest.find('\\') else {
            if !rest.is_empty() {
                f(rest);
            }
            return true;
        };
        if at > 0 {
            f(&rest[..at]);
        }
        let Some(&escape) = rest.as_bytes().get(at + 1) else { return false };
        rest = &rest[at + 2..];
        let c = match escape {
            b'n' => '\n',
            b't' => '\t',
            b'r' => '\r',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'"' | b'\\' | b'/' => char::from(escape),
            b'u' => {
                let Some(unit) = hex4(rest) else { return false };
                rest = &rest[4..];
                let c = match unit {
                    0xD800..=0xDBFF => match rest.strip_prefix("\\u").and_then(hex4) {
                        Some(low @ 0xDC00..=0xDFFF) => {
                            rest = &rest[6..];
                            char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                        }
                        _ => None,
                    },
                    _ => char::from_u32(unit),
                };
                c.unwrap_or(char::REPLACEMENT_CHARACTER)
            }
            _ => return false,
        };
        f(c.encode_utf8(&mut [0u8; 4]));
    }
}

fn hex4(s: &str) -> Option<u32> {
    let digits = s.get(..4)?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(literal: &str) -> Option<String> {
        let mut out = String::new();
        unescape_pieces(literal, &mut |p| out.push_str(p)).then_some(out)
    }

    #[test]
    fn decoding_matches_serde_json() {
        for json in [
            r#""""#,
            r#""plain""#,
            r#""a\nb\tc\"d\\e\/f\bg\fh\ri""#,
            r#""\u00e9\u20AC \ud83d\ude00 end""#,
            r#""é€😀 \n""#,
        ] {
            let expected: String = serde_json::from_str(json).unwrap();
            assert_eq!(decode(json).unwrap(), expected, "{json}");
            assert_eq!(JsonText::one(json).to_text(), expected);
            assert_eq!(JsonText::one(json).char_count(), expected.chars().count() as u64);
        }
        assert!(matches!(JsonText::one(r#""no escapes""#).to_text(), Cow::Borrowed("no escapes")));
        assert_eq!(decode(r#""\ud800x""#).unwrap(), "\u{fffd}x");
        assert_eq!(decode(r#""\udc00""#).unwrap(), "\u{fffd}");
        for bad in ["", "\"", "x", r#""\""#, r#""\u12""#, r#""\uzzzz""#, r#""\q""#] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn parts_join_in_order() {
        let t = JsonText::many(vec![r#""a\n""#, r#""b""#]);
        assert_eq!(t.to_text(), "a\nb");
        assert_eq!(t, "a\nb");
        assert_eq!(JsonText::many(vec![]).to_text(), "");
        assert_eq!(JsonText::default().char_count(), 0);
    }
}
