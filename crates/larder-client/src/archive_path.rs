//! The checks `larder restore` applies to each archive entry's path and each symlink's target,
//! judged on the text alone (restore.rs adds the checks that need the file system).
//!
//! They are pure and use only `std`, in a file of their own, so that the fuzz targets in
//! `fuzz/` can compile this very file without linking the rest of the client (see
//! `fuzz/fuzz_targets/archive_paths.rs`).

use std::path::{Component, Path, PathBuf};

/// An archive path made relative and free of `.`; refused when absolute or containing `..`.
pub fn relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("contains `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    Ok(out)
}

/// Whether `link`, read from the directory that holds `rel`, stays inside the tree, judging by
/// its text alone.
pub fn lexically_inside(rel: &Path, link: &Path) -> Result<(), &'static str> {
    let mut depth = rel.parent().map_or(0, |p| p.components().count());
    for c in link.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return Err("which points outside the restored tree");
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("which is an absolute path");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_table() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("a", Ok("a")),
            ("a/b/c", Ok("a/b/c")),
            ("./a/./b//c/", Ok("a/b/c")),
            ("", Ok("")),
            (".", Ok("")),
            ("a..b/..c", Ok("a..b/..c")),
            ("..", Err("contains `..`")),
            ("../a", Err("contains `..`")),
            ("a/../b", Err("contains `..`")),
            ("a/..", Err("contains `..`")),
            ("/a", Err("is an absolute path")),
            ("//a", Err("is an absolute path")),
        ];
        for (input, want) in cases {
            let got = relative(Path::new(input));
            assert_eq!(
                got.as_deref().map_err(|e| *e),
                want.map(Path::new),
                "relative({input:?})"
            );
        }
    }

    #[test]
    fn lexically_inside_table() {
        let outside = Err("which points outside the restored tree");
        let cases: &[(&str, &str, Result<(), &str>)] = &[
            ("l", "x", Ok(())),
            ("l", "./x/y", Ok(())),
            ("l", "", Ok(())),
            ("a/l", "../x", Ok(())),
            ("a/b/l", "../../x", Ok(())),
            ("l", "x/../y", Ok(())),
            ("l", "..", outside),
            ("l", "../x", outside),
            ("a/l", "../../x", outside),
            ("l", "x/../../y", outside),
            ("a/b/l", "../../../x", outside),
            ("l", "/etc/passwd", Err("which is an absolute path")),
        ];
        for (rel, link, want) in cases {
            assert_eq!(
                lexically_inside(Path::new(rel), Path::new(link)),
                *want,
                "{rel:?} -> {link:?}"
            );
        }
    }
}
