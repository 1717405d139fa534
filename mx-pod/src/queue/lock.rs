//! One writer per queue directory: an exclusive `flock` on `DIR/lock`, taken before anything in
//! the directory is read, created or deleted, and held until the process exits.
//!
//! Two servers on one queue would each append to and delete the other's segments: a message
//! acknowledged by one could be deleted by the other's recovery (Postfix guards its queue the
//! same way with `master.lock`). The lock file also holds the owner's PID, so the refusal can say
//! who has it. `flock` locks belong to the open file, so the kernel drops the lock when the
//! holder dies, even by `kill -9`: a stale lock file never blocks a restart.

use std::{
    fs::{self, File, OpenOptions, TryLockError},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// The name of the lock file inside the queue directory.
pub const LOCK_FILE: &str = "lock";

/// Why a queue directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "queue directory {dir} is in use by another mx-pod ({holder} holds {lock}); one queue directory takes one server"
    )]
    Busy {
        dir: PathBuf,
        lock: PathBuf,
        /// "PID 1234", or why the PID is unknown.
        holder: String,
    },
    #[error("cannot lock queue directory {dir}: {error}")]
    Io { dir: PathBuf, error: String },
}

/// Makes an existing queue directory private (0700): queued mail is personal data. A directory
/// this process may not change is left as it is, with a warning.
fn private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::metadata(dir) else { return };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0
        && let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7700))
    {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), error = %e,
            "queue directory is readable by others and its mode cannot be changed");
    }
}

/// The held lock of a queue directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock of `dir` (created with mode 0700 when missing) without waiting. On
    /// success the lock file holds this process' PID; on failure nothing in `dir` is changed.
    pub fn exclusive(dir: &Path) -> Result<DirLock, LockError> {
        let io = |e: std::io::Error| LockError::Io {
            dir: dir.to_owned(),
            error: e.to_string(),
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        private(dir);
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = match file.read_to_string(&mut text) {
                    Ok(_) => match text.trim().parse::<u32>() {
                        Ok(pid) => format!("PID {pid}"),
                        Err(_) => "a process that has not written its PID yet".into(),
                    },
                    Err(e) => format!("a process whose PID cannot be read: {e}"),
                };
                return Err(LockError::Busy {
                    dir: dir.to_owned(),
                    lock: path,
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // ours now: record who holds it (the file may still hold a dead owner's PID)
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DirLock { _file: file, path })
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
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("queue");
        let first = DirLock::exclusive(&q).unwrap();
        let pid = std::process::id();
        assert_eq!(
            fs::read_to_string(first.path()).unwrap().trim(),
            pid.to_string()
        );
        let err = DirLock::exclusive(&q).unwrap_err().to_string();
        assert!(err.contains(&format!("PID {pid}")), "{err}");
        assert!(err.contains(&q.display().to_string()), "{err}");
        // the refused attempt changed nothing: the holder's PID is still there
        assert_eq!(
            fs::read_to_string(first.path()).unwrap().trim(),
            pid.to_string()
        );
        drop(first);
        DirLock::exclusive(&q).expect("free again once dropped");
    }

    #[test]
    fn unwritable_dir_is_a_clear_error() {
        let err = DirLock::exclusive(Path::new("/proc/mx-pod-cannot-write-here"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/proc/mx-pod-cannot-write-here"), "{err}");
    }

    #[test]
    fn a_new_queue_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("a/queue");
        let _l = DirLock::exclusive(&q).unwrap();
        let mode = fs::metadata(&q).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mode = fs::metadata(q.join(LOCK_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        drop(_l);
        // an existing directory open to others is made private
        fs::set_permissions(&q, fs::Permissions::from_mode(0o755)).unwrap();
        let _l = DirLock::exclusive(&q).unwrap();
        let mode = fs::metadata(&q).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
