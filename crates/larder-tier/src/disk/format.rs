//! The on-disk format of one revision file: a small header, then the body.
//!
//! ```text
//! 0   magic "LARDREV1"
//! 8   header_len   u32 LE   (the body starts here)
//! 12  reserved     u32 LE   (0)
//! 16  body_len     u64 LE
//! 24  expires      u64 LE   (unix milliseconds)
//! 32  last_mod     u64 LE   (unix seconds)
//! 40  etag         [u8; 32] (BLAKE3 digest of the body)
//! 72  meta JSON    {"ns": …, "key": …, "headers": [[name, value], …]}
//! ```
//!
//! Everything but `body_len` and `etag` is known before the body arrives, and those two are
//! fixed-width, so the writer reserves the header, streams the body after it, and patches the
//! two fields in place before fsync and rename. The start-up scan reads only the fixed 72 bytes.

use larder_proto::ETag;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const MAGIC: &[u8; 8] = b"LARDREV1";
pub const FIXED_LEN: usize = 72;
/// Headers larger than this are refused, so a header always fits one small read.
pub const MAX_META_LEN: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fixed {
    pub header_len: u32,
    pub body_len: u64,
    pub expires_ms: u64,
    pub last_modified_s: u64,
    pub etag: [u8; 32],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaJson {
    pub ns: String,
    pub key: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    TooShort,
    BadMagic,
    BadLength,
    BadTime,
    BadMeta,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DecodeError::TooShort => "header truncated",
            DecodeError::BadMagic => "not a larder revision file",
            DecodeError::BadLength => "header length out of range",
            DecodeError::BadTime => "header time out of range",
            DecodeError::BadMeta => "header metadata is not valid",
        };
        f.write_str(s)
    }
}

impl Fixed {
    pub fn encode(&self) -> [u8; FIXED_LEN] {
        let mut b = [0u8; FIXED_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.header_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.body_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.expires_ms.to_le_bytes());
        b[32..40].copy_from_slice(&self.last_modified_s.to_le_bytes());
        b[40..72].copy_from_slice(&self.etag);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Fixed, DecodeError> {
        if b.len() < FIXED_LEN {
            return Err(DecodeError::TooShort);
        }
        if &b[0..8] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let header_len = u32::from_le_bytes(b[8..12].try_into().unwrap());
        if (header_len as usize) < FIXED_LEN || header_len as usize > FIXED_LEN + MAX_META_LEN {
            return Err(DecodeError::BadLength);
        }
        let fixed = Fixed {
            header_len,
            body_len: u64_at(16),
            expires_ms: u64_at(24),
            last_modified_s: u64_at(32),
            etag: b[40..72].try_into().unwrap(),
        };
        // The tier never writes such values, but a corrupt or planted file must be refused here
        // rather than overflow `file_len` or panic in `last_modified`/`expires` later (found by
        // the `revision_header` fuzz target).
        if fixed.body_len.checked_add(u64::from(header_len)).is_none() {
            return Err(DecodeError::BadLength);
        }
        let epoch_plus = |d: Duration| UNIX_EPOCH.checked_add(d).is_some();
        if !epoch_plus(Duration::from_secs(fixed.last_modified_s))
            || !epoch_plus(Duration::from_millis(fixed.expires_ms))
        {
            return Err(DecodeError::BadTime);
        }
        Ok(fixed)
    }

    pub fn etag(&self) -> ETag {
        ETag::from_bytes(self.etag)
    }

    pub fn expires(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.expires_ms)
    }

    pub fn last_modified(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.last_modified_s)
    }

    /// The file length a complete revision with this header must have.
    pub fn file_len(&self) -> u64 {
        self.header_len as u64 + self.body_len
    }
}

/// Decodes a whole header (`buf` holds at least `header_len` bytes).
pub fn decode_header(buf: &[u8]) -> Result<(Fixed, MetaJson), DecodeError> {
    let fixed = Fixed::decode(buf)?;
    let end = fixed.header_len as usize;
    if buf.len() < end {
        return Err(DecodeError::TooShort);
    }
    let meta: MetaJson =
        serde_json::from_slice(&buf[FIXED_LEN..end]).map_err(|_| DecodeError::BadMeta)?;
    Ok((fixed, meta))
}

