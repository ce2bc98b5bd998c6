//! Output files, by one rule for every command that writes: an output is never one of the
//! command's inputs (same path, `./` spelling, symlink or hard link), and it appears complete
//! or not at all — written to a temporary sibling, synced, then renamed into place. A failed
//! run removes its temporary file; an interrupted one too (Ctrl-C runs
//! [`remove_pending`] through `crate::interrupt`).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "refusing to write {what} {out}: it is the input {input_what} {input}; choose another output path"
    )]
    IsInput {
        what: String,
        out: String,
        input_what: String,
        input: String,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One input of a command: what the user calls it (`CHECKPOINT`, `-m`) and its path.
pub type Input<'a> = (&'a str, &'a Path);

/// Refuses `out` (called `what` in the error) when it is, or resolves to, any of `inputs`.
pub fn ensure_not_input(what: &str, out: &Path, inputs: &[Input]) -> Result<(), OutputError> {
    let out_resolved = resolve(out);
    for &(input_what, input) in inputs {
        let same_path = match (&out_resolved, resolve(input)) {
            (Some(a), Some(b)) => *a == b,
            _ => false,
        };
        if same_path || same_inode(out, input) {
            return Err(OutputError::IsInput {
                what: what.into(),
                out: out.display().to_string(),
                input_what: input_what.into(),
                input: input.display().to_string(),
            });
        }
    }
    Ok(())
}

/// The canonical path of `p`; for a file that does not exist yet, its canonical directory
/// joined with its name.
fn resolve(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(dir.canonicalize().ok()?.join(p.file_name()?))
}

#[cfg(unix)]
fn same_inode(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_inode(_: &Path, _: &Path) -> bool {
    false
}

/// Temporary files of writes in progress, removed on Ctrl-C.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes every temporary file of a write in progress (called on interruption).
pub fn remove_pending() {
    for p in pending().drain(..) {
        let _ = std::fs::remove_file(p);
    }
}

/// `DIR/.NAME.ffnskip-PID-N.tmpEXT` beside `dest`, keeping `dest`'s extension (plotters picks
/// the image format from it).
fn temp_path(dest: &Path) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut name = OsString::from(".");
    name.push(dest.file_name().unwrap_or_else(|| "out".as_ref()));
    name.push(format!(".ffnskip-{}-{n}.tmp", std::process::id()));
    if let Some(ext) = dest.extension() {
        name.push(".");
        name.push(ext);
    }
    dest.with_file_name(name)
}

/// A temporary sibling of the destination, registered for removal on Ctrl-C and removed on
/// drop unless [`TempPath::persist`] renamed it into place.
pub struct TempPath {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl TempPath {
    pub fn new(dest: &Path) -> Self {
        let tmp = temp_path(dest);
        pending().push(tmp.clone());
        TempPath {
            tmp,
            dest: dest.to_path_buf(),
            done: false,
        }
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the temporary file onto the destination.
    pub fn persist(mut self) -> Result<(), OutputError> {
        std::fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
        pending().retain(|p| p != &self.tmp);
    }
}

/// A file written through a temporary sibling; [`AtomicFile::commit`] syncs and renames it.
/// Dropped without commit, it leaves nothing behind.
pub struct AtomicFile {
    temp: TempPath,
    file: BufWriter<File>,
}

impl AtomicFile {
    pub fn create(dest: &Path) -> Result<Self, OutputError> {
        let temp = TempPath::new(dest);
        let file = File::create(temp.path()).map_err(io_err(dest))?;
        Ok(AtomicFile {
            temp,
            file: BufWriter::new(file),
        })
    }

    pub fn commit(self) -> Result<(), OutputError> {
        let dest = self.temp.dest.clone();
        let file = self
            .file
            .into_inner()
            .map_err(|e| io_err(&dest)(e.into_error()))?;
        file.sync_all().map_err(io_err(&dest))?;
        drop(file);
        self.temp.persist()
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Writes `bytes` to `dest` atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let mut f = AtomicFile::create(dest)?;
    f.write_all(bytes).map_err(io_err(dest))?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ffnskip-outfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn refuses_the_input_under_every_spelling() {
        let d = dir("same");
        let input = d.join("model.gguf");
        std::fs::write(&input, b"x").unwrap();
        let inputs: [Input; 1] = [("-m", &input)];
        let dotted = d.join(".").join("model.gguf");
        let link = d.join("link.gguf");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let hard = d.join("hard.gguf");
        std::fs::hard_link(&input, &hard).unwrap();
        for out in [&input, &dotted, &link, &hard] {
            let e = ensure_not_input("-o", out, &inputs).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "refusing to write -o {}: it is the input -m {}; choose another output path",
                    out.display(),
                    input.display()
                )
            );
        }
        ensure_not_input("-o", &d.join("new.json"), &inputs).unwrap();
        ensure_not_input("-o", &d.join("model.json"), &inputs).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn writes_whole_files_or_nothing() {
        let d = dir("atomic");
        let dest = d.join("out.json");
        std::fs::write(&dest, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(b"half").unwrap();
            // Dropped without commit: the old file stays and no temporary is left.
        }
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(names(&d), ["out.json"]);
        write_atomic(&dest, b"new").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(names(&d), ["out.json"]);

        let t = TempPath::new(&d.join("plot.png"));
        assert!(t.path().to_string_lossy().ends_with(".png"));
        std::fs::write(t.path(), b"png").unwrap();
        assert_eq!(pending().iter().filter(|p| *p == t.path()).count(), 1);
        remove_pending();
        assert!(!t.path().exists());
        drop(t);
        assert_eq!(names(&d), ["out.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
