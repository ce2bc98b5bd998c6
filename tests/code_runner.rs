//! The code task's runner (`measure::code`): canonical MBPP solutions pass, wrong ones fail,
//! runaway ones time out, and the sandbox holds (no environment, no sockets, no file removal,
//! no early exit).

mod common;

use std::time::Duration;

use common::{shared, temp_path, TempFile};
use ffnskip::measure::code::{load_problems, run_program, CodeFormat, Limits, Outcome};

fn quick() -> Limits {
    Limits {
        timeout: Duration::from_secs(5),
        ..Limits::default()
    }
}

#[test]
fn canonical_mbpp_solutions_pass_and_wrong_ones_fail() {
    let Some(shared) = shared("mbpp_runner") else {
        return;
    };
    let problems = load_problems(
        &shared.join("data/mbpp/sanitized-mbpp.json"),
        CodeFormat::Mbpp,
    )
    .unwrap();
    assert_eq!(problems.len(), 427);
    let p0 = &problems[0];
    assert_eq!(p0.id, "mbpp-2");
    assert!(p0
        .prompt
        .starts_with("\"\"\"\nWrite a function to find the shared elements"));
    assert!(
        p0.prompt.ends_with("== set((4, 5))\n\"\"\"\n"),
        "{}",
        p0.prompt
    );
    for p in problems.iter().take(25) {
        let prog = p.program(p.canonical.as_deref().unwrap());
        assert_eq!(
            run_program(&prog, quick()).unwrap(),
            Outcome::Passed,
            "{}",
            p.id
        );
    }
    let wrong = p0.program("def similar_elements(a, b):\n    return (1,)");
    match run_program(&wrong, quick()).unwrap() {
        Outcome::Failed(e) => assert!(e.contains("AssertionError"), "{e}"),
        o => panic!("{o:?}"),
    }
    let syntax = p0.program("def similar_elements(a, b)\n    return a");
    assert!(
        matches!(run_program(&syntax, quick()).unwrap(), Outcome::Failed(e) if e.contains("SyntaxError"))
    );
}

#[test]
fn a_runaway_program_times_out() {
    let limits = Limits {
        timeout: Duration::from_millis(1500),
        ..Limits::default()
    };
    let t = std::time::Instant::now();
    assert_eq!(
        run_program("while True:\n    pass\n", limits).unwrap(),
        Outcome::TimedOut
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_sandbox_holds() {
    let denied = |src: &str| match run_program(src, quick()).unwrap() {
        Outcome::Failed(e) => assert!(
            e.contains("disabled in the ffnskip code sandbox"),
            "{src}: {e}"
        ),
        o => panic!("{src}: {o:?}"),
    };
    denied("import socket\nsocket.socket()\n");
    denied("import os\nos.remove('program.py')\n");
    denied("import subprocess\nsubprocess.run(['true'])\n");
    denied("import sys\nsys.exit(0)\nassert False\n");
    denied("import os\nos._exit(0)\n");
    // The environment is empty but for PATH and LANG; the working directory is a fresh one.
    let env = "import os\nassert sorted(os.environ) == ['LANG', 'PATH'], sorted(os.environ)\n\
               assert sorted(os.listdir('.')) == ['program.py', 'stderr.txt'], os.listdir('.')\n";
    assert_eq!(run_program(env, quick()).unwrap(), Outcome::Passed);
    // Memory is bounded: a 4 GB allocation fails.
    assert!(matches!(
        run_program("x = bytearray(4 << 30)\n", quick()).unwrap(),
        Outcome::Failed(e) if e.contains("MemoryError")
    ));
}

#[test]
fn humaneval_jsonl_is_read_as_well() {
    let f = TempFile(temp_path("code", "humaneval.jsonl"));
    let row = serde_json::json!({
        "task_id": "HumanEval/0",
        "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    });
    std::fs::write(&f.0, format!("{row}\n")).unwrap();
    let p = load_problems(&f.0, CodeFormat::Humaneval).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(
        p[0].prompt,
        "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n"
    );
    let good = p[0].program(p[0].canonical.as_deref().unwrap());
    assert_eq!(run_program(&good, quick()).unwrap(), Outcome::Passed);
    let bad = p[0].program("    return a - b\n");
    assert!(matches!(
        run_program(&bad, quick()).unwrap(),
        Outcome::Failed(_)
    ));
    // An MBPP file read as HumanEval, and the reverse, fail with the file and the way out.
    let e = load_problems(&f.0, CodeFormat::Mbpp)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not an MBPP problem array") && e.contains("--code-format humaneval"),
        "{e}"
    );
}
