//! The system git as the client runs it: in one directory, with the caller's
//! repository-selecting environment removed, its failures reported with git's own last line.

use crate::Error;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The system git, run in one directory with the caller's repository-selecting environment
/// removed (a CI job's `GIT_DIR` must not redirect the commands to another repository).
pub(super) struct Git {
    bin: PathBuf,
    dir: PathBuf,
}

pub(super) struct Output {
    pub(super) status: std::process::ExitStatus,
    pub(super) stdout: Vec<u8>,
}

impl Git {
    pub(super) fn new(bin: &Path, dir: &Path) -> Git {
        Git {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
        }
    }

    fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in larder_git::command::REPOSITORY_ENV {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Runs a command whose exit status is an answer, not an error.
    pub(super) fn output<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output, Error> {
        let out = self
            .command(args)
            .output()
            .map_err(|e| Error::io(format!("cannot run {}", self.bin.display()), e))?;
        Ok(Output {
            status: out.status,
            stdout: out.stdout,
        })
    }

    /// Runs a command that must succeed; its error names the command and git's message.
    pub(super) fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Vec<u8>, Error> {
        let out = self
            .command(args)
            .output()
            .map_err(|e| Error::io(format!("cannot run {}", self.bin.display()), e))?;
        if !out.status.success() {
            let words: Vec<String> = args
                .iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let message = stderr
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .unwrap_or("no message");
            return Err(Error::Git(format!(
                "`git {}` failed ({}): {}",
                words.join(" "),
                out.status,
                larder_git::command::scrub(message)
            )));
        }
        Ok(out.stdout)
    }

    pub(super) fn rev_parse(&self, rev: &str) -> Result<Option<String>, Error> {
        let out = self.output(&["rev-parse", "--verify", "--quiet", "--end-of-options", rev])?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }

    pub(super) fn has_commit(&self, commit: &str) -> Result<bool, Error> {
        Ok(self.rev_parse(&format!("{commit}^{{commit}}"))?.is_some())
    }
}
