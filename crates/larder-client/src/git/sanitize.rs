//! What makes a restored snapshot's `.git` safe (see the module comment of `git`): what may stay,
//! the configuration the client writes itself, and the file-system steps that never follow a
//! symlink.

use crate::Error;
use crate::restore::remove_tree;
use larder_git::CommitId;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// What `.git` may hold after a restore; everything else is removed.
const GIT_DIR_KEEP: &[&str] = &[
    "HEAD",
    "description",
    "info",
    "logs",
    "objects",
    "packed-refs",
    "refs",
    "reftable",
    "FETCH_HEAD",
    "ORIG_HEAD",
];

/// Enforces the module comment's rules on `.git`: a real directory, no symlinks anywhere in it,
/// only [`GIT_DIR_KEEP`] at its top, no alternates, no index, only `info/exclude` in `info/`.
pub(super) fn sanitize_git_dir(dot_git: &Path) -> Result<(), Error> {
    let refuse = |why: String| Error::UnsafeArchive(format!("{why}; nothing was restored"));
    match std::fs::symlink_metadata(dot_git) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(refuse("the snapshot's .git is not a directory".into())),
        Err(_) => return Err(refuse("the snapshot has no .git directory".into())),
    }
    let entries = list_dir(dot_git)?;
    for name in entries {
        if !GIT_DIR_KEEP.iter().any(|k| OsStr::new(k) == name) {
            remove(&dot_git.join(&name))?;
        }
    }
    if let Some(link) = find_symlink(dot_git)? {
        return Err(refuse(format!(
            "the snapshot's .git holds the symlink {}",
            link.strip_prefix(dot_git).unwrap_or(&link).display()
        )));
    }
    for extra in ["objects/info/alternates", "objects/info/http-alternates"] {
        remove(&dot_git.join(extra))?;
    }
    let info = dot_git.join("info");
    if info.is_dir() {
        for name in list_dir(&info)? {
            if name != "exclude" {
                remove(&info.join(name))?;
            }
        }
    }
    Ok(())
}

/// `.git/config` as `git clone <url>` writes it, with the object and ref formats the snapshot
/// uses (taken from the commit id's length and the presence of `reftable/`, not from the
/// snapshot's own configuration).
pub(super) fn write_git_config(
    dot_git: &Path,
    url: &str,
    branch: &str,
    commit: &CommitId,
) -> Result<(), Error> {
    let sha256 = commit.as_str().len() == 64;
    let reftable = dot_git.join("reftable").is_dir();
    let mut config = format!(
        "[core]\n\trepositoryformatversion = {}\n\tfilemode = true\n\tbare = false\n\
         \tlogallrefupdates = true\n",
        if sha256 || reftable { 1 } else { 0 }
    );
    if sha256 || reftable {
        config.push_str("[extensions]\n");
        if sha256 {
            config.push_str("\tobjectformat = sha256\n");
        }
        if reftable {
            config.push_str("\trefstorage = reftable\n");
        }
    }
    config.push_str(&format!(
        "[remote \"origin\"]\n\turl = {}\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n\
         [branch {}]\n\tremote = origin\n\tmerge = {}\n",
        config_value(url),
        config_value(branch),
        config_value(&format!("refs/heads/{branch}")),
    ));
    write_file(&dot_git.join("config"), &config)
}

/// A git config value (or subsection name) in double quotes, so that `#`, `;` and spaces are
/// literal.
fn config_value(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

fn list_dir(dir: &Path) -> Result<Vec<std::ffi::OsString>, Error> {
    std::fs::read_dir(dir)
        .and_then(|it| it.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))
}

fn remove(path: &Path) -> Result<(), Error> {
    match remove_tree(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", path.display()), e)),
    }
}

fn find_symlink(dir: &Path) -> Result<Option<PathBuf>, Error> {
    for name in list_dir(dir)? {
        let path = dir.join(name);
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("cannot inspect {}", path.display()), e))?;
        if meta.file_type().is_symlink() {
            return Ok(Some(path));
        }
        if meta.is_dir()
            && let Some(found) = find_symlink(&path)?
        {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

pub(super) fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    // A file of that name from the snapshot is replaced, never written through.
    remove(path)?;
    std::fs::write(path, text).map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}
