//! Issue 10, sections 1–3 through the binary: no command overwrites its input, bad arguments
//! end with one line naming the argument and the limit, a closed stdout ends a run quietly,
//! and the llama.cpp habits (`--ignore-eos`, `--stop`, `-f -`, `-n 0`, `--system`, chat's
//! commands and Ctrl-C).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ffnskip"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run ffnskip")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn model() -> String {
    common::default_model()
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

/// A fresh, empty directory for one test.
fn scratch(tag: &str) -> PathBuf {
    let d = common::temp_path(tag, "dir");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `args`, expects status 1 and exactly `error: {want}` on stderr.
fn refused(args: &[&str], want: &str) {
    let o = run(args);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
    assert_eq!(stderr(&o).trim(), format!("error: {want}"), "{args:?}");
}

/// The same path under another spelling: `dir/./name`, a symlink, and a hard link.
fn spellings(d: &Path, p: &Path, tag: &str) -> Vec<PathBuf> {
    let name = p.file_name().expect("name");
    let link = d.join(format!("{tag}-symlink"));
    std::os::unix::fs::symlink(p, &link).expect("symlink");
    let hard = d.join(format!("{tag}-hardlink"));
    std::fs::hard_link(p, &hard).expect("hard link");
    vec![p.to_path_buf(), d.join(".").join(name), link, hard]
}

fn refuse_msg(what: &str, out: &Path, input_what: &str, input: &Path) -> String {
    format!(
        "refusing to write {what} {}: it is the input {input_what} {}; choose another output path",
        out.display(),
        input.display()
    )
}

#[test]
fn convert_llama2c_never_overwrites_its_inputs() {
    let Some(shared) = common::shared("convert_llama2c_never_overwrites_its_inputs") else {
        return;
    };
    let d = scratch("conv");
    let tiny = shared.join("models/tinyllamas");
    let ck = d.join("stories260K.bin");
    let tok = d.join("tok512.bin");
    std::fs::copy(tiny.join("stories260K.bin"), &ck).expect("copy");
    std::fs::copy(tiny.join("tok512.bin"), &tok).expect("copy");
    let (ck_bytes, tok_bytes) = (std::fs::read(&ck).unwrap(), std::fs::read(&tok).unwrap());
    for (what, input) in [("CHECKPOINT", &ck), ("TOKENIZER", &tok)] {
        for out in spellings(&d, input, what) {
            refused(
                &["convert-llama2c", s(&ck), s(&tok), s(&out)],
                &refuse_msg("OUT", &out, what, input),
            );
        }
    }
    assert_eq!(std::fs::read(&ck).unwrap(), ck_bytes);
    assert_eq!(std::fs::read(&tok).unwrap(), tok_bytes);
    // A real output is written whole, with no temporary file left beside it.
    let out = d.join("out.gguf");
    let o = run(&["convert-llama2c", s(&ck), s(&tok), s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ffnskip::gguf::GgufFile::open(&out).is_ok());
    assert!(
        names(&d).iter().all(|n| !n.contains(".tmp")),
        "{:?}",
        names(&d)
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn calibrate_bench_and_eval_never_overwrite_their_inputs() {
    let d = scratch("cal");
    let m = d.join("model.gguf");
    std::fs::hard_link(model(), &m)
        .or_else(|_| std::fs::copy(model(), &m).map(|_| ()))
        .expect("model");
    let text = d.join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let before = std::fs::metadata(&m).unwrap().len();
    for (input_what, input, tag) in [("-m/--model", &m, "model"), ("--text", &text, "text")] {
        for out in spellings(&d, input, tag) {
            for flag in ["-o", "--embed"] {
                let what = if flag == "-o" { "-o/--out" } else { flag };
                refused(
                    &["calibrate", "-m", s(&m), "--text", s(&text), flag, s(&out)],
                    &refuse_msg(what, &out, input_what, input),
                );
            }
        }
    }
    // quantize IN OUT through the binary.
    refused(
        &[
            "quantize",
            s(&m),
            s(&d.join(".").join("model.gguf")),
            "--type",
            "q8_0",
        ],
        &refuse_msg("OUT", &d.join(".").join("model.gguf"), "IN", &m),
    );
    // The plots beside the JSON are outputs too: `-o text.json` draws text.svg/text.png.
    let svg = d.join("plot.svg");
    std::fs::write(&svg, "<svg/>").unwrap();
    refused(
        &[
            "calibrate",
            "-m",
            s(&m),
            "--text",
            s(&svg),
            "-o",
            s(&d.join("plot.json")),
        ],
        &refuse_msg("plot", &svg, "--text", &svg),
    );
    // --embed onto the profile JSON being written.
    let json = d.join("p.json");
    refused(
        &[
            "calibrate",
            "-m",
            s(&m),
            "--text",
            s(&text),
            "-o",
            s(&json),
            "--embed",
            s(&json),
        ],
        &refuse_msg("--embed", &json, "-o/--out", &json),
    );
    // bench --plot BASE writes BASE.svg and BASE.png.
    let m_svg = d.join("m.svg");
    std::fs::hard_link(&m, &m_svg).unwrap();
    refused(
        &["bench", "-m", s(&m_svg), "--plot", s(&d.join("m"))],
        &refuse_msg("--plot", &m_svg, "-m/--model", &m_svg),
    );
    let profile_png = d.join("prof.png");
    std::fs::write(&profile_png, "{}").unwrap();
    refused(
        &[
            "bench",
            "-m",
            s(&m),
            "--skip-profile",
            s(&profile_png),
            "--plot",
            s(&d.join("prof")),
        ],
        &refuse_msg("--plot", &profile_png, "--skip-profile", &profile_png),
    );
    // eval's result file DIR/MODEL-gN/TASK/POLICY.jsonl, when it is the --data file ...
    let text_of = |p: &Path| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "Some text to measure perplexity on. ".repeat(200)).unwrap();
    };
    let data = d.join("ev/model-g96/perplexity/none.jsonl");
    text_of(&data);
    eval_refused(
        &m,
        &data,
        &d.join("ev"),
        refuse_msg("result file", &data, "--data", &data),
    );
    // ... and when it is the model (a GGUF named none.jsonl has the stem "none").
    let as_result = d.join("ev2/none-g96/perplexity/none.jsonl");
    std::fs::create_dir_all(as_result.parent().unwrap()).unwrap();
    std::fs::hard_link(&m, &as_result).unwrap();
    let text_data = d.join("wiki.txt");
    text_of(&text_data);
    eval_refused(
        &as_result,
        &text_data,
        &d.join("ev2"),
        refuse_msg("result file", &as_result, "-m/--model", &as_result),
    );
    assert_eq!(std::fs::metadata(&m).unwrap().len(), before);
    let _ = std::fs::remove_dir_all(d);
}

/// `eval --task perplexity` refuses to write its result file, with `want` on stderr.
fn eval_refused(model: &Path, data: &Path, out: &Path, want: String) {
    let o = run(&[
        "eval",
        "-m",
        s(model),
        "--task",
        "perplexity",
        "--skip",
        "none",
        "--data",
        s(data),
        "--out",
        s(out),
        "--limit",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
}

#[test]
fn huge_context_zero_threads_and_directories_are_one_line_errors() {
    let m = model();
    let o = run(&["generate", "-m", &m, "-p", "hi", "-c", "100000000"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert_eq!(
        lines[0],
        "warning: -c/--ctx 100000000 is above the model's training context of 8192 tokens; quality degrades past it"
    );
    // 2 × 2 bytes × 30 layers × 3 KV heads × 64 × 10^8 positions, plus the attention buffers.
    assert!(
        lines[1].starts_with("error: --ctx 100000000 needs 2408000000000 bytes (2408.00 GB) for the KV cache and attention buffers, but only ")
            && lines[1].ends_with(" of memory are available; lower -c/--ctx"),
        "{e}"
    );
    for (args, want) in [
        (vec!["-t", "0"], "error: invalid value '0' for '--threads <THREADS>': 0 threads: expected at least 1"),
        (vec!["-c", "0"], "error: invalid value '0' for '--ctx <CTX>': a context of 0 tokens holds nothing: expected at least 1"),
    ] {
        let mut a = vec!["generate", "-m", &m, "-p", "hi"];
        a.extend(args);
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2));
        assert_eq!(stderr(&o).lines().next(), Some(want));
    }
    let o = run(&[
        "generate", "-m", &m, "-p", "hi", "-n", "1", "-t", "1000", "--temp", "0",
    ]);
    assert!(o.status.success());
    assert!(
        stderr(&o).starts_with("warning: -t/--threads 1000 is more than the "),
        "{}",
        stderr(&o)
    );
    let d = scratch("dir");
    refused(
        &["generate", "-m", s(&d), "-p", "hi"],
        &format!(
            "-m/--model {}: is a directory, expected a file",
            d.display()
        ),
    );
    refused(
        &["generate", "-m", &m, "-f", s(&d)],
        &format!("-f/--file {}: is a directory, expected a file", d.display()),
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn prompts_come_from_stdin_and_are_bounded() {
    let m = model();
    let mut c = spawn_piped(&[
        "generate", "-m", &m, "-f", "-", "-n", "6", "--temp", "0", "--json",
    ]);
    c.stdin
        .take()
        .unwrap()
        .write_all(b"The capital of France is")
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let from_stdin: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = run(&[
        "generate",
        "-m",
        &m,
        "-p",
        "The capital of France is",
        "-n",
        "6",
        "--temp",
        "0",
        "--json",
    ]);
    let from_arg: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(from_stdin["tokens"], from_arg["tokens"]);
    assert_eq!(from_stdin["prompt_tokens"], 5);
    // An endless prompt is cut off at the stated maximum, quickly.
    refused(
        &["generate", "-m", &m, "-f", "/dev/zero"],
        "-f/--file /dev/zero: the prompt is longer than the limit of 16777216 bytes",
    );
}

#[test]
fn zero_tokens_generates_nothing() {
    let o = run(&[
        "generate",
        "-m",
        &model(),
        "-p",
        "Hello",
        "-n",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tokens"], serde_json::json!([]));
    assert_eq!(v["text"], "");
    assert_eq!(v["stop_reason"], "max_tokens");
    let o = run(&["generate", "-m", &model(), "-p", "Hello", "-n", "0"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "\n");
    assert!(stderr(&o).contains("0 generated"), "{}", stderr(&o));
}

/// Waits at most two minutes for the child to exit (`what` says why it should); returns its
/// status and stderr.
fn wait_bounded(c: &mut std::process::Child, what: &str) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "still running: {what}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status, err)
}

/// Reads `n` bytes of the child's stdout, closes it, and waits (bounded) for the exit.
fn close_after(mut c: std::process::Child, n: usize) -> (std::process::ExitStatus, String) {
    let mut stdout = c.stdout.take().unwrap();
    let mut buf = vec![0u8; n];
    stdout.read_exact(&mut buf).unwrap();
    drop(stdout);
    wait_bounded(&mut c, "its stdout closed")
}

/// `ffnskip ARGS` with stdin, stdout and stderr piped.
fn spawn_piped(args: &[&str]) -> std::process::Child {
    bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

#[test]
fn a_closed_stdout_ends_the_run_quietly() {
    let m = model();
    // 100 000 tokens would take many minutes: the run must end when `head` stops reading.
    let c = spawn_piped(&[
        "generate",
        "-m",
        &m,
        "-p",
        "Once upon a time",
        "-n",
        "100000",
        "-c",
        "8192",
        "--ignore-eos",
    ]);
    let (st, err) = close_after(c, 10);
    assert!(st.success(), "{st:?} {err}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
    // tokenize: 200 000 ids are far more than a pipe holds.
    let mut c = spawn_piped(&["tokenize", "-m", &m, "-f", "-"]);
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all("word ".repeat(200_000).as_bytes()).unwrap();
    drop(stdin);
    let (st, err) = close_after(c, 1);
    assert!(st.success(), "{st:?} {err}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
}

fn gen_json(extra: &[&str]) -> serde_json::Value {
    let m = model();
    let mut a = vec!["generate", "-m", &m, "--temp", "0", "--json"];
    a.extend(extra);
    let o = run(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("json")
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    serde_json::from_value(v["tokens"].clone()).expect("ids")
}

#[test]
fn ignore_eos_and_system_prompt() {
    let base = [
        "--system",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "-p",
        "What is 2+2?",
        "-n",
        "60",
    ];
    let stops = gen_json(&base);
    assert_eq!(stops["stop_reason"], "eos", "{stops}");
    let n = ids(&stops).len();
    assert!(n > 0 && n < 60);
    let mut more = base.to_vec();
    more.push("--ignore-eos");
    let goes_on = gen_json(&more);
    assert_eq!(goes_on["stop_reason"], "max_tokens");
    assert_eq!(ids(&goes_on).len(), 60);
    // The same greedy tokens up to where the model wanted to stop.
    assert_eq!(ids(&goes_on)[..n], ids(&stops)[..]);
    // --system renders the chat template: the same as the template rendered by hand.
    let raw = gen_json(&["-p", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "-n", "60"]);
    assert_eq!(ids(&raw), ids(&stops));
}

#[test]
fn stop_strings_end_generation_before_them() {
    let full = gen_json(&["-p", "The capital of France is", "-n", "40"]);
    let text = full["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the greedy text (three words into it).
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() > 6, "{text}");
    let stop = format!("{} {}", words[3], words[4]);
    let at = text.find(&stop).unwrap();
    for flag in ["--stop", "-r", "--reverse-prompt"] {
        let v = gen_json(&[
            "-p",
            "The capital of France is",
            "-n",
            "40",
            flag,
            "no such text",
            flag,
            &stop,
        ]);
        assert_eq!(v["stop_reason"], "stop_sequence", "{flag}: {v}");
        assert_eq!(v["text"].as_str().unwrap(), &text[..at], "{flag}");
        assert!(ids(&v).len() < 40 && ids(&full).starts_with(&ids(&v)));
    }
    // The streamed text and stderr say the same.
    let o = run(&[
        "generate",
        "-m",
        &model(),
        "--temp",
        "0",
        "-p",
        "The capital of France is",
        "-n",
        "40",
        "--stop",
        &stop,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}\n", &text[..at])
    );
    assert!(stderr(&o).contains("stop: stop_sequence"), "{}", stderr(&o));
}

#[test]
fn chat_commands_are_not_sent_to_the_model() {
    let mut c = spawn_piped(&["chat", "-m", &model(), "--temp", "0", "-n", "8"]);
    c.stdin
        .take()
        .unwrap()
        .write_all(b"/help\n/frobnicate now\n")
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e = stderr(&o);
    assert!(e.contains("commands: /help this list"), "{e}");
    assert!(
        e.contains("unknown command /frobnicate now: not sent to the model."),
        "{e}"
    );
    assert!(!e.contains("tok/s"), "{e}");
}

fn sigint(c: &std::process::Child) {
    // The shell's builtin `kill`: no procps needed.
    let st = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", c.id())])
        .status()
        .expect("sh");
    assert!(st.success());
}

/// Waits until the child has written `n` bytes to stdout (the model is answering).
fn read_some(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).expect("answer");
    buf
}

#[test]
fn ctrl_c_stops_the_answer_and_keeps_the_conversation() {
    let mut c = spawn_piped(&[
        "chat",
        "-m",
        &model(),
        "--temp",
        "0",
        "-n",
        "100000",
        "-c",
        "4096",
        "--ignore-eos",
    ]);
    let mut stdin = c.stdin.take().unwrap();
    let mut stdout = c.stdout.take().unwrap();
    stdin.write_all(b"Tell me a very long story.\n").unwrap();
    read_some(&mut stdout, 20);
    sigint(&c);
    // The conversation goes on: a command after the interrupted answer is handled.
    stdin.write_all(b"/help\n").unwrap();
    drop(stdin);
    let (status, e) = wait_bounded(&mut c, "chat did not stop the answer on Ctrl-C");
    assert!(status.success(), "{status:?} {e}");
    assert!(
        e.contains("stop: cancelled — interrupted, the conversation goes on]"),
        "{e}"
    );
    assert!(e.contains("commands: /help this list"), "{e}");

    // At the prompt, Ctrl-C exits at once with status 130.
    let mut c = spawn_piped(&["chat", "-m", &model()]);
    let mut err = c.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    // The banner ends with the first "> " prompt.
    while !seen.ends_with(b"> ") {
        assert_eq!(err.read(&mut byte).unwrap(), 1, "chat exited early");
        seen.push(byte[0]);
    }
    sigint(&c);
    let st = c.wait().unwrap();
    assert_eq!(st.code(), Some(130));
}

#[test]
fn calibrate_works_outside_the_repository_with_its_built_in_text() {
    let d = scratch("calout");
    let o = bin()
        .current_dir(&d)
        .args(["calibrate", "-m", &model(), "--tokens", "64", "--json"])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("profile json");
    assert_eq!(
        v["source"],
        "wikitext-2 test, \"The Hustler ( film )\" (built in) (first 64 tokens)"
    );
    // Position 0 (the attention sink) is left out of the statistics.
    assert_eq!(v["tokens"], 63);
    let stem = "SmolLM2-135M-Instruct.Q4_1";
    assert_eq!(
        names(&d),
        [
            format!("{stem}.ffnskip-profile.json"),
            format!("{stem}.ffnskip-profile.png"),
            format!("{stem}.ffnskip-profile.svg"),
        ]
    );
    let _ = std::fs::remove_dir_all(d);
}
