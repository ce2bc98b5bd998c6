//! Chat prompts from the GGUF's `tokenizer.chat_template` (Jinja), rendered with minijinja
//! as Hugging Face's `apply_chat_template` does: `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, and `raise_exception`.

use std::io::{self, Write};

use minijinja::value::{Rest, Value};
use minijinja::{context, Environment, Error, ErrorKind, Output, State};
use serde::Serialize;

/// VM instructions one render may run (minijinja "fuel", one unit per instruction). The
/// template comes from the GGUF file, i.e. it is untrusted: without a budget, nested loops
/// (`range` allows 100,000 items each) run for hours. Real chat templates spend about 30–60
/// units per message, so this allows well over 10,000 messages and stops a runaway template
/// after a fraction of a second.
pub const CHAT_TEMPLATE_FUEL: u64 = 1_000_000;

/// Largest rendered prompt, in bytes: 64 MiB, more text than a 2^24-token context holds at
/// ~4 bytes per token. Fuel bounds the instructions, not what each one emits (minijinja
/// repeats a string up to 100 MB in one instruction), so the output is capped as well.
pub const MAX_RENDERED_BYTES: usize = 64 << 20;

/// Most items a template may print as one value or group with `batch`: minijinja's own limit
/// for `range`. Fuel counts instructions, and one instruction that prints `[1] * 10**9` or
/// runs `batch(10**11)` would otherwise iterate or allocate for minutes (found by fuzzing).
pub const MAX_TEMPLATE_ITEMS: usize = 100_000;

/// Largest field width or precision in a format string (`'%20s'|format(x)`,
/// `'{:>20}'.format(x)`): minijinja pads to whatever width it is given, so
/// `'%44444444444444444g'` asked for a 44-petabyte string (found by fuzzing).
pub const MAX_FORMAT_WIDTH: u64 = 100_000;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0} has no chat template (tokenizer.chat_template): use `generate` with a raw prompt instead")]
    NoTemplate(String),
    #[error("chat template of {file}: {err:#}")]
    Template { file: String, err: Error },
}

impl ChatTemplate {
    /// Compiles `source`; `file` names the model in errors.
    pub fn new(file: &str, source: &str, bos: &str, eos: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(python_method);
        env.set_formatter(format_value);
        env.add_filter("batch", batch);
        env.add_filter("format", format_printf);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|err| ChatError::Template {
                file: file.into(),
                err,
            })?;
        Ok(ChatTemplate {
            env,
            bos: bos.into(),
            eos: eos.into(),
        })
    }

    /// Renders the conversation; with `add_generation_prompt` it ends where the assistant's
    /// answer begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let mut out = CappedOutput {
            bytes: Vec::new(),
            full: false,
        };
        let template = self.env.get_template("chat")?;
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        };
        // minijinja is not panic-free on every template (fuzzing found `''[::-1]` indexing out
        // of bounds in its slice operator); a panic while rendering becomes an error. Nothing
        // outlives the call but `out`, which is discarded on error.
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            template.render_captured_to(ctx, &mut out).map(|_| ())
        }));
        let rendered = rendered.unwrap_or_else(|payload| {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("the template engine panicked: {msg}"),
            ))
        });
        match rendered {
            Ok(()) => {}
            Err(_) if out.full => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("the rendered prompt exceeds {MAX_RENDERED_BYTES} bytes (chat::MAX_RENDERED_BYTES)"),
                ))
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("the template ran past {CHAT_TEMPLATE_FUEL} instructions (chat::CHAT_TEMPLATE_FUEL); {e}"),
                ))
            }
            Err(e) => return Err(e),
        }
        // minijinja writes whole UTF-8 strings, so the bytes are valid UTF-8.
        Ok(String::from_utf8(out.bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }
}

