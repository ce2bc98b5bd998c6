//! A real client: `tests/openai_client.py` drives `ffnskip serve` with the official `openai`
//! Python package (streaming and not, chat and completions, `extra_body` with the `ffnskip`
//! field, `stop`, and the errors it raises as typed exceptions). The package is installed into
//! `target/openai-venv` on first use (`python3 -m venv`, then pip), as `.ci/run` and
//! `scripts/load.sh` do.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The venv's python with `openai` importable, created when missing.
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/openai-venv");
    let py = venv.join("bin/python");
    let has_openai = |py: &Path| {
        Command::new(py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_openai(&py) {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "python3 -m venv {} failed (Debian: apt-get install python3-venv)",
            venv.display()
        );
        let ok = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install openai into {} failed", venv.display());
    }
    assert!(has_openai(&py));
    py
}

#[test]
fn the_official_openai_client_works_against_the_server() {
    let py = python();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ffnskip"))
        .args([
            "serve",
            "--port",
            "0",
            "-t",
            "2",
            "-c",
            "1024",
            "--parallel",
            "2",
        ])
        .args(["--api-key", "test-key", "-m"])
        .arg(common::default_model())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ffnskip serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .map(str::to_string);
    let result = base.map(|base| {
        let t0 = Instant::now();
        while !reqwest::blocking::get(format!("{base}/health")).is_ok_and(|r| r.status() == 200) {
            assert!(t0.elapsed() < Duration::from_secs(60), "never ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Command::new(&py)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py"))
            .arg(format!("{base}/v1"))
            .arg("test-key")
            .output()
            .expect("run tests/openai_client.py")
    });
    let _ = child.kill();
    let _ = child.wait();
    let out = result.unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai_client.py failed:\n{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // Every check ran (one "ok" line each).
    for check in [
        "models.list",
        "chat",
        "chat stream",
        "completions",
        "ffnskip adaptive",
        "stop",
        "errors",
        "auth",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("ok   {check}:"))),
            "no passing `{check}` check:\n{stdout}"
        );
    }
}
