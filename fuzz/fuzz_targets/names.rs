//! Fuzzes namespace and key validation: whatever is accepted must be safe to use as a file name
//! component, an S3 key and a log field, and must survive a Display → parse round trip.
//! `Key::from_url_path` is also checked against an independent percent-decoder, so a decoding
//! shortcut (double decoding, a `%` passed through) shows up as a disagreement.

#![no_main]

use larder_proto::{Key, Namespace};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(ns) = Namespace::parse(s) {
        let text = ns.to_string();
        assert_eq!(text, s);
        assert!((1..=64).contains(&text.len()), "{text:?}");
        let b = text.as_bytes();
        assert!(
            b[0].is_ascii_lowercase() || b[0].is_ascii_digit(),
            "{text:?}"
        );
        assert!(
            b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-'),
            "{text:?}"
        );
        assert_eq!(Namespace::parse(&text), Ok(ns));
    }

    if let Ok(key) = Key::parse(s) {
        assert_eq!(key.as_str(), s);
        check_key(&key);
    }

    let decoded = percent_decode(s);
    match Key::from_url_path(s) {
        Ok(key) => {
            check_key(&key);
            assert_eq!(
                Some(key.as_str().as_bytes()),
                decoded.as_deref(),
                "from_url_path({s:?}) disagrees with a plain percent-decoder"
            );
            // Fully escaped, the same key comes back.
            let escaped: String = key.as_str().bytes().map(|b| format!("%{b:02X}")).collect();
            assert_eq!(Key::from_url_path(&escaped), Ok(key));
        }
        Err(_) => {
            // Refused by the URL form: then the decoded bytes are not a valid key either.
            if let Some(bytes) = decoded
                && let Ok(text) = std::str::from_utf8(&bytes)
            {
                assert!(
                    Key::parse(text).is_err(),
                    "{s:?} decodes to the valid key {text:?}"
                );
            }
        }
    }
});

/// What every accepted key must satisfy, checked without reusing the validator's code.
fn check_key(key: &Key) {
    let text = key.as_str();
    assert!(!text.is_empty() && text.len() <= 512, "{text:?}");
    assert!(!text.contains('\0') && !text.contains('\\') && !text.contains('%'));
    assert!(!text.starts_with('/') && !text.ends_with('/'), "{text:?}");
    for segment in text.split('/') {
        assert!(!matches!(segment, "" | "." | ".."), "{text:?}");
    }
    assert!(
        text.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._~-/".contains(&c)),
        "{text:?}"
    );
    // Display is the stored and logged form: it must mean the same key again, also as a URL
    // path, where it is sent unescaped.
    let shown = key.to_string();
    assert_eq!(Key::parse(&shown).as_ref(), Ok(key));
    assert_eq!(Key::from_url_path(&shown).as_ref(), Ok(key));
}

/// RFC 3986 percent-decoding; None when a `%` is not followed by two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}
