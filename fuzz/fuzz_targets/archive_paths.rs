//! Fuzzes the path checks `larder restore` applies to every archive entry: the entry's own path
//! (`relative`) and a symlink's target (`lexically_inside`), which are what keep a hostile
//! snapshot from writing outside the directory being restored.
//!
//! Both are compared with an independent model that works on the raw bytes split at `/` (what
//! the kernel does) instead of `Path::components`, in both directions: everything the check
//! accepts stays inside the tree, and everything that stays inside is accepted.
//! Input: the entry path, a NUL byte, then the link target.

#![no_main]

use archive_path::{lexically_inside, relative};
use libfuzzer_sys::fuzz_target;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// The client's own source file (see Cargo.toml for why it is not a crate dependency).
#[path = "../../crates/larder-client/src/archive_path.rs"]
mod archive_path;

fuzz_target!(|data: &[u8]| {
    let (entry, link) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let entry_path = Path::new(OsStr::from_bytes(entry));
    let model = model_relative(entry);
    match relative(entry_path) {
        Ok(rel) => {
            let want = model.unwrap_or_else(|| panic!("{entry_path:?} accepted as {rel:?}"));
            assert!(rel.is_relative(), "{rel:?}");
            assert!(
                rel.components().all(|c| matches!(c, Component::Normal(_))),
                "{rel:?}"
            );
            let got: Vec<&[u8]> = rel.iter().map(|c| c.as_bytes()).collect();
            assert_eq!(got, want, "{entry_path:?}");
            let root = Path::new("/restore/root");
            let dest = root.join(&rel);
            assert!(dest.starts_with(root), "{dest:?}");

            let link_path = Path::new(OsStr::from_bytes(link));
            let inside = model_link_inside(&want, link);
            assert_eq!(
                lexically_inside(&rel, link_path).is_ok(),
                inside,
                "symlink {rel:?} -> {link_path:?}"
            );
        }
        Err(_) => assert!(model.is_none(), "{entry_path:?} refused, model {model:?}"),
    }
});

/// The entry path as segments, or None when it is absolute or has a `..` segment. Empty and
/// `.` segments name no directory and are dropped.
fn model_relative(raw: &[u8]) -> Option<Vec<&[u8]>> {
    if raw.first() == Some(&b'/') {
        return None;
    }
    let mut out = Vec::new();
    for seg in raw.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => return None,
            s => out.push(s),
        }
    }
    Some(out)
}

/// Whether the link, resolved textually from the directory holding the entry, never climbs
/// above the root.
fn model_link_inside(entry: &[&[u8]], link: &[u8]) -> bool {
    if link.first() == Some(&b'/') {
        return false;
    }
    let mut depth = entry.len().saturating_sub(1);
    for seg in link.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            _ => depth += 1,
        }
    }
    true
}