/// Encodes a header whose `body_len` and `etag` are still zero (patched after the body).
pub fn encode_header(
    meta: &MetaJson,
    expires_ms: u64,
    last_modified_s: u64,
) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
    if json.len() > MAX_META_LEN {
        return Err(format!("stored headers exceed {MAX_META_LEN} bytes"));
    }
    let fixed = Fixed {
        header_len: (FIXED_LEN + json.len()) as u32,
        body_len: 0,
        expires_ms,
        last_modified_s,
        etag: [0; 32],
    };
    let mut out = Vec::with_capacity(FIXED_LEN + json.len());
    out.extend_from_slice(&fixed.encode());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Offsets of the two fields patched once the body is complete.
pub const BODY_LEN_OFFSET: u64 = 16;
pub const ETAG_OFFSET: u64 = 40;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrips() {
        let meta = MetaJson {
            ns: "ci".into(),
            key: "a/b".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
        };
        let mut h = encode_header(&meta, 123_456, 789).unwrap();
        h[BODY_LEN_OFFSET as usize..][..8].copy_from_slice(&42u64.to_le_bytes());
        h[ETAG_OFFSET as usize..][..32].copy_from_slice(&[7; 32]);
        let (fixed, decoded) = decode_header(&h).unwrap();
        assert_eq!(decoded, meta);
        assert_eq!(fixed.body_len, 42);
        assert_eq!(fixed.expires_ms, 123_456);
        assert_eq!(fixed.last_modified_s, 789);
        assert_eq!(fixed.etag, [7; 32]);
        assert_eq!(fixed.header_len as usize, h.len());
    }

    #[test]
    fn decoder_rejects_garbage() {
        assert_eq!(Fixed::decode(b"short"), Err(DecodeError::TooShort));
        assert_eq!(Fixed::decode(&[0u8; 80]), Err(DecodeError::BadMagic));
        let mut b = Fixed {
            header_len: 10,
            body_len: 0,
            expires_ms: 0,
            last_modified_s: 0,
            etag: [0; 32],
        }
        .encode();
        assert_eq!(Fixed::decode(&b), Err(DecodeError::BadLength));
        b[8..12].copy_from_slice(&(FIXED_LEN as u32 + 5).to_le_bytes());
        let mut with_bad_json = b.to_vec();
        with_bad_json.extend_from_slice(b"{oops");
        assert_eq!(
            decode_header(&with_bad_json).unwrap_err(),
            DecodeError::BadMeta
        );
    }

    /// Regression (fuzzing): a header whose Last-Modified does not fit a `SystemTime` made
    /// `last_modified()` panic on every GET of the key, and a `body_len` near `u64::MAX` made
    /// `file_len()` overflow. Both are now refused as corrupt by the decoder.
    #[test]
    fn out_of_range_fields_are_refused_not_a_panic() {
        let fixed = |body_len, expires_ms, last_modified_s| {
            Fixed {
                header_len: FIXED_LEN as u32,
                body_len,
                expires_ms,
                last_modified_s,
                etag: [0; 32],
            }
            .encode()
        };
        let max = u64::MAX;
        assert_eq!(Fixed::decode(&fixed(0, 0, max)), Err(DecodeError::BadTime));
        assert_eq!(
            Fixed::decode(&fixed(max, 0, 0)),
            Err(DecodeError::BadLength)
        );
        assert_eq!(
            Fixed::decode(&fixed(max - FIXED_LEN as u64 + 1, 0, 0)),
            Err(DecodeError::BadLength)
        );
        // The largest values that fit still decode, and every accessor works on them.
        let ok = Fixed::decode(&fixed(max - FIXED_LEN as u64, max, i64::MAX as u64 / 2)).unwrap();
        assert_eq!(ok.file_len(), max);
        assert!(ok.last_modified() > UNIX_EPOCH);
        assert!(ok.expires() > UNIX_EPOCH);
    }
}
