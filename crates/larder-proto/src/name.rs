//! Namespace and key validation (the README's "HTTP API by example").
//!
//! Namespaces match `[a-z0-9][a-z0-9_-]{0,63}`. Keys are 1–512 bytes after percent-decoding, of
//! `[A-Za-z0-9._~-]` and `/`; every `/`-separated segment is non-empty and neither `.` nor `..`.
//! Being this strict keeps keys safe to use in file names, S3 keys and log lines everywhere.

use compact_str::CompactString;
use thiserror::Error;

/// Why a namespace or key was refused; the Display text is the one-line reason sent with a 400.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The namespace does not match `[a-z0-9][a-z0-9_-]{0,63}`.
    #[error("invalid namespace: must match [a-z0-9][a-z0-9_-]{{0,63}}")]
    Namespace,
    /// The key is the empty string.
    #[error("invalid key: empty")]
    KeyEmpty,
    /// The key is longer than 512 bytes after percent-decoding.
    #[error("invalid key: longer than 512 bytes")]
    KeyTooLong,
    /// A `%` in the URL path is not followed by two hex digits.
    #[error("invalid key: bad percent-encoding")]
    KeyEncoding,
    /// A byte outside `[A-Za-z0-9._~-]` and `/` (including any non-ASCII byte).
    #[error("invalid key: only A-Z a-z 0-9 . _ ~ - and / are allowed")]
    KeyCharacter,
    /// A `/`-separated segment is empty, `.` or `..`.
    #[error("invalid key: empty, '.' or '..' path segment")]
    KeySegment,
}

/// A validated namespace: matches `[a-z0-9][a-z0-9_-]{0,63}`, so it is safe as a directory name,
/// an S3 key prefix and a URL path segment without escaping.
///
/// Held inline up to 24 bytes (most namespaces): every request parses one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(CompactString);

impl Namespace {
    /// Validates `s`; the error's `Display` is the reason to send with a 400.
    pub fn parse(s: &str) -> Result<Namespace, NameError> {
        let b = s.as_bytes();
        let first_ok = matches!(b.first(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = b
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
        if first_ok && rest_ok && b.len() <= 64 {
            Ok(Namespace(CompactString::new(s)))
        } else {
            Err(NameError::Namespace)
        }
    }

    /// The namespace as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Namespace {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Namespace, NameError> {
        Namespace::parse(s)
    }
}

/// A validated, percent-decoded key: 1–512 bytes of `[A-Za-z0-9._~-]` and `/`, with no empty,
/// `.` or `..` segment, so it is safe in file names, S3 keys and log lines without escaping.
///
/// Held inline up to 24 bytes, like [`Namespace`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(CompactString);

impl Key {
    /// Validates an already-decoded key.
    pub fn parse(s: &str) -> Result<Key, NameError> {
        validate_key(s.as_bytes())?;
        Ok(Key(CompactString::new(s)))
    }

    /// Percent-decodes a key taken from a URL path, then validates it.
    pub fn from_url_path(raw: &str) -> Result<Key, NameError> {
        // percent-encoding's decoder passes a malformed escape through as a literal `%`; a key
        // cannot contain `%` anyway, but the client deserves the more precise reason.
        let b = raw.as_bytes();
        if !b.contains(&b'%') {
            // Nothing to decode (the usual case): validated as it is.
            validate_key(b)?;
            return Ok(Key(CompactString::new(raw)));
        }
        for (i, &c) in b.iter().enumerate() {
            if c == b'%'
                && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return Err(NameError::KeyEncoding);
            }
        }
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
        // Validating the bytes before converting to a string means a decoded non-UTF-8 sequence
        // is reported as a bad character, like any other byte outside the alphabet.
        validate_key(&decoded)?;
        let key = CompactString::from_utf8(decoded).map_err(|_| NameError::KeyCharacter)?;
        Ok(Key(key))
    }

