//! One fetch of a model at a time, across threads and processes: an exclusive lock
//! (`File::lock`, released by the OS when its holder dies) on a lock file that the holder
//! removes when done. A waiter that wakes up holding a file that was removed meanwhile
//! starts over on the current one, so removing it never lets two fetches run at once.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub(super) struct CacheLock {
    path: PathBuf,
    // Closed (and so unlocked) after `drop` removed the file.
    _file: File,
}

impl CacheLock {
    /// Blocks until this process holds the lock at `path`; `what` names the model in the
    /// note printed while waiting.
    pub(super) fn acquire(path: &Path, what: &str) -> Result<Self> {
        let mut told = false;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)
                .with_context(|| format!("cannot open the lock file {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    if !told {
                        eprintln!("ffnskip: waiting for another ffnskip that is fetching {what} …");
                        told = true;
                    }
                    file.lock()
                        .with_context(|| format!("cannot lock {}", path.display()))?;
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()))
                }
            }
            if is_current(&file, path) {
                return Ok(CacheLock {
                    path: path.to_path_buf(),
                    _file: file,
                });
            }
        }
    }
}

/// Whether `file` is still the file at `path` (its holder may have removed it while we
/// waited).
#[cfg(unix)]
fn is_current(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn is_current(_: &File, _: &Path) -> bool {
    true
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        // Removed while still locked; waiters notice and retry (see `is_current`). Without
        // inode numbers to compare, the file stays.
        if cfg!(unix) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn holders_never_overlap_and_the_file_goes() {
        let dir = std::env::temp_dir().join(format!("ffnskip-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(".m.lock");
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (path, inside) = (path.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let _l = CacheLock::acquire(&path, "m").expect("lock");
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