/// Python's string and list methods (`strip`, `split`, …) from minijinja-contrib's pycompat,
/// except `str.count('')`, which loops forever there; Python counts the `len + 1` empty
/// matches between the characters.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let (Some(s), "count", [arg]) = (value.as_str(), method, args) {
        if arg.as_str() == Some("") {
            return Ok(Value::from(s.chars().count() + 1));
        }
    }
    if let (Some(s), "format") = (value.as_str(), method) {
        check_format_widths(s)?;
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// minijinja's default formatter, refusing to print a sequence of more than
/// [`MAX_TEMPLATE_ITEMS`] items.
fn format_value(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    if value.as_str().is_none() {
        if let Some(n) = value.len().filter(|&n| n > MAX_TEMPLATE_ITEMS) {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("cannot print a value of {n} items (more than chat::MAX_TEMPLATE_ITEMS = {MAX_TEMPLATE_ITEMS})"),
            ));
        }
    }
    minijinja::escape_formatter(out, state, value)
}

/// minijinja's `batch` filter, refusing batches of more than [`MAX_TEMPLATE_ITEMS`] items
/// (it pre-allocates and pads the last batch to `count`).
fn batch(
    state: &State,
    value: Value,
    count: usize,
    fill_with: Option<Value>,
) -> Result<Value, Error> {
    if count > MAX_TEMPLATE_ITEMS {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "batch size {count} is more than chat::MAX_TEMPLATE_ITEMS = {MAX_TEMPLATE_ITEMS}"
            ),
        ));
    }
    minijinja::filters::batch(state, value, count, fill_with)
}

/// minijinja's printf-style `format` filter, with widths and precisions checked first.
fn format_printf(state: &State, format: &Value, args: Rest<Value>) -> Result<Value, Error> {
    if let Some(s) = format.as_str() {
        check_format_widths(s)?;
    }
    minijinja::filters::format(state, format, args)
}

/// Refuses a width or precision over [`MAX_FORMAT_WIDTH`] in the specifications of a printf
/// (`%-08.3f`, `%(key)5s`) or `str.format` (`{0:>12}`) format string. Numbers outside the
/// specifications (literal text, argument indexes) are not looked at.
fn check_format_widths(format: &str) -> Result<(), Error> {
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        // The characters of one specification: after `%` up to its conversion letter, or
        // after `:` inside braces up to `}`.
        let spec: String = match c {
            '%' => {
                if chars.peek() == Some(&'(') {
                    chars.by_ref().take_while(|&c| c != ')').for_each(drop);
                }
                let mut spec = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphabetic() || c == '%' {
                        break;
                    }
                    spec.push(c);
                    chars.next();
                }
                spec
            }
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                continue;
            }
            '{' => {
                let field: String = chars.by_ref().take_while(|&c| c != '}').collect();
                field
                    .split_once(':')
                    .map(|(_, spec)| spec.to_string())
                    .unwrap_or_default()
            }
            _ => continue,
        };
        for digits in spec
            .split(|c: char| !c.is_ascii_digit())
            .filter(|d| !d.is_empty())
        {
            let n: u64 = digits.parse().unwrap_or(u64::MAX);
            if n > MAX_FORMAT_WIDTH {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("format width or precision {digits} is more than chat::MAX_FORMAT_WIDTH = {MAX_FORMAT_WIDTH}"),
                ));
            }
        }
    }
    Ok(())
}

/// The rendered prompt, refusing to grow past [`MAX_RENDERED_BYTES`] (then `full` is set).
struct CappedOutput {
    bytes: Vec<u8>,
    full: bool,
}

impl Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.full = true;
            return Err(io::Error::other("rendered prompt too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SmolLM2-135M-Instruct's template, as stored in its GGUF.
    const SMOLLM: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_default_system_prompt() {
        let t = ChatTemplate::new("m.gguf", SMOLLM, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[Message::new("user", "Hi!")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_and_python_methods_work() {
        let t = ChatTemplate::new(
            "m.gguf",
            "{% if messages[0].role == 'bot' %}{{ raise_exception('bad role') }}{% endif %}{{ messages[0].content.strip() }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  x  ")], false).unwrap(),
            "x"
        );
        let err = t.render(&[Message::new("bot", "x")], false).unwrap_err();
        assert!(err.to_string().contains("bad role"), "{err}");
    }
}
