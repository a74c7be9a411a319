//! Fuzzes the disk tier's revision header codec (`larder-tier/src/disk/format.rs`).
//!
//! A revision file on disk may be truncated, corrupted or planted, and the tier decodes its
//! header on start-up and on every cold open. Arbitrary bytes must give an error or a header —
//! never a panic, and never an allocation sized by a field of the file — and every accessor the
//! tier calls on a decoded header must be total. The same bytes also drive a structured
//! encode → patch → decode round trip.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use format::{
    BODY_LEN_OFFSET, ETAG_OFFSET, FIXED_LEN, Fixed, MAX_META_LEN, MetaJson, decode_header,
    encode_header,
};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, UNIX_EPOCH};

/// The disk tier's own source file (see Cargo.toml for why it is not a crate dependency).
#[allow(dead_code)]
#[path = "../../crates/larder-tier/src/disk/format.rs"]
mod format;

fuzz_target!(|data: &[u8]| {
    if let Ok(fixed) = Fixed::decode(data) {
        check_fixed(&fixed);
        assert_eq!(&fixed.encode()[..8], &data[..8]);
        // Re-encoding keeps every field the decoder read (the reserved word is written as 0).
        assert_eq!(Fixed::decode(&fixed.encode()), Ok(fixed));
    }
    if let Ok((fixed, meta)) = decode_header(data) {
        check_fixed(&fixed);
        assert!(fixed.header_len as usize <= data.len());
        // Whatever was decoded re-encodes within the limit and decodes to the same values.
        let reencoded = encode(&meta, &fixed);
        let (again, meta_again) = decode_header(&reencoded).expect("re-encoded header decodes");
        assert_eq!(meta_again, meta);
        assert_eq!(
            (
                again.body_len,
                again.expires_ms,
                again.last_modified_s,
                again.etag
            ),
            (
                fixed.body_len,
                fixed.expires_ms,
                fixed.last_modified_s,
                fixed.etag
            )
        );
    }

    let mut u = Unstructured::new(data);
    if let Ok(input) = Header::arbitrary(&mut u) {
        let meta = MetaJson {
            ns: input.ns,
            key: input.key,
            headers: input.headers,
        };
        let fixed = Fixed {
            header_len: 0,
            body_len: input.body_len,
            expires_ms: input.expires_ms,
            last_modified_s: input.last_modified_s,
            etag: input.etag,
        };
        match encode_header(&meta, fixed.expires_ms, fixed.last_modified_s) {
            Ok(_) => {
                let bytes = encode(&meta, &fixed);
                // Values the tier never writes (times beyond `SystemTime`, a body length that
                // overflows the file length) must be refused as corrupt, everything else kept.
                let fits = |d: Duration| UNIX_EPOCH.checked_add(d).is_some();
                let in_range = fits(Duration::from_secs(fixed.last_modified_s))
                    && fits(Duration::from_millis(fixed.expires_ms))
                    && fixed.body_len.checked_add(bytes.len() as u64).is_some();
                match decode_header(&bytes) {
                    Ok((decoded, decoded_meta)) => {
                        assert!(in_range, "out-of-range header accepted: {decoded:?}");
                        assert_eq!(decoded_meta, meta);
                        assert_eq!(decoded.header_len as usize, bytes.len());
                        assert_eq!(
                            Fixed {
                                header_len: 0,
                                ..decoded
                            },
                            fixed,
                            "fixed fields survive the round trip"
                        );
                        check_fixed(&decoded);
                    }
                    Err(e) => assert!(!in_range, "valid header refused: {e}"),
                }
            }
            Err(why) => assert!(why.contains("exceed"), "unexpected encode error {why}"),
        }
    }
});

#[derive(Arbitrary, Debug)]
struct Header {
    ns: String,
    key: String,
    headers: Vec<(String, String)>,
    body_len: u64,
    expires_ms: u64,
    last_modified_s: u64,
    etag: [u8; 32],
}

/// Encodes like the disk tier does: the header first, then `body_len` and the ETag patched in.
fn encode(meta: &MetaJson, fixed: &Fixed) -> Vec<u8> {
    let mut h = encode_header(meta, fixed.expires_ms, fixed.last_modified_s)
        .expect("a decoded header re-encodes");
    h[BODY_LEN_OFFSET as usize..][..8].copy_from_slice(&fixed.body_len.to_le_bytes());
    h[ETAG_OFFSET as usize..][..32].copy_from_slice(&fixed.etag);
    h
}

/// The accessors the disk tier calls on any header it decoded.
fn check_fixed(fixed: &Fixed) {
    let len = fixed.header_len as usize;
    assert!((FIXED_LEN..=FIXED_LEN + MAX_META_LEN).contains(&len));
    let _ = fixed.etag();
    let _ = fixed.expires();
    let _ = fixed.last_modified();
    assert!(fixed.file_len() >= fixed.header_len as u64);
}
