//! Regression tests for what the AFL++ fuzz targets (`fuzz/`, `scripts/fuzz.sh`) found: each
//! input that crashed, hung or exhausted memory, small enough to keep here as a byte literal
//! or a file under `tests/fuzz_regressions/`, with the exact error it must now give.

/// The harness's input format, read exactly as the fuzzer read it.
#[path = "../fuzz/src/chat_input.rs"]
mod chat_input;

use std::time::{Duration, Instant};

use ffnskip::chat::{
    ChatTemplate, Message, CHAT_TEMPLATE_FUEL, MAX_FORMAT_WIDTH, MAX_RENDERED_BYTES,
    MAX_TEMPLATE_ITEMS,
};

/// Renders `source` with one user message; returns the error text and how long it took.
fn render_err(source: &str) -> (String, Duration) {
    let t = ChatTemplate::new("fuzz.gguf", source, "<s>", "</s>").unwrap();
    let start = Instant::now();
    let err = t
        .render(&[Message::new("user", "hi")], true)
        .expect_err("the template must be stopped");
    (format!("{err:#}"), start.elapsed())
}

/// chat_template: nested loops (each `range` may have 100,000 items) ran 10^10 iterations,
/// i.e. hung for hours on a template read from an untrusted GGUF. Fuel stops them.
#[test]
fn chat_template_nested_loops_run_out_of_fuel() {
    let (err, took) = render_err(
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
    );
    assert_eq!(
        err,
        "invalid operation: the template ran past 1000000 instructions (chat::CHAT_TEMPLATE_FUEL); engine ran out of fuel (in chat:1)"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(CHAT_TEMPLATE_FUEL, 1_000_000);
}

/// chat_template: a loop emitting a 100 MB string per iteration (minijinja allows string
/// repetition up to 100 MB per instruction) grew the prompt until memory ran out, within the
/// fuel. The output is capped.
#[test]
fn chat_template_output_is_capped() {
    let (err, took) = render_err("{% for a in range(1000) %}{{ 'x' * 100000000 }}{% endfor %}");
    assert_eq!(
        err,
        "invalid operation: the rendered prompt exceeds 67108864 bytes (chat::MAX_RENDERED_BYTES)"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(MAX_RENDERED_BYTES, 64 << 20);
}

/// chat_template: minijinja-contrib's `str.count('')` looped forever (its search never
/// advances on an empty match). Python's answer is the number of characters + 1.
#[test]
fn chat_template_count_of_empty_string_ends() {
    let t = ChatTemplate::new(
        "fuzz.gguf",
        "{{ 'abc'.count('') }} {{ 'héé'.count('é') }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "4 2");
}

/// chat_template: `batch(99999999999)` made minijinja pre-allocate a batch of that many
/// values (an allocation of terabytes).
#[test]
fn chat_template_huge_batch_is_refused() {
    let (err, _) = render_err("{{ messages|batch(99999999999) }}");
    assert_eq!(
        err,
        "invalid operation: batch size 99999999999 is more than chat::MAX_TEMPLATE_ITEMS = 100000 (in chat:1)"
    );
    let t = ChatTemplate::new("m.gguf", "{{ range(5)|batch(2, 'x')|list }}", "", "").unwrap();
    assert_eq!(
        t.render(&[], false).unwrap(),
        "[[0, 1], [2, 3], [4, \"x\"]]"
    );
    assert_eq!(MAX_TEMPLATE_ITEMS, 100_000);
}

/// chat_template: printing a repeated sequence (`[1] * 10**8`, one instruction, so no fuel is
/// spent) iterated 10^8 items before the output cap could stop it.
#[test]
fn chat_template_huge_sequence_is_not_printed() {
    let (err, took) = render_err("{{ [1] * 100000000 }}");
    assert_eq!(
        err,
        "invalid operation: cannot print a value of 100000000 items (more than chat::MAX_TEMPLATE_ITEMS = 100000) (in chat:1)"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

/// chat_template (AFL, 16 crashes, one cause): minijinja 2.24's slice operator indexes out of
/// bounds on `''[::-1]` (reversing an empty string) and panicked the whole program; with
/// overflow checks, `[:10**9:-1]` overflowed too. A panic while rendering is now an error.
#[test]
fn chat_template_panic_in_minijinja_is_an_error() {
    // The fuzzer's input, minimized: reverse the content of an empty message.
    let t = ChatTemplate::new("fuzz.gguf", "{{ messages[0].content[::-1] }}", "", "").unwrap();
    let err = t.render(&[Message::new("user", "")], false).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "invalid operation: the template engine panicked: index out of bounds: the len is 0 but the index is 0"
    );
    assert_eq!(
        t.render(&[Message::new("user", "abc")], false).unwrap(),
        "cba"
    );
}

/// The AFL inputs themselves (`tests/fuzz_regressions/chat_template_*.bin`), split as the
/// `chat_template` harness splits them: flags byte (bit 0: add_generation_prompt), then
/// template, role, content, … separated by NUL. Rendering must return (`Ok` or `Err`); the
/// first gives the panic error above, the second only panicked with overflow checks on, the
/// third asked for a 4.4e16-character field.
#[test]
fn chat_template_afl_inputs_return() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    for name in [
        "chat_template_reverse_empty.bin",
        "chat_template_slice_overflow.bin",
        "chat_template_format_width.bin",
    ] {
        let data = std::fs::read(dir.join(name)).unwrap();
        let input = chat_input::parse(&data).unwrap();
        let t = ChatTemplate::new("fuzz.gguf", &input.source, "<s>", "</s>").unwrap();
        let result = t.render(&input.messages, input.add_generation_prompt);
        if name.contains("reverse_empty") {
            let err = format!("{:#}", result.as_ref().unwrap_err());
            assert!(
                err.contains("the template engine panicked: index out of bounds"),
                "{err}"
            );
        }
        if name.contains("format_width") {
            let err = format!("{:#}", result.as_ref().unwrap_err());
            assert!(err.contains("is more than chat::MAX_FORMAT_WIDTH"), "{err}");
        }
    }
}

/// chat_template (AFL): `'%44444444444444444g'|format(8)` made minijinja pad to a width of
/// 4.4e16 characters (an allocation of petabytes). Widths and precisions are checked first,
/// in printf-style and `str.format` strings.
#[test]
fn chat_template_huge_format_width_is_refused() {
    let (err, _) = render_err("{{ '%44444444444444444g'|format(8) }}");
    assert_eq!(
        err,
        "invalid operation: format width or precision 44444444444444444 is more than chat::MAX_FORMAT_WIDTH = 100000 (in chat:1)"
    );
    let (err, _) = render_err("{{ '{0:>99999999999}'.format(1) }}");
    assert_eq!(
        err,
        "invalid operation: format width or precision 99999999999 is more than chat::MAX_FORMAT_WIDTH = 100000 (in chat:1)"
    );
    let t = ChatTemplate::new(
        "m.gguf",
        "{{ '%5.2f|%3d|100000000%%'|format(3.14159, 7) }}{{ '{0:>4}|{1}'.format('a', 12345678) }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        t.render(&[], false).unwrap(),
        " 3.14|  7|100000000%   a|12345678"
    );
    assert_eq!(MAX_FORMAT_WIDTH, 100_000);
}

/// Real templates stay far below both limits.
#[test]
fn long_conversations_still_render() {
    let smollm = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let t = ChatTemplate::new("m.gguf", smollm, "", "").unwrap();
    let messages: Vec<Message> = (0..10_000)
        .map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, "hello"))
        .collect();
    let out = t.render(&messages, true).unwrap();
    assert_eq!(out.matches("<|im_start|>").count(), 10_002);
}
