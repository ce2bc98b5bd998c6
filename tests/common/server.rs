//! `ffnskip serve` on a free loopback port for the server tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server on the default model; killed when dropped.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `ffnskip serve --port 0 -t 2 -m DEFAULT EXTRA…` and waits until `/health` is
    /// 200 (503 before that, nothing else).
    pub fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ffnskip"))
            .args(["serve", "--port", "0", "-t", "2", "-m"])
            .arg(super::default_model())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ffnskip serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the listening line");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .map(str::to_string);
        let s = Server {
            child,
            base: base.unwrap_or_else(|| panic!("unexpected first line {line:?}")),
        };
        assert!(s.base.starts_with("http://127.0.0.1:"), "{}", s.base);
        let t0 = Instant::now();
        loop {
            if let Ok(r) = reqwest::blocking::get(s.url("/health")) {
                if r.status() == 200 {
                    break;
                }
                assert_eq!(r.status(), 503);
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "never ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}
