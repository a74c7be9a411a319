//! Download outputs: files that appear only when complete, and in-order streams.
//!
//! A download is written to a hidden temporary file beside the target and renamed over it only
//! after the bytes are verified and synced, so a failed, interrupted or corrupt download never
//! leaves a partial or wrong file where a build expects a good one. The temporary file lives in
//! the target's directory because a rename is atomic only within one file system. Dropping a
//! `StagedFile` without committing removes it.
//!
//! A stream (stdout) cannot take bytes back, so [`WriterSink`] refuses to restart once it has
//! written anything, and its failure messages say to discard the output.

use crate::{Error, ObjectInfo};
use bytes::Bytes;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where downloaded bytes go. The engine calls `begin` after every discovery (again after a
/// restart, when whatever the earlier attempt delivered must be discarded), hands over the bytes
/// in order through `ordered` on the verifier thread, and calls `finish` only once the whole
/// object arrived and matched its ETag. Dropping a sink that was not finished must leave nothing
/// behind.
pub trait Sink: Send + 'static {
    /// Prepares the destination for the object `info` describes. Called again after a restart, when
    /// it must discard what the earlier attempt delivered, or fail if it cannot take it back.
    fn begin(&mut self, info: &ObjectInfo) -> Result<(), Error>;

    /// A file to receive every chunk by positioned write as soon as it arrives, in any order.
    fn positioned(&self) -> Option<Arc<File>> {
        None
    }

    /// The next bytes of the object, in order, already hashed.
    fn ordered(&mut self, _data: &Bytes) -> Result<(), Error> {
        Ok(())
    }

    /// Called once the whole object arrived and matched its ETag: completes the destination (a
    /// staged file is put in place, a stream is flushed).
    fn finish(&mut self) -> Result<(), Error>;

    /// What a failure means for the destination, e.g. "out.bin was not written".
    fn failure_consequence(&self) -> String;

    /// The progress bar's label.
    fn phase(&self) -> &'static str {
        "downloading"
    }
}

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

    /// The temporary file, for positioned writes from several threads.
    pub(crate) fn file(&self) -> &File {
        self.tmp.as_file()
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

/// A download into a staged file beside `target`, renamed over it after verification.
pub struct FileSink {
    target: PathBuf,
    staged: Option<StagedFile>,
    file: Option<Arc<File>>,
    /// `fsync` before the rename (see `DownloadOptions::sync`).
    sync: bool,
}

impl FileSink {
    /// Nothing is created until the object is known to exist.
    pub fn new(target: &Path, sync: bool) -> FileSink {
        FileSink {
            target: target.to_path_buf(),
            staged: None,
            file: None,
            sync,
        }
    }
}

impl Sink for FileSink {
    fn begin(&mut self, info: &ObjectInfo) -> Result<(), Error> {
        if self.staged.is_none() {
            let staged = StagedFile::create(&self.target)?;
            let file = staged
                .file()
                .try_clone()
                .map_err(|e| Error::io("cannot reopen the temporary file", e))?;
            self.file = Some(Arc::new(file));
            self.staged = Some(staged);
        }
        let file = self.file.as_ref().expect("created above");
        // Truncating first drops whatever an earlier attempt wrote; sizing up front lets
        // positioned writes land anywhere and a full disk show up as early as possible.
        file.set_len(0)
            .and_then(|()| file.set_len(info.size))
            .map_err(|e| {
                Error::io(
                    format!("cannot size the download of {}", self.target.display()),
                    e,
                )
            })
    }

    fn positioned(&self) -> Option<Arc<File>> {
        self.file.clone()
    }

    fn finish(&mut self) -> Result<(), Error> {
        let dest = self.target.display().to_string();
        let file = self.file.take().expect("begun");
        // Durable before visible: after a crash the target is either the old file or this one.
        if self.sync {
            file.sync_all()
                .map_err(|e| Error::io(format!("cannot sync the download of {dest}"), e))?;
        }
        self.staged.take().expect("begun").commit()
    }

    fn failure_consequence(&self) -> String {
        format!("{} was not written", self.target.display())
    }
}

/// A download written in order to a stream such as stdout.
pub struct WriterSink<W> {
    out: W,
    label: String,
    written: u64,
}

impl<W: Write> WriterSink<W> {
    /// Writes to `out`; `label` names it in messages (for example `"stdout"`). A restart after
    /// bytes were written fails, since they cannot be taken back.
    pub fn new(out: W, label: String) -> WriterSink<W> {
        WriterSink {
            out,
            label,
            written: 0,
        }
    }
}

impl<W: Write + Send + 'static> Sink for WriterSink<W> {
    fn begin(&mut self, _info: &ObjectInfo) -> Result<(), Error> {
        if self.written > 0 {
            return Err(Error::Protocol(format!(
                "the object changed after {} bytes of it had been written to {}, which cannot be \
                 taken back; use -o FILE to have the download restart instead",
                self.written, self.label
            )));
        }
        Ok(())
    }

    fn ordered(&mut self, data: &Bytes) -> Result<(), Error> {
        self.out
            .write_all(data)
            .map_err(|e| Error::io(format!("writing to {}", self.label), e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Error> {
        self.out
            .flush()
            .map_err(|e| Error::io(format!("writing to {}", self.label), e))
    }

    fn failure_consequence(&self) -> String {
        if self.written == 0 {
            format!("nothing was written to {}", self.label)
        } else {
            format!("discard what was written to {}", self.label)
        }
    }
}
