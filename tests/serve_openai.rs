//! A real client: `tests/openai_client.py` drives `ffnskip serve` with the official `openai`
//! Python package (streaming and not, chat and completions, `extra_body` with the `ffnskip`
//! field, `stop`, and the errors it raises as typed exceptions). The package is installed into
//! `target/openai-venv` on first use (`python3 -m venv`, then pip), as `.ci/run` and
//! `scripts/load.sh` do.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::server::Server;

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
    let server = Server::start(&["-c", "1024", "--parallel", "2", "--api-key", "test-key"]);
    let out = Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py"))
        .arg(server.url("/v1"))
        .arg("test-key")
        .output()
        .expect("run tests/openai_client.py");
    drop(server);
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
