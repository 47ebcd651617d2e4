//! One process per data directory: the daemon holds an exclusive lock on
//! `<data_dir>/lock` while it runs, so two processes never use one key (and
//! one peer id) or write one store at once.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The held lock; released when dropped (or when the process ends, however
/// it ends: the kernel drops the lock with the last descriptor).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock of `dir` (created if missing), or says which process
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                // The holder's pid, for the message another process shows.
                file.set_len(0)?;
                file.rewind()?;
                writeln!(file, "{}", std::process::id())?;
                file.sync_data()?;
                Ok(Self { _file: file, path })
            }
            Err(TryLockError::WouldBlock) => {
                // A pid is a few digits; read no more than that.
                let mut pid = String::new();
                let _ = (&file).take(32).read_to_string(&mut pid);
                let pid = pid.trim();
                bail!(
                    "the data directory {} is in use by another tern process{}; stop it, or give this one another --data-dir",
                    dir.display(),
                    if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    }
                )
            }
            Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("tern-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = DirLock::acquire(&dir).unwrap();
        assert!(first.path().ends_with("lock"));
        let err = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(err.contains("in use by another tern process"), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        let again = DirLock::acquire(&dir).expect("free once the first is dropped");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
