//! Output files that appear only when complete.
//!
//! A download is written to a hidden temporary file beside the target and renamed over it only
//! after the bytes are verified and synced, so a failed, interrupted or corrupt download never
//! leaves a partial or wrong file where a build expects a good one. The temporary file lives in
//! the target's directory because a rename is atomic only within one file system. Dropping a
//! `StagedFile` without committing removes it.

use crate::Error;
use std::path::{Path, PathBuf};

pub(crate) struct StagedFile {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
}

/// Keeps the temporary name within file-name limits however long the target's name is.
const MAX_NAME_IN_PREFIX: usize = 100;

impl StagedFile {
    pub(crate) fn create(target: &Path) -> Result<StagedFile, Error> {
        let name = target
            .file_name()
            .ok_or_else(|| {
                Error::InvalidInput(format!("{} does not name a file", target.display()))
            })?
            .to_string_lossy();
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut short = name.as_ref();
        if short.len() > MAX_NAME_IN_PREFIX {
            let mut cut = MAX_NAME_IN_PREFIX;
            while !short.is_char_boundary(cut) {
                cut -= 1;
            }
            short = &short[..cut];
        }
        let prefix = format!(".{short}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".larder-part");
        // tempfile's default 0600 would survive the rename; 0666 lets the umask decide, as for
        // any file a program creates.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let tmp = builder.tempfile_in(dir).map_err(|e| {
            Error::io(
                format!("cannot create a temporary file in {}", dir.display()),
                e,
            )
        })?;
        Ok(StagedFile {
            tmp,
            target: target.to_path_buf(),
        })
    }

    /// A second handle on the temporary file for async writing.
    pub(crate) fn writer(&self) -> Result<tokio::fs::File, Error> {
        let file = self
            .tmp
            .as_file()
            .try_clone()
            .map_err(|e| Error::io(format!("cannot open {}", self.tmp.path().display()), e))?;
        Ok(tokio::fs::File::from_std(file))
    }

    /// Renames the (already synced) temporary file over the target.
    pub(crate) fn commit(self) -> Result<(), Error> {
        let target = self.target;
        self.tmp.persist(&target).map_err(|e| {
            Error::io(
                format!("cannot rename the download to {}", target.display()),
                e.error,
            )
        })?;
        Ok(())
    }
}
