//! What tests of the Bazel remote cache send: SHA-256 keys, and action results in the Protocol
//! Buffers wire format, written by hand from build/bazel/remote/execution/v2/
//! remote_execution.proto so that the tests do not share larderd's message definitions.

use sha2::{Digest as _, Sha256};

/// The SHA-256 of no bytes: the key of Bazel's empty blob.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The key of `data` in a Bazel CAS: its SHA-256 in lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (string, bytes, message).
pub fn field(tag: u64, payload: &[u8], out: &mut Vec<u8>) {
    varint(tag << 3 | 2, out);
    varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// `Digest { hash = 1, size_bytes = 2 }` of `data`.
pub fn digest(data: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    field(1, sha256_hex(data).as_bytes(), &mut d);
    varint(2 << 3, &mut d);
    varint(data.len() as u64, &mut d);
    d
}

/// `ActionResult { output_files = 2 [OutputFile { path = 1, digest = 2 }], stdout_digest = 6 }`.
pub fn action_result(outputs: &[(&str, &[u8])], stdout: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    for (path, data) in outputs {
        let mut file = Vec::new();
        field(1, path.as_bytes(), &mut file);
        field(2, &digest(data), &mut file);
        field(2, &file, &mut r);
    }
    field(6, &digest(stdout), &mut r);
    r
}