    /// The decoded key, as stored (never percent-encoded).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Key {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Key, NameError> {
        Key::parse(s)
    }
}

/// Longest key, in bytes after percent-decoding.
const MAX_KEY_LEN: usize = 512;

fn is_key_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'~' | b'-' | b'/')
}

/// Checks are ordered from the coarsest reason to the finest, so each refused key gets one
/// stable, most useful message.
fn validate_key(b: &[u8]) -> Result<(), NameError> {
    if b.is_empty() {
        return Err(NameError::KeyEmpty);
    }
    if b.len() > MAX_KEY_LEN {
        return Err(NameError::KeyTooLong);
    }
    if !b.iter().copied().all(is_key_byte) {
        return Err(NameError::KeyCharacter);
    }
    let bad_segment = b
        .split(|&c| c == b'/')
        .any(|seg| seg.is_empty() || seg == b"." || seg == b"..");
    if bad_segment {
        return Err(NameError::KeySegment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use NameError::{KeyCharacter, KeyEmpty, KeyEncoding, KeySegment, KeyTooLong};

    #[test]
    fn namespace_table() {
        let n64 = format!("a{}", "b".repeat(63));
        let n65 = format!("a{}", "b".repeat(64));
        let cases: &[(&str, bool)] = &[
            ("a", true),
            ("0", true),
            ("default", true),
            ("ci-cache_2", true),
            ("9lives", true),
            ("a-", true),
            ("a_", true),
            (&n64, true),
            (&n65, false),
            ("", false),
            ("-a", false),
            ("_a", false),
            ("Default", false),
            ("defAult", false),
            ("a.b", false),
            ("a/b", false),
            ("a b", false),
            (" a", false),
            ("a~", false),
            ("a%20", false),
            ("caf\u{e9}", false),
            ("a\0", false),
        ];
        for (input, ok) in cases {
            let got = Namespace::parse(input);
            if *ok {
                assert_eq!(got.as_ref().map(Namespace::as_str), Ok(*input), "{input:?}");
                assert_eq!(got.unwrap().to_string(), *input);
            } else {
                assert_eq!(got, Err(NameError::Namespace), "{input:?}");
            }
            assert_eq!(input.parse::<Namespace>().is_ok(), *ok, "FromStr {input:?}");
        }
    }

    #[test]
    fn key_parse_table() {
        let k512 = "k".repeat(512);
        let k513 = "k".repeat(513);
        let k512_segments = format!("{}/{}", "a".repeat(255), "b".repeat(256));
        let cases: &[(&str, Result<(), NameError>)] = &[
            ("a", Ok(())),
            ("A", Ok(())),
            ("0", Ok(())),
            ("file.tar.zst", Ok(())),
            ("a/b/c", Ok(())),
            ("AZaz09._~-", Ok(())),
            ("~", Ok(())),
            ("-", Ok(())),
            ("_", Ok(())),
            // Dots are fine unless a segment is exactly `.` or `..`.
            ("...", Ok(())),
            (".hidden", Ok(())),
            ("a/.b/..c/c..", Ok(())),
            (&k512, Ok(())),
            (&k512_segments, Ok(())),
            ("", Err(KeyEmpty)),
            (&k513, Err(KeyTooLong)),
            ("/", Err(KeySegment)),
            ("/a", Err(KeySegment)),
            ("a/", Err(KeySegment)),
            ("a//b", Err(KeySegment)),
            (".", Err(KeySegment)),
            ("..", Err(KeySegment)),
            ("a/./b", Err(KeySegment)),
            ("a/../b", Err(KeySegment)),
            ("../a", Err(KeySegment)),
            ("a/..", Err(KeySegment)),
            ("a b", Err(KeyCharacter)),
            ("a%20b", Err(KeyCharacter)),
            ("a+b", Err(KeyCharacter)),
            ("a\0b", Err(KeyCharacter)),
            ("a\\b", Err(KeyCharacter)),
            ("a:b", Err(KeyCharacter)),
            ("a?b", Err(KeyCharacter)),
            ("a#b", Err(KeyCharacter)),
            ("a\nb", Err(KeyCharacter)),
            ("caf\u{e9}", Err(KeyCharacter)),
        ];
        for (input, want) in cases {
            let got = Key::parse(input);
            match want {
                Ok(()) => {
                    let key = got.unwrap_or_else(|e| panic!("{input:?}: {e}"));
                    assert_eq!(key.as_str(), *input);
                    assert_eq!(key.to_string(), *input);
                }
                Err(e) => assert_eq!(got, Err(e.clone()), "Key::parse({input:?})"),
            }
            assert_eq!(
                input.parse::<Key>().is_ok(),
                want.is_ok(),
                "FromStr {input:?}"
            );
        }
    }

    #[test]
    fn key_from_url_path_table() {
        let k512 = "k".repeat(512);
        let k513 = "k".repeat(513);
        // 170 escapes (510 raw bytes) decode to 170 bytes: the limit is on the decoded key.
        let escaped_short = format!("{}kk", "%6B".repeat(170));
        let escaped_512 = "%6B".repeat(512);
        let escaped_513 = "%6B".repeat(513);
        let k172 = "k".repeat(172);
        let cases: &[(&str, Result<&str, NameError>)] = &[
            ("a", Ok("a")),
            ("a/b", Ok("a/b")),
            ("a%2Fb", Ok("a/b")),
            ("a%2fb", Ok("a/b")),
            ("%41%62c", Ok("Abc")),
            ("%7e%7E", Ok("~~")),
            ("a%2Eb", Ok("a.b")),
            (&k512, Ok(&k512)),
            (&escaped_512, Ok(&k512)),
            (&escaped_short, Ok(&k172)),
            (&k513, Err(KeyTooLong)),
            (&escaped_513, Err(KeyTooLong)),
            ("", Err(KeyEmpty)),
            ("%", Err(KeyEncoding)),
            ("a%", Err(KeyEncoding)),
            ("a%2", Err(KeyEncoding)),
            ("a%zz", Err(KeyEncoding)),
            ("a%g1", Err(KeyEncoding)),
            ("a%%41", Err(KeyEncoding)),
            ("%2e%2e", Err(KeySegment)),
            ("%2E", Err(KeySegment)),
            ("a/%2e%2e/b", Err(KeySegment)),
            ("a%2F%2Fb", Err(KeySegment)),
            ("%2Fa", Err(KeySegment)),
            ("a%2F", Err(KeySegment)),
            ("%00", Err(KeyCharacter)),
            ("a%00b", Err(KeyCharacter)),
            ("a%20b", Err(KeyCharacter)),
            ("a%25b", Err(KeyCharacter)),
            ("a%3Fb", Err(KeyCharacter)),
            ("a%ff", Err(KeyCharacter)),
            ("a%C3%A9", Err(KeyCharacter)),
            ("a%C3", Err(KeyCharacter)),
            ("a b", Err(KeyCharacter)),
            ("a+b", Err(KeyCharacter)),
        ];
        for (input, want) in cases {
            let got = Key::from_url_path(input);
            match want {
                Ok(decoded) => assert_eq!(
                    got.as_ref().map(Key::as_str),
                    Ok(*decoded),
                    "from_url_path({input:?})"
                ),
                Err(e) => assert_eq!(got, Err(e.clone()), "from_url_path({input:?})"),
            }
        }
    }

    #[test]
    fn error_messages_are_one_line() {
        for e in [
            NameError::Namespace,
            KeyEmpty,
            KeyTooLong,
            KeyEncoding,
            KeyCharacter,
            KeySegment,
        ] {
            let msg = e.to_string();
            assert!(msg.starts_with("invalid "), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        assert_eq!(
            NameError::Namespace.to_string(),
            "invalid namespace: must match [a-z0-9][a-z0-9_-]{0,63}"
        );
    }
}
