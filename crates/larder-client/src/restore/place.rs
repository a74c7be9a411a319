//! The last steps of a restore: flushing the staging directory and renaming it into place
//! (atomically, with `renameat2`), and removing trees that are not writable.

use crate::Error;
use crate::progress::Progress;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Moves the staging directory to `target`; see the module comment for the rename flavours.
pub(crate) fn place(
    staging: &Path,
    target: &Path,
    force: bool,
    progress: &Progress,
) -> Result<(), Error> {
    let rename_err = |e: io::Error| {
        Error::io(
            format!("cannot move the restored tree to {}", target.display()),
            e,
        )
    };
    if force && exists(target) {
        match renameat2(staging, target, libc::RENAME_EXCHANGE) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => {
                // No atomic swap here (an old kernel or an exotic file system): move the old
                // target aside first; a crash in between leaves it under the staging name.
                let aside = staging.with_extension("larder-old");
                std::fs::rename(target, &aside).map_err(rename_err)?;
                if let Err(e) = std::fs::rename(staging, target) {
                    let _ = std::fs::rename(&aside, target);
                    return Err(rename_err(e));
                }
                std::fs::rename(&aside, staging).map_err(rename_err)?;
            }
            Err(e) => return Err(rename_err(e)),
        }
        // The old tree now sits at the staging path.
        if let Err(e) = remove_tree(staging) {
            progress.note(&format!(
                "restored {}, but could not remove the old tree now at {}: {e}",
                target.display(),
                staging.display()
            ));
        }
        return Ok(());
    }
    match renameat2(staging, target, libc::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = remove_tree(staging);
            Err(Error::InvalidInput(format!(
                "{} appeared while the snapshot was being restored; nothing was placed; pass \
                 --force to replace it",
                target.display()
            )))
        }
        Err(e) if unsupported(&e) => {
            if exists(target) {
                let _ = remove_tree(staging);
                return Err(already_exists(target));
            }
            std::fs::rename(staging, target).map_err(rename_err)
        }
        Err(e) => {
            let _ = remove_tree(staging);
            Err(rename_err(e))
        }
    }
}

/// Durable before visible, as for `larder get -o`: otherwise a crash soon after the rename could
/// leave the target with files whose data never reached the disk. One `syncfs` flushes the
/// whole tree (and anything else dirty on that file system) far faster than an fsync per file.
pub(super) fn sync_tree(staging: &Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(staging)
        .map_err(|e| Error::io(format!("cannot open {}", staging.display()), e))?;
    // SAFETY: plain syscall on a file descriptor this function owns.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(Error::io(
            "cannot flush the restored files to disk",
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Deletes a file or tree, first making read-only directories writable (which `remove_dir_all`
/// needs when not running as root). Symlinks are removed, never followed.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    if path.as_os_str().is_empty() {
        return Ok(());
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
        Err(e) => Err(e),
    }
}

fn make_writable(dir: &Path) {
    if let Ok(m) = std::fs::symlink_metadata(dir)
        && m.is_dir()
    {
        let mode = m.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
        }
        if let Ok(children) = std::fs::read_dir(dir) {
            for child in children.flatten() {
                make_writable(&child.path());
            }
        }
    }
}

pub(super) fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

pub(super) fn already_exists(target: &Path) -> Error {
    Error::InvalidInput(format!(
        "{} already exists; pass --force to replace it, or restore somewhere else",
        target.display()
    ))
}
