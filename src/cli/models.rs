//! Models by name: `ffnskip models` (the catalogue and what is cached), `ffnskip pull NAME…`
//! (fetch ahead of time), and `-m PATH|NAME` resolution for every command.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::fetch::{self, CacheState, Entry};

#[derive(Args, Debug)]
pub struct ModelsArgs {}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Catalogue names (`ffnskip models` lists them).
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// `smollm2-135m, qwen2.5-coder-0.5b, …`
fn name_list() -> String {
    fetch::names().join(", ")
}

/// The model `-m` (or another argument, `what`) names: an existing path wins, else a
/// catalogue name is fetched (once; later it is found in the cache).
pub fn resolve(what: &str, arg: &Path) -> anyhow::Result<PathBuf> {
    match std::fs::metadata(arg) {
        Ok(m) if m.is_dir() => {
            anyhow::bail!("{what} {}: is a directory, expected a file", arg.display())
        }
        Ok(_) => Ok(arg.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(entry) = arg.to_str().and_then(fetch::find) {
                return fetch::ensure(entry);
            }
            if looks_like_a_path(arg) {
                anyhow::bail!("{what} {}: no such file", arg.display())
            }
            anyhow::bail!(
                "{what} {}: neither a file nor a catalogue name (the catalogue: {}; see `ffnskip models`)",
                arg.display(),
                name_list()
            )
        }
        Err(e) => anyhow::bail!("{what} {}: {e}", arg.display()),
    }
}

/// A directory part or a `.gguf` ending: meant as a file, not as a name.
fn looks_like_a_path(arg: &Path) -> bool {
    let s = arg.to_string_lossy();
    s.contains('/') || s.contains(std::path::MAIN_SEPARATOR) || s.to_lowercase().ends_with(".gguf")
}

/// The catalogue entry `name`, or an error listing the names.
fn entry(name: &str) -> anyhow::Result<&'static Entry> {
    fetch::find(name).ok_or_else(|| {
        anyhow::anyhow!(
            "{name}: not a catalogue name (the catalogue: {}; see `ffnskip models`)",
            name_list()
        )
    })
}

pub fn run_models(_: ModelsArgs) -> anyhow::Result<()> {
    let home = fetch::home()?;
    let header = ["NAME", "FAMILY", "PARAMS", "QUANT", "SIZE", "CACHED"];
    let mut rows: Vec<[String; 6]> = Vec::new();
    for e in fetch::CATALOGUE {
        let name = if e.name == fetch::catalogue::DEFAULT {
            format!("{} (default)", e.name)
        } else {
            e.name.to_string()
        };
        let cached = match fetch::state_in(&home, e) {
            CacheState::Cached(p) => format!("yes: {}", p.display()),
            CacheState::Partial { stored, of } => {
                format!(
                    "no ({stored} of {of} parts downloaded; `ffnskip pull {}` resumes)",
                    e.name
                )
            }
            CacheState::Missing => "no".into(),
        };
        rows.push([
            name,
            e.family.to_string(),
            e.params.to_string(),
            e.quant.to_string(),
            crate::fetch::size_text(e.bytes),
            cached,
        ]);
    }
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s
    };
    let mut text = line(&header) + "\n";
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        text += &line(&cells);
        text.push('\n');
    }
    text += &format!(
        "\n-m NAME fetches a model on first use, `ffnskip pull NAME` ahead of time \
         (python3 -m pip), into {} ($FFNSKIP_HOME).\n",
        home.join("models").display()
    );
    super::out(&text)
}

pub fn run_pull(a: PullArgs) -> anyhow::Result<()> {
    // Every name is checked before anything is fetched.
    let entries = a
        .names
        .iter()
        .map(|n| entry(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let home = fetch::home()?;
    for e in entries {
        let path = match fetch::state_in(&home, e) {
            CacheState::Cached(p) => {
                super::outln(&format!(
                    "{}: cached at {} ({} bytes)",
                    e.name,
                    p.display(),
                    e.bytes
                ))?;
                continue;
            }
            _ => fetch::ensure_in(&home, e)?,
        };
        super::outln(&format!(
            "{}: fetched, sha256 verified, cached at {}",
            e.name,
            path.display()
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_are_told_apart() {
        for p in ["model.gguf", "./x", "dir/model", "M.GGUF"] {
            assert!(looks_like_a_path(Path::new(p)), "{p}");
        }
        for n in ["qwen2.5-coder-0.5b", "smollm2", "llama3"] {
            assert!(!looks_like_a_path(Path::new(n)), "{n}");
        }
        let e = resolve("-m/--model", Path::new("no-such-model-name")).expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "-m/--model no-such-model-name: neither a file nor a catalogue name (the catalogue: \
             smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b; see `ffnskip models`)"
        );
        let e = resolve("-m/--model", Path::new("/nonexistent/m.gguf")).expect_err("missing");
        assert_eq!(
            e.to_string(),
            "-m/--model /nonexistent/m.gguf: no such file"
        );
    }
}
